"""Files shipped inside the lynx package (demo inputs)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_face_path() -> Path:
    """A public-domain portrait (NASA's astronaut photo) to try the pipeline with; see README.md."""
    return Path(str(resources.files(__package__).joinpath("demo_face.jpg")))
