"""Exceptions raised by ``lynx_model``.

``lynx_model`` stays usable on its own (no import of the ``lynx`` service package), so it defines
its own small hierarchy; ``lynx.model_loading`` maps these onto ``lynx.errors`` and adds the
LYNX_* setting to fix. Every message is one line that names the file or argument at fault.
"""

from __future__ import annotations

from pathlib import Path


class LynxModelError(Exception):
    """Base class of every error ``lynx_model`` raises on purpose."""


class WeightsError(LynxModelError):
    """A weights folder or file is missing, truncated, corrupt or does not fit the expected layout.

    ``path`` is the file or folder to look at; ``role`` says what is at fault ("base": the Wan
    folder, "adapter": the ``lynx_full`` / ``lynx_lite`` folder, "variant": the variant asked for
    does not match the adapter files) so callers can point users at the right setting.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, role: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.role = role
        super().__init__(message)


class ModelInputError(LynxModelError, ValueError):
    """Pipeline arguments are unusable (wrong shapes, a stage the variant lacks, a mismatched artifact)."""


class CheckpointMismatchError(ModelInputError):
    """A sampling checkpoint belongs to another generation (shape, seed, schedule or conditioning)."""
