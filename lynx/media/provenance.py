"""Where a video came from: the record written into the container and the manifest.

It deliberately holds no biometric data: the subject is named by an opaque reference (a record id
or artifact key), never by a face embedding or image, so the manifest can outlive the retention
period of the photo it was made from.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

_SOFTWARE = (
    "lynx",
    "torch",
    "diffusers",
    "transformers",
    "prefect",
    "av",
    "imageio-ffmpeg",
    "ffmpeg-python",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "insightface",
    "pillow",
    "opencv-python-headless",
)


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def collect_software_versions(ffmpeg: str | None = None) -> dict[str, str]:
    """Versions of Python and of the installed packages that shape the output (absent ones omitted)."""
    versions = {"python": platform.python_version()}
    for name in _SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if ffmpeg:
        versions["ffmpeg"] = ffmpeg
    return versions


class InputArtifact(BaseModel):
    """An input the video was made from, by its artifact-store key and content hash."""

    model_config = ConfigDict(frozen=True)

    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: str = Field(default="input", description="e.g. 'reference_image', 'intermediate_video'.")


class LoraRecord(BaseModel):
    """A LoRA file fused into the DiT (LYNX_LORAS)."""

    model_config = ConfigDict(frozen=True)

    file: str = Field(description="The file's name.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scale: float


class StepCacheRecord(BaseModel):
    """The step cache a video was sampled with (LYNX_STEP_CACHE) and what it skipped."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(description="'first-block' or 'taylorseer'.")
    options: dict[str, Any] = Field(default_factory=dict)
    block_forwards: int = Field(ge=0, description="DiT block-forwards of the sampling (per guidance pass).")
    skipped_block_forwards: int = Field(ge=0, description="Of those, the ones the cache skipped.")


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = "lynx"
    variant: str = Field(default="full", description="'full' or 'lite'.")
    version: str = Field(default="unknown", description="Release tag or a fingerprint of the weights.")
    loras: tuple[LoraRecord, ...] = Field(default=(), description="LoRA files fused into the DiT.")
    step_cache: StepCacheRecord | None = Field(
        default=None, description="Step caching of the sampling; None: every block of every step ran."
    )

    def label(self) -> str:
        return f"{self.name}-{self.variant} {self.version}"


class Provenance(BaseModel):
    """Who asked for this video, with what, and with which software."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(min_length=1)
    campaign: str | None = None
    subject_ref: str | None = Field(default=None, description="Opaque subject id; NOT biometric data.")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = None
    model: ModelInfo = Field(default_factory=ModelInfo)
    settings: dict[str, Any] = Field(default_factory=dict, description="Generation settings (no secrets).")
    inputs: tuple[InputArtifact, ...] = ()
    subject: dict[str, Any] = Field(
        default_factory=dict,
        description="The subject's photos by sha256, with their scores and what each was used for "
        "(no pixels, no embedding).",
    )
    software: dict[str, str] = Field(default_factory=collect_software_versions)

    @property
    def title(self) -> str:
        return f"{self.campaign} / {self.job_id}" if self.campaign else f"lynx / {self.job_id}"

    def container_tags(self) -> dict[str, str]:
        """Tags written into every video container (title, job, model, seed, AI label)."""
        tags = {
            "title": self.title,
            "comment": "AI-generated",
            "job_id": self.job_id,
            "model": self.model.label(),
        }
        if self.seed is not None:
            tags["seed"] = str(self.seed)
        if self.campaign:
            tags["campaign"] = self.campaign
        return tags


def public_settings(settings: BaseModel) -> dict[str, Any]:
    """A settings object as JSON-ready values, secrets left out entirely (not even masked)."""
    dumped = settings.model_dump(mode="json")
    return {
        name: value for name, value in dumped.items() if not isinstance(getattr(settings, name), SecretStr)
    }
