"""Run-tracking tables: who (subjects), what (campaigns, jobs), how it went (stage runs), what came
out (artifacts) and what was computed versus reused (compute events).

The schema is owned by the Alembic migrations in ``lynx/db/migrations``; a test checks that these
models and the migrations agree on PostgreSQL and SQLite.
"""

from __future__ import annotations

import enum
import hashlib
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names: Alembic needs them to alter or drop constraints, and SQLite's
# batch mode needs them to rebuild tables.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL keeps the zone; SQLite stores naive text and hands back naive datetimes, which would
    make ``retention_until < now`` comparisons fail or lie. Naive inputs are taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class JobStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NEEDS_REVIEW = "needs_review"


#: Where a job may go from each status. Anything else raises ``IllegalTransitionError``.
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.NEEDS_REVIEW}
    ),
    JobStatus.FAILED: frozenset({JobStatus.PENDING}),
    JobStatus.NEEDS_REVIEW: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    JobStatus.CANCELLED: frozenset({JobStatus.PENDING}),
    # A re-run that finds a completed job's deliverables missing or corrupt fails it (lynx.ledger).
    JobStatus.COMPLETED: frozenset({JobStatus.FAILED}),
}


class StageStatus(str, enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


class CampaignStatus(str, enum.Enum):
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class ArtifactKind(str, enum.Enum):
    REFERENCE_PHOTO = "reference_photo"
    FACE_EMBEDDING = "face_embedding"
    ID_CROP = "id_crop"
    REF_CROP = "ref_crop"
    REFERENCE_FEATURES = "reference_features"
    IDENTITY_TOKENS = "identity_tokens"
    PROMPT_EMBEDS = "prompt_embeds"
    LATENTS = "latents"
    FRAMES = "frames"
    VIDEO = "video"
    PREVIEW = "preview"
    MANIFEST = "manifest"
    REPORT = "report"
    SAMPLING_CHECKPOINT = "sampling_checkpoint"
    ERASURE_RECEIPT = "erasure_receipt"


#: Kinds that are biometric data of a subject: purged when the subject's retention ends.
BIOMETRIC_KINDS: frozenset[ArtifactKind] = frozenset(
    {
        ArtifactKind.REFERENCE_PHOTO,
        ArtifactKind.FACE_EMBEDDING,
        ArtifactKind.ID_CROP,
        ArtifactKind.REF_CROP,
        ArtifactKind.REFERENCE_FEATURES,
        ArtifactKind.IDENTITY_TOKENS,
        # latents of a video still being sampled, conditioned on the face: purged like it
        ArtifactKind.SAMPLING_CHECKPOINT,
    }
)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR + CHECK (not a native PG enum) so adding a value is a plain migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=20,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class Subject(Base):
    """A person whose likeness may be generated, with the consent and retention that allow it."""

    __tablename__ = "subjects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    external_ref: Mapped[str | None] = mapped_column(String(200), unique=True)
    # The photo the face stage takes its reference crop from by default: the first of ``photos``.
    reference_key: Mapped[str | None] = mapped_column(String(1024))
    reference_sha256: Mapped[str | None] = mapped_column(String(64))
    # Every photo of the person, in the order given: [{"key": ..., "sha256": ...}, ...]. NULL for
    # subjects registered before several photos were possible (their one photo is reference_key).
    photos: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    consent_given_at: Mapped[datetime | None]
    consent_reference: Mapped[str | None] = mapped_column(Text)
    # Biometric data (photo, crops, embeddings, reference features) must be gone after this.
    retention_until: Mapped[datetime | None] = mapped_column(index=True)
    purged_at: Mapped[datetime | None]
    # Set when an erasure was asked for (lynx subject erase): from then on no job may use the subject.
    erased_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    jobs: Mapped[list[Job]] = relationship(back_populates="subject")

    @property
    def ref(self) -> str:
        """How users name the subject: its external id, else ``subject-<id>``."""
        return self.external_ref or f"subject-{self.id}"

    @property
    def reference_set_sha256(self) -> str | None:
        """What stored evaluation metrics key the subject's photos on: its one photo's sha256, or for
        several the sha256 of their sha256s in order (another set of photos is another reference)."""
        shas = [photo["sha256"] for photo in self.photo_list]
        if len(shas) <= 1:
            return shas[0] if shas else None
        return hashlib.sha256("\n".join(shas).encode("ascii")).hexdigest()

    @property
    def photo_list(self) -> list[dict[str, str]]:
        """The subject's photos as ``[{"key", "sha256"}]``, also for subjects stored with one photo."""
        if self.photos:
            return list(self.photos)
        if self.reference_key and self.reference_sha256:
            return [{"key": self.reference_key, "sha256": self.reference_sha256}]
        return []


class Campaign(Base):
    """A named batch of jobs, usually many subjects x prompts from one spec file."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[CampaignStatus] = mapped_column(
        _enum(CampaignStatus, "campaign_status"), default=CampaignStatus.ACTIVE
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    jobs: Mapped[list[Job]] = relationship(back_populates="campaign")


class Job(Base):
    """One video to make: a subject x a prompt x generation settings."""

    __tablename__ = "jobs"
    __table_args__ = (
        # A re-run of a campaign finds its existing jobs by fingerprint instead of adding new ones.
        UniqueConstraint("campaign_id", "fingerprint"),
        # NULLs are distinct in unique constraints; jobs outside campaigns are deduplicated here.
        Index(
            "uq_jobs_fingerprint_no_campaign",
            "fingerprint",
            unique=True,
            postgresql_where=text("campaign_id IS NULL"),
            sqlite_where=text("campaign_id IS NULL"),
        ),
        Index("ix_jobs_campaign_id_status", "campaign_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.PENDING)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    error_stage: Mapped[str | None] = mapped_column(String(64))
    error_text: Mapped[str | None] = mapped_column(Text)
    needs_review: Mapped[bool] = mapped_column(Boolean, default=False)
    # Bumped by every status change; updates are compare-and-swap on it (see tracking.transition_job).
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    subject: Mapped[Subject] = relationship(back_populates="jobs")
    campaign: Mapped[Campaign | None] = relationship(back_populates="jobs")
    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="job", order_by="StageRun.id", cascade="all, delete-orphan", passive_deletes=True
    )


class StageRun(Base):
    """One attempt of one pipeline stage for one job: timing, inputs, outputs, metrics, error."""

    __tablename__ = "stage_runs"
    __table_args__ = (Index("ix_stage_runs_job_id_stage", "job_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(64))
    status: Mapped[StageStatus] = mapped_column(
        _enum(StageStatus, "stage_status"), default=StageStatus.RUNNING
    )
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    input_keys: Mapped[list[str]] = mapped_column(default=list)
    output_keys: Mapped[list[str]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error_text: Mapped[str | None] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    # host:pid:process start of the process that ran it (``lynx.liveness``)
    owner: Mapped[str | None] = mapped_column(String(300))

    job: Mapped[Job] = relationship(back_populates="stage_runs")


class Artifact(Base):
    """A stored object and what it belongs to. One object (key) may be recorded for several owners."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(1024), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32), index=True)
    biometric: Mapped[bool] = mapped_column(Boolean, default=False)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    subject_id: Mapped[int | None] = mapped_column(ForeignKey("subjects.id", ondelete="SET NULL"), index=True)
    campaign_id: Mapped[int | None] = mapped_column(
        ForeignKey("campaigns.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    deleted_at: Mapped[datetime | None]


class ComputeEvent(Base):
    """One stage result that was either computed or reused from a cache: lets flows and reports
    count real work (e.g. "face embeddings: 3 computed, 47 reused")."""

    __tablename__ = "compute_events"
    __table_args__ = (Index("ix_compute_events_campaign_id_kind", "campaign_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    cache_key: Mapped[str] = mapped_column(String(256))
    reused: Mapped[bool] = mapped_column(Boolean)
    duration_s: Mapped[float | None] = mapped_column(Float)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class Evaluation(Base):
    """Identity metrics of one video against one reference photo, by one recogniser at one stride.

    Per-video statistics only: the reference embeddings they were computed with are biometric
    data and never stored. Unique per (video bytes, reference bytes, recogniser, stride), so
    evaluating the same video again updates its row instead of adding one.
    """

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("video_sha256", "reference_sha256", "recognizer", "stride"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    video: Mapped[str] = mapped_column(String(1024))  # store key or local path it was read from
    video_sha256: Mapped[str] = mapped_column(String(64))
    reference_sha256: Mapped[str] = mapped_column(String(64))
    recognizer: Mapped[str] = mapped_column(String(200))
    stride: Mapped[int] = mapped_column(Integer)
    # Cosine statistics over sampled frames that show a face; NULL when none does.
    mean: Mapped[float | None] = mapped_column(Float)
    std: Mapped[float | None] = mapped_column(Float)
    min: Mapped[float | None] = mapped_column(Float)
    max: Mapped[float | None] = mapped_column(Float)
    frames_sampled: Mapped[int] = mapped_column(Integer)
    frames_with_face: Mapped[int] = mapped_column(Integer)
    face_share: Mapped[float] = mapped_column(Float)
    per_frame: Mapped[list[float | None]] = mapped_column(JSON, default=list)
    # Detector and recogniser configuration the numbers were measured with (a change re-measures).
    setup: Mapped[dict[str, Any]] = mapped_column(default=dict)
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class Erasure(Base):
    """One erasure of a subject's data on request (``lynx subject erase``), and its receipt.

    ``planned`` lists every key the erasure set out to delete, saved before the first delete, so a
    run that crashed midway is finished by the next one even after rows were gone. ``receipt`` is
    what was removed and kept (keys, counts, no biometric content); ``finished_at`` is NULL while
    the erasure is under way.
    """

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject_id: Mapped[int] = mapped_column(ForeignKey("subjects.id"), index=True)
    subject_ref: Mapped[str] = mapped_column(String(200))
    with_deliverables: Mapped[bool] = mapped_column(Boolean, default=False)
    planned: Mapped[list[str]] = mapped_column(default=list)
    receipt: Mapped[dict[str, Any]] = mapped_column(default=dict)
    receipt_key: Mapped[str | None] = mapped_column(String(1024))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    finished_at: Mapped[datetime | None]
