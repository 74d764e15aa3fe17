"""What to deliver: one validated record built from the settings (plus per-job overrides).

Every field mirrors a ``LYNX_DELIVER_*`` setting of the same name (``ffmpeg_binary`` mirrors
``LYNX_FFMPEG_BINARY``; ``source_fps`` comes from the model variant). Impossible values are refused
when the spec is built, with an ``InvalidDeliverySpecError`` that names the variable to fix, so a
campaign fails before the first GPU minute instead of after it.

Choices made here:
- Heights must be even (yuv420p halves the chroma planes); an odd height is rejected, not
  silently changed. The width follows the source aspect ratio and is rounded to the nearest even
  number.
- A target smaller than the source is a downscale with the resampler (Real-ESRGAN is skipped: a
  learned upscaler has nothing to add there).
- In the pipeline Real-ESRGAN runs in the GPU decode stage, before the lossless intermediate is
  written; ``Upscaled`` is what that stage tells the deliver stage, for the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lynx.errors import ModelWeightsError
from lynx.media.codecs import RENDITIONS, X264_PRESETS
from lynx.media.errors import InvalidDeliverySpecError

if TYPE_CHECKING:
    from lynx.settings import LynxSettings

MAX_HEIGHT = 4320
MAX_FPS = 120.0
WatermarkPosition = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"]


def setting_name(field: str) -> str | None:
    """The LYNX_* variable behind a spec field (None for fields that are not settings)."""
    if field == "ffmpeg_binary":
        return "LYNX_FFMPEG_BINARY"
    if field == "source_fps":
        return None
    return f"LYNX_DELIVER_{field.upper()}"


def _bad(field: str, message: str) -> InvalidDeliverySpecError:
    return InvalidDeliverySpecError(message, setting=setting_name(field))


class Upscaled(BaseModel):
    """A learned upscale already applied to the frames handed to delivery (by the GPU decode stage)."""

    model_config = ConfigDict(frozen=True)

    label: str = Field(description="As the manifest's video.upscaling: 'realesrgan x4 (<weights file>)'.")
    weights: dict[str, Any] = Field(description="The manifest's upscaler_weights asset entry.")
    source_width: int = Field(gt=0, description="Size of the frames the model made, before upscaling.")
    source_height: int = Field(gt=0)


class DeliverySpec(BaseModel):
    """Everything that decides how the deliverables look. Frozen: one spec per job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ffmpeg_binary: Path | None = None
    source_fps: float = Field(
        default=16.0, gt=0, le=MAX_FPS, description="Native rate of the frames handed in."
    )
    # size
    height: int = Field(default=0, ge=0, le=MAX_HEIGHT)
    upscaler: Literal["lanczos", "realesrgan"] = "lanczos"
    realesrgan_weights: Path | None = None
    upscale_tile: int = Field(default=256, ge=0, le=4096)
    upscale_tile_overlap: int = Field(default=16, ge=0, le=256)
    # time
    fps: float = Field(default=0, ge=0, le=MAX_FPS)
    fps_mode: Literal["interpolate", "duplicate"] = "interpolate"
    # encoding
    crf: int = Field(default=18, ge=0, le=51)
    preset: str = "medium"
    renditions: tuple[str, ...] = ()
    h265_crf: int = Field(default=24, ge=0, le=51)
    vp9_crf: int = Field(default=32, ge=0, le=63)
    # audio
    audio: Path | None = None
    audio_fade_seconds: float = Field(default=1.0, ge=0, le=60)
    audio_bitrate: str = Field(default="192k", pattern=r"^[1-9][0-9]{1,3}k$")
    # watermark
    watermark: Path | None = None
    watermark_position: WatermarkPosition = "bottom-right"
    watermark_opacity: float = Field(default=0.8, gt=0, le=1)
    watermark_width: float = Field(default=0.15, gt=0, le=1)
    # previews
    poster_height: int = Field(default=0, ge=0, le=MAX_HEIGHT)
    preview_height: int = Field(default=240, ge=16, le=2160)
    preview_fps: float = Field(default=8, gt=0, le=MAX_FPS)
    contact_sheet_columns: int = Field(default=4, ge=1, le=16)
    contact_sheet_frames: int = Field(default=12, ge=1, le=64)
    contact_sheet_tile_height: int = Field(default=144, ge=16, le=1080)
    # content safety
    safety_model: Path | None = None
    safety_threshold: float = Field(default=0.5, ge=0, le=1)
    safety_unsafe_index: int = Field(default=1, ge=0)
    safety_stride: int = Field(default=8, ge=1)
    safety_output: Literal["logits", "probabilities"] = "logits"
    safety_normalization: Literal["symmetric", "imagenet", "unit"] = "symmetric"
    # best-of-N: what becomes of the candidates that were not chosen
    candidates: Literal["drop", "keep"] = "drop"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            first = err.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "spec"
            raise _bad(
                field, f"delivery setting {field}={first.get('input')!r} is invalid: {first['msg']}"
            ) from None

    @field_validator("renditions", mode="before")
    @classmethod
    def _listed_renditions(cls, value: Any) -> Any:
        if isinstance(value, str):  # one name, as a user might write it
            return (value,) if value else ()
        return value

    @model_validator(mode="after")
    def _check(self) -> DeliverySpec:
        # Raised directly (not ValueError) so pydantic lets our error through with its setting name.
        for field in ("height", "poster_height", "preview_height", "contact_sheet_tile_height"):
            if getattr(self, field) % 2:
                raise _bad(field, f"{field} must be even for yuv420p video, got {getattr(self, field)}")
        if 0 < self.height < 64:
            raise _bad("height", f"height {self.height} is too small: use 0 (native) or 64..{MAX_HEIGHT}")
        if self.preset not in X264_PRESETS:
            raise _bad("preset", f"unknown preset {self.preset!r}; use one of {', '.join(X264_PRESETS)}")
        unknown = [name for name in self.renditions if name not in RENDITIONS]
        if unknown:
            raise _bad("renditions", f"unknown rendition {unknown[0]!r}; known: {', '.join(RENDITIONS)}")
        if len(set(self.renditions)) != len(self.renditions):
            raise _bad("renditions", f"renditions {list(self.renditions)} name a format twice")
        if self.upscale_tile and self.upscale_tile < 32:
            raise _bad("upscale_tile", f"upscale_tile {self.upscale_tile} is too small: use 0 or >= 32")
        if self.upscale_tile and self.upscale_tile_overlap * 2 >= self.upscale_tile:
            raise _bad("upscale_tile_overlap", "upscale_tile_overlap must be less than half of upscale_tile")
        if self.upscaler == "realesrgan":
            if self.realesrgan_weights is None:
                raise ModelWeightsError(
                    "upscaler 'realesrgan' needs a weight file", setting="LYNX_DELIVER_REALESRGAN_WEIGHTS"
                )
            if not self.realesrgan_weights.is_file():
                raise ModelWeightsError(
                    f"Real-ESRGAN weights {self.realesrgan_weights} do not exist",
                    setting="LYNX_DELIVER_REALESRGAN_WEIGHTS",
                )
        if self.safety_model is not None and not self.safety_model.is_file():
            raise ModelWeightsError(
                f"safety classifier {self.safety_model} does not exist", setting="LYNX_DELIVER_SAFETY_MODEL"
            )
        for field in ("audio", "watermark"):
            path = getattr(self, field)
            if path is not None and not path.is_file():
                raise _bad(field, f"{field} file {path} does not exist")
        return self

    @property
    def target_fps(self) -> float:
        """Rate of the delivered videos (the source rate when no conversion is asked for)."""
        return self.fps or self.source_fps

    @classmethod
    def from_settings(cls, settings: LynxSettings, **overrides: Any) -> DeliverySpec:
        """The spec the settings describe, with per-job overrides (e.g. ``source_fps=24`` for lite)."""
        values: dict[str, Any] = {"ffmpeg_binary": settings.ffmpeg_binary}
        for field in cls.model_fields:
            if hasattr(settings, f"deliver_{field}"):
                values[field] = getattr(settings, f"deliver_{field}")
        values["realesrgan_weights"] = settings.resolved_realesrgan_weights
        values["safety_model"] = settings.resolved_safety_model
        values.update(overrides)
        return cls(**values)
