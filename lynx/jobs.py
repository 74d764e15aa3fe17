"""Typed requests and results of the pipeline: what crosses task and flow boundaries.

Only object keys and small parameters travel between flows (a GPU flow run may live on another
machine); tensors and images stay in the artifact store and are fetched by key. Every model here
is pydantic, so Prefect validates flow parameters against it and shows its schema in the UI.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lynx.media.provenance import LoraRecord, StepCacheRecord
from lynx.media.spec import Upscaled

Variant = Literal["full", "lite"]
JobState = Literal["completed", "failed", "cancelled", "needs_review", "running"]

_SUBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Photos one subject may have: enough for several angles and lightings, few enough to embed at once.
MAX_PHOTOS = 8
#: Candidates (seeds) one job may sample: each costs a whole video's sampling.
MAX_CANDIDATES = 16


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
    candidates: int = Field(
        default=1,
        ge=1,
        le=MAX_CANDIDATES,
        description="Videos to sample, with seeds seed..seed+N-1; the one that resembles the subject "
        "most (the quality gate's metric) becomes the master.",
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

    @model_validator(mode="after")
    def _seeds_in_range(self) -> GenerationSettings:
        if self.seed + self.candidates - 1 >= 2**31:
            raise ValueError(f"seed + candidates - 1 must stay below 2**31, got seed {self.seed}")
        return self

    def job_params(self) -> dict[str, Any]:
        """What identifies the video besides subject and prompts (the negative prompt has its own column).

        One candidate is left out: jobs recorded before candidates existed keep their identity.
        """
        exclude = {"negative_prompt"} | ({"candidates"} if self.candidates == 1 else set())
        return self.model_dump(mode="json", exclude=exclude)

    @property
    def candidate_seeds(self) -> list[int]:
        """The seeds of the job's candidates: seed, seed + 1, ..."""
        return [self.seed + index for index in range(self.candidates)]


class SubjectSpec(BaseModel):
    """A person to generate: one or more photos plus the consent and retention that allow keeping them.

    ``photo: a.jpg`` (one photo, as before several were possible) and ``photos: [a.jpg, b.jpg]``
    are both accepted; either way the photos end up in ``photos``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str | None = Field(
        default=None,
        description="Stable subject id (letters, digits, '.', '_', '-'); the same id is the same person "
        "across jobs and campaigns. Unset: a new subject per request.",
    )
    photos: tuple[str, ...] = Field(
        min_length=1,
        max_length=MAX_PHOTOS,
        description="Photos of the person, each a local path (uploaded first) or an artifact-store key; "
        "their faces must be the same person. One photo may be given as `photo`.",
    )
    name: str | None = Field(default=None, description="Display name. Default: the id or 'subject'.")
    consent_reference: str | None = Field(default=None, description="Where the consent is recorded.")
    retention_until: datetime | None = Field(
        default=None,
        description="When the biometric data must be gone. Default: LYNX_SUBJECT_RETENTION_DAYS.",
    )

    @model_validator(mode="before")
    @classmethod
    def _photo_or_photos(cls, value: Any) -> Any:
        if not isinstance(value, dict) or "photo" not in value:
            if isinstance(value, dict) and "photos" not in value:
                raise ValueError("give photo (a path or store key) or photos (a list of them)")
            return value
        if "photos" in value:
            raise ValueError("give photo or photos, not both")
        photo = value["photo"]
        rest = {key: item for key, item in value.items() if key != "photo"}
        return {**rest, "photos": [photo] if isinstance(photo, str) else photo}

    @field_validator("id")
    @classmethod
    def _plain_id(cls, value: str | None) -> str | None:
        if value is not None and not _SUBJECT_ID.match(value):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '.', '_', '-'")
        return value

    @field_validator("photos")
    @classmethod
    def _named_photos(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, photo in enumerate(value):
            if not photo.strip():
                raise ValueError(f"photo {index + 1} is an empty string")
        if len(set(value)) != len(value):
            raise ValueError("the same photo is listed twice")
        return value

    @property
    def photo(self) -> str:
        """The first photo (where a subject has one, its photo)."""
        return self.photos[0]

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


class SubjectPhoto(BaseModel):
    """One photo of the subject as the face stage judged it: its checksum and scores, no pixels or
    embedding (the manifest and the stage row show these)."""

    model_config = ConfigDict(frozen=True)

    key: str
    sha256: str
    det_score: float = Field(description="Detector score of the photo's largest face.")
    reference_score: float = Field(
        description="Detector score x size x frontality: the best photo gives the reference crop."
    )
    consistency: float | None = Field(
        default=None, description="Mean cosine with the subject's other photos (None with one photo)."
    )
    similarity: float = Field(description="Cosine with the identity embedding the job conditions on.")


class FaceOutputs(BaseModel):
    """Where the face stage put a subject's biometric artifacts, and what produced them.

    With several photos, ``embedding_key`` is the identity made from all of them (``fusion``) and
    the crops, box and score are those of the reference photo (``photos[reference_photo]``).
    """

    model_config = ConfigDict(frozen=True)

    embedding_key: str
    id_crop_key: str
    ref_crop_key: str
    embedding_model: str
    embedding_dim: int
    det_score: float
    box: list[float]  # the chosen (largest) face, [x1, y1, x2, y2] in photo pixels after EXIF rotation
    faces_detected: int
    photos: list[SubjectPhoto] = Field(default_factory=list)
    reference_photo: int = 0
    fusion: Literal["fuse", "best"] | None = Field(
        default=None, description="How several photos became one identity; None for one photo."
    )


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
    photo_keys: list[str] = Field(default_factory=list)
    photo_names: list[str] = Field(
        default_factory=list, description="The photos as the request named them (for error messages)."
    )
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

    @property
    def photo_key(self) -> str:
        """The subject's first photo ("" for a request refused before its photos were stored)."""
        return self.photo_keys[0] if self.photo_keys else ""

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


class CandidateVideo(BaseModel):
    """One candidate of a job with several: its seed and where its decoded video is."""

    model_config = ConfigDict(frozen=True)

    seed: int
    intermediate_key: str


class GpuJobResult(BaseModel):
    """How the GPU stages ended for one job, read back from the tracking database."""

    model_config = ConfigDict(frozen=True)

    job_id: int
    status: Literal["completed", "failed", "cancelled"]
    intermediate_key: str | None = None
    candidates: list[CandidateVideo] = Field(
        default_factory=list, description="Every candidate's video, for a job with several (else empty)."
    )
    frames: int | None = None
    fps: float | None = None
    variant: Variant | None = None
    model_version: str | None = None
    upscaled: Upscaled | None = Field(
        default=None, description="Real-ESRGAN run by the decode stage: the intermediate is at delivery size."
    )
    loras: list[LoraRecord] = Field(default_factory=list, description="LoRA files fused into the DiT.")
    step_cache: StepCacheRecord | None = Field(
        default=None, description="The step cache of the sampling and the block-forwards it skipped."
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
    candidates: int = Field(default=1, description="Videos sampled for the job; the best is the master.")
    seed: int | None = Field(default=None, description="Seed of the delivered master.")
    score: float | None = Field(
        default=None,
        description="Identity score of the chosen candidate (the quality gate's metric), for a job with "
        "several candidates; None with one, or when no candidate showed a face.",
    )
    error_stage: str | None = None
    error_text: str | None = None
    earlier: bool = Field(default=False, description="Completed by an earlier run; nothing was redone.")
