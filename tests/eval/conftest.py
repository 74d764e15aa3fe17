"""Fixtures of the evaluation tests: real face clips and settings on the real demo face pack.

The clips are real photos that ship in packages, panned and zoomed by ffmpeg (imageio-ffmpeg's
static build) into short H.264 videos:

- ``astronaut.mp4``: scikit-image's astronaut (the reference is the same photo mirrored and saved
  as a low-quality JPEG, so "same person" is not "same pixels");
- ``hanks.mp4``: insightface's Tom Hanks photo, padded (another person);
- ``coffee.mp4``: scikit-image's coffee cup (no face at all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import pytest
import skimage.data

from lynx.settings import LynxSettings
from tests.eval.clips import pan_and_zoom
from tests.faces.conftest import INSIGHTFACE_IMAGES


@dataclass(frozen=True)
class Clips:
    folder: Path
    astronaut: Path
    hanks: Path
    coffee: Path
    astronaut_reference: Path
    hanks_reference: Path


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    folder = tmp_path_factory.mktemp("clips")
    astronaut = skimage.data.astronaut()[..., ::-1]  # OpenCV writes BGR
    cv2.imwrite(str(folder / "astronaut.png"), astronaut)
    cv2.imwrite(str(folder / "astronaut_ref.jpg"), cv2.flip(astronaut, 1), [cv2.IMWRITE_JPEG_QUALITY, 60])
    tight = cv2.imread(str(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png"))
    cv2.imwrite(str(folder / "hanks.png"), cv2.copyMakeBorder(tight, 100, 100, 100, 100, cv2.BORDER_CONSTANT))
    cv2.imwrite(str(folder / "coffee.png"), skimage.data.coffee()[..., ::-1])
    return Clips(
        folder=folder,
        astronaut=pan_and_zoom(folder / "astronaut.png", folder / "astronaut.mp4"),
        hanks=pan_and_zoom(folder / "hanks.png", folder / "hanks.mp4"),
        coffee=pan_and_zoom(folder / "coffee.png", folder / "coffee.mp4"),
        astronaut_reference=folder / "astronaut_ref.jpg",
        hanks_reference=folder / "hanks.png",
    )


@pytest.fixture
def eval_settings(
    make_settings: Callable[..., LynxSettings],
    face_models_dir: Path,  # noqa: F811
) -> Callable[..., LynxSettings]:
    """``eval_settings(backend="sqlite", store="local", **overrides)``: the root ``make_settings``
    with the demo face pack, CPU face models and stride 1 unless overridden."""

    def make(backend: str = "sqlite", store: str = "local", **overrides: Any) -> LynxSettings:
        values: dict[str, Any] = {"models_dir": face_models_dir, "face_device": "cpu", "eval_frame_stride": 1}
        return make_settings(backend=backend, store=store, **{**values, **overrides})

    return make


def write_manifest(folder: Path, entries: list[dict[str, Any]], *, name: str = "clips") -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "videos": entries}), encoding="utf-8")
    return path
