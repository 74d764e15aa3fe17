"""Typed requests and results of the pipeline: what crosses task and flow boundaries.

Only object keys and small parameters travel between flows (a GPU flow run may live on another
machine); tensors and images stay in the artifact store and are fetched by key. Every model here
is pydantic, so Prefect validates flow parameters against it and shows its schema in the UI.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lynx.media.spec import Upscaled

Variant = Literal["full", "lite"]
JobState = Literal["completed", "failed", "cancelled", "needs_review", "running"]

_SUBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class GenerationSettings(BaseModel):
    """How one video is made. Defaults are the Lynx release's (480x832, 50 steps, g=5, g_id=2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(
        default=42, ge=0, lt=2**31, description="Initial-noise seed; the reference uses seed+1."
    )
    frames: int | None = Field(
        default=None,
        ge=1,
        le=1025,
        description="Frames (4k+1). Unset: the variant's default (81 full, 121 lite).",
    )
    height: int = Field(default=480, ge=16, le=2048, description="Height in pixels (multiple of 16).")
    width: int = Field(default=832, ge=16, le=2048, description="Width in pixels (multiple of 16).")
    steps: int = Field(default=50, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(default=5.0, ge=0, description="Text guidance scale.")
    guidance_scale_id: float | None = Field(
        default=2.0, ge=0, description="Identity guidance scale (full variant); null: two-pass guidance."
    )
    ip_scale: float = Field(default=1.0, ge=0, description="Strength of the identity adapter.")
    ref_scale: float = Field(default=1.0, ge=0, description="Strength of the reference adapter (full only).")
    negative_prompt: str | None = Field(
        default=None, description="Negative prompt. Unset: Wan's default negative prompt."
    )
    variant: Variant | None = Field(
        default=None, description="'full' or 'lite'. Unset: LYNX_MODEL_VARIANT / the adapter folder."
    )

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, value: int | None) -> int | None:
        if value is not None and value % 4 != 1:
            raise ValueError(f"frames must be 4k+1 (e.g. 9, 17, 81, 121), got {value}")
        return value

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"must be a multiple of 16, got {value}")
        return value

    def job_params(self) -> dict[str, Any]:
        """What identifies the video besides subject and prompts (the negative prompt has its own column)."""
        return self.model_dump(mode="json", exclude={"negative_prompt"})


class SubjectSpec(BaseModel):
    """A person to generate: a photo plus the consent and retention that allow keeping it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str | None = Field(
        default=None,
        description="Stable subject id (letters, digits, '.', '_', '-'); the same id is the same person "
        "across jobs and campaigns. Unset: a new subject per request.",
    )
    photo: str = Field(min_length=1, description="Local path (uploaded first) or artifact-store key.")
    name: str | None = Field(default=None, description="Display name. Default: the id or 'subject'.")
    consent_reference: str | None = Field(default=None, description="Where the consent is recorded.")
    retention_until: datetime | None = Field(
        default=None,
        description="When the biometric data must be gone. Default: LYNX_SUBJECT_RETENTION_DAYS.",
    )

    @field_validator("id")
    @classmethod
    def _plain_id(cls, value: str | None) -> str | None:
        if value is not None and not _SUBJECT_ID.match(value):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '.', '_', '-'")
        return value

    @property
    def display_name(self) -> str:
        return self.name or self.id or "subject"


class GenerationRequest(BaseModel):
    """One job: a subject, a prompt and settings, optionally inside a campaign."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: SubjectSpec
    prompt: str = Field(min_length=1, max_length=4000)
    settings: GenerationSettings = Field(default_factory=GenerationSettings)
    campaign: str | None = None


class FaceOutputs(BaseModel):
    """Where the face stage put a subject's biometric artifacts, and what produced them."""

    model_config = ConfigDict(frozen=True)

    embedding_key: str
    id_crop_key: str
    ref_crop_key: str
    embedding_model: str
    embedding_dim: int
    det_score: float
    box: list[float]  # the chosen (largest) face, [x1, y1, x2, y2] in photo pixels after EXIF rotation
    faces_detected: int


class JobTicket(BaseModel):
    """A job as it moves through the CPU-side stages; the flows pass it from task to task.

    A ticket whose ``status`` is set has left the pipeline (failed, cancelled, completed, or left
    to another run): later stages hand it on untouched. What it produced is read back from the
    tracking database (``JobOutcome``), so the ticket carries only what the next stage needs.
    """

    job_id: int | None = Field(
        description="None for a request refused before a job could be recorded (its subject was purged)."
    )
    attempt: int
    subject_id: int | None
    subject_ref: str
    campaign_id: int | None = None
    campaign: str | None = None
    prompt: str
    settings: GenerationSettings
    photo_key: str
    face: FaceOutputs | None = None
    video: GpuJobResult | None = None
    status: JobState | None = None
    error_stage: str | None = None
    error_text: str | None = None

    @property
    def active(self) -> bool:
        return self.status is None

    @property
    def needs_gpu(self) -> bool:
        """Still in the pipeline and without a decoded video (one stored earlier goes to delivery)."""
        return self.active and self.video is None

    def as_failed(self, stage: str, text: str) -> JobTicket:
        return self.model_copy(update={"status": "failed", "error_stage": stage, "error_text": text})

    def for_gpu(self) -> GpuJobSpec:
        if self.face is None:
            raise ValueError(f"job {self.job_id} has no face stage outputs yet")
        return GpuJobSpec(
            job_id=self.job_id,
            attempt=self.attempt,
            subject_id=self.subject_id,
            prompt=self.prompt,
            settings=self.settings,
            face=self.face,
        )


class GpuJobSpec(BaseModel):
    """What the GPU stages need of one job: keys of its inputs and its settings."""

    model_config = ConfigDict(frozen=True)

    job_id: int
    attempt: int
    subject_id: int
    prompt: str
    settings: GenerationSettings
    face: FaceOutputs


class GpuBatchRequest(BaseModel):
    """Parameters of one GPU flow run: jobs that share a model (one load for all of them)."""

    model_config = ConfigDict(frozen=True)

    jobs: list[GpuJobSpec] = Field(min_length=1)
    variant: Variant | None = None

    @property
    def job_ids(self) -> list[int]:
        return [job.job_id for job in self.jobs]


class GpuJobResult(BaseModel):
    """How the GPU stages ended for one job, read back from the tracking database."""

    model_config = ConfigDict(frozen=True)

    job_id: int
    status: Literal["completed", "failed", "cancelled"]
    intermediate_key: str | None = None
    frames: int | None = None
    fps: float | None = None
    variant: Variant | None = None
    model_version: str | None = None
    upscaled: Upscaled | None = Field(
        default=None, description="Real-ESRGAN run by the decode stage: the intermediate is at delivery size."
    )
    error_stage: str | None = None
    error_text: str | None = None


class JobOutcome(BaseModel):
    """The end of one job as users see it: one row of the campaign summary, the result of `lynx`."""

    model_config = ConfigDict(frozen=True)

    job_id: int | None = Field(description="None for a request refused before a job could be recorded.")
    subject: str
    prompt: str
    status: JobState
    attempt: int
    master_key: str | None = None
    manifest_key: str | None = None
    deliverable_url: str | None = None
    similarity: float | None = None
    error_stage: str | None = None
    error_text: str | None = None
    earlier: bool = Field(default=False, description="Completed by an earlier run; nothing was redone.")
