"""The run-tracking service that tasks and flows call: subjects, campaigns, jobs, stage runs,
artifacts, compute events and the queries behind a campaign summary.

Every method is one short transaction. Job status changes are compare-and-swap updates on
``Job.version`` (``UPDATE ... WHERE id = ? AND version = ?``), re-validated against the latest
row when they lose a race, so two workers updating the same job never overwrite each other.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lynx.db.models import (
    BIOMETRIC_KINDS,
    JOB_TRANSITIONS,
    Artifact,
    ArtifactKind,
    Campaign,
    CampaignStatus,
    ComputeEvent,
    Job,
    JobStatus,
    StageRun,
    StageStatus,
    Subject,
    utcnow,
)
from lynx.errors import IllegalTransitionError, InputError, NotFoundError, ServiceUnavailableError
from lynx.outage import Spool, ride_out
from lynx.settings import LynxSettings
from lynx.store.base import StoredObject

log = logging.getLogger(__name__)
T = TypeVar("T")

_TERMINAL_TIMESTAMPED = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.NEEDS_REVIEW}
# A compare-and-swap loses only when another writer changed the row in between; after this many
# losses in a row something is hammering one job and we would rather say so than spin.
_MAX_CAS_ROUNDS = 50


_replaying = contextvars.ContextVar("lynx_replaying_spool", default=False)
# Job endings a failed write spools for later (a completion is not: its stage fails and is redone).
_SPOOLED_ENDINGS = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})


def tracking_spool_path(settings: LynxSettings) -> Path:
    """Where this machine keeps the endings its tracker could not write (one file per database)."""
    database = hashlib.sha256(settings.resolved_database_url.encode()).hexdigest()[:16]
    return settings.home / "spool" / f"tracking-{database}.jsonl"


def job_fingerprint(
    subject_id: int, prompt: str, negative_prompt: str | None, params: dict[str, Any] | None
) -> str:
    """Identity of a job within a campaign: same subject, prompts and parameters => same job."""
    canonical = json.dumps(
        {"subject": subject_id, "prompt": prompt, "negative": negative_prompt or "", "params": params or {}},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ComputeCounts:
    computed: int = 0
    reused: int = 0


@dataclass(frozen=True)
class StageTiming:
    runs: int
    total_s: float
    mean_s: float
    max_s: float


@dataclass(frozen=True)
class JobFailure:
    job_id: int
    attempt: int
    error_stage: str | None
    error_text: str | None


@dataclass(frozen=True)
class CampaignSummary:
    campaign_id: int
    name: str
    status: CampaignStatus
    jobs_by_status: dict[JobStatus, int]
    needs_review_job_ids: list[int]
    failures: list[JobFailure]
    stage_timings: dict[str, StageTiming]
    compute: dict[str, ComputeCounts]

    @property
    def total_jobs(self) -> int:
        return sum(self.jobs_by_status.values())


@dataclass
class StageRecorder:
    """Handed out by ``Tracker.stage``: fill in outputs and metrics, they are saved on exit."""

    stage_run_id: int
    output_keys: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    status: StageStatus = StageStatus.COMPLETED


class Tracker:
    """Run tracking over one ``sessionmaker``. Returned ORM objects are detached snapshots."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        retention_days: int = 30,
        outage_tolerance: float = 0.0,
        spool: Spool | None = None,
    ) -> None:
        self._sessions = sessions
        self._retention = timedelta(days=retention_days)
        #: seconds each public call keeps retrying while the database is unreachable (lynx.outage)
        self.outage_tolerance = outage_tolerance
        self._spool = spool
        self._attempts: dict[int, int] = {}  # the attempt of each job as last seen, for the spool

    @classmethod
    def from_settings(cls, settings: LynxSettings, *, migrate: bool = True) -> Tracker:
        """A tracker on ``settings``' database, schema brought to head first (unless ``migrate=False``)."""
        from lynx.db.engine import session_factory
        from lynx.db.migrate import ensure_schema

        if migrate:
            ensure_schema(settings)
        return cls(
            session_factory(settings),
            retention_days=settings.subject_retention_days,
            outage_tolerance=settings.outage_tolerance_seconds,
            spool=Spool(tracking_spool_path(settings)),
        )

    # --- outages -------------------------------------------------------------------------------
    def _spool_ending(self, method: str, arguments: dict[str, Any]) -> None:
        """Keep a write that records how a stage or job ended, which the database could not take
        within the tolerance, to be replayed when it answers again (``replay_spooled``)."""
        if self._spool is None or _replaying.get():  # a replayed write that fails stays spooled as it is
            return
        if method == "record_stage_finish":
            pass
        elif method == "transition_job" and JobStatus(arguments["to_status"]) in _SPOOLED_ENDINGS:
            arguments["attempt"] = self._attempts.get(arguments["job_id"])
        else:
            return
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in arguments.items() if k != "self"}
        self._spool.add({"call": method, **values})
        log.warning("tracking database out of reach: %s %s spooled to %s", method, values, self._spool.path)

    def replay_spooled(self) -> int:
        """Apply the endings spooled while the database was out of reach; returns how many."""
        if self._spool is None or _replaying.get() or not self._spool.pending():
            return 0
        token = _replaying.set(True)  # the calls replay makes must not replay (the spool is locked)
        try:
            applied = self._spool.replay(self._apply_spooled)
        finally:
            _replaying.reset(token)
        if applied:
            log.info("recorded %d stage or job ending(s) spooled during a database outage", applied)
        return applied

    def _apply_spooled(self, record: dict[str, Any]) -> bool:
        record = dict(record)
        call = record.pop("call")
        if call == "record_stage_finish":  # only a row still running is closed (guarded update)
            self.record_stage_finish(**record)
            return True
        attempt = record.pop("attempt", None)
        job = self.get_job(record["job_id"])
        if job.status is not JobStatus.RUNNING or (attempt is not None and job.attempt != attempt):
            log.info("spooled %s of job %s overtaken: now %s", call, job.id, job.status.value)
            return False
        self.transition_job(**record)
        return True

    def ride_out(self, call: Callable[[], T], what: str = "tracking database") -> T:
        """``call()`` (one short transaction of the caller's, e.g. over ``transaction()``), repeated
        while the database is unreachable, for at most ``outage_tolerance`` seconds."""
        return ride_out(call, tolerance=self.outage_tolerance, what=what)

    def close(self) -> None:
        """Close the connection pool (the tracker's engine)."""
        bind = self._sessions.kw.get("bind")
        if bind is not None:
            bind.dispose()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception."""
        with self._sessions.begin() as session:
            yield session

    # --- subjects ------------------------------------------------------------------------------
    def create_subject(
        self,
        name: str,
        *,
        external_ref: str | None = None,
        reference: StoredObject | None = None,
        photos: Sequence[StoredObject] = (),
        consent_reference: str | None = None,
        consent_given_at: datetime | None = None,
        retention_until: datetime | None = None,
    ) -> Subject:
        """Register a person. Without ``retention_until`` their biometric data is kept for
        ``LYNX_SUBJECT_RETENTION_DAYS`` days. Their ``photos`` (or one ``reference`` photo) are
        recorded as biometric artifacts; the first is the subject's ``reference_key``."""
        now = utcnow()
        subject = Subject(
            name=name,
            external_ref=external_ref,
            consent_reference=consent_reference,
            consent_given_at=consent_given_at or (now if consent_reference else None),
            retention_until=retention_until or now + self._retention,
        )
        photos = list(photos) or ([reference] if reference is not None else [])
        with self.transaction() as session:
            session.add(subject)
            try:
                session.flush()
            except IntegrityError:
                raise InputError(f"a subject with external_ref {external_ref!r} already exists") from None
            if photos:
                self._attach_photos(session, subject, photos)
        return subject

    def get_subject(self, subject_id: int) -> Subject:
        with self._sessions() as session:
            return _get(session, Subject, subject_id)

    def find_subject(self, external_ref: str) -> Subject | None:
        with self._sessions() as session:
            return session.scalar(select(Subject).where(Subject.external_ref == external_ref))

    def list_subjects(self) -> list[Subject]:
        with self._sessions() as session:
            return list(session.scalars(select(Subject).order_by(Subject.id)))

    def set_subject_reference(self, subject_id: int, reference: StoredObject) -> Subject:
        """Point a subject at one reference photo (recorded as a biometric artifact)."""
        return self.set_subject_photos(subject_id, [reference])

    def set_subject_photos(self, subject_id: int, photos: Sequence[StoredObject]) -> Subject:
        """Give a subject these photos, in this order (each recorded as a biometric artifact)."""
        if not photos:
            raise InputError("a subject needs at least one photo")
        with self.transaction() as session:
            subject = _get(session, Subject, subject_id)
            check_not_purged(subject)
            self._attach_photos(session, subject, photos)
        return subject

    def _attach_photos(self, session: Session, subject: Subject, photos: Sequence[StoredObject]) -> None:
        subject.reference_key = photos[0].key
        subject.reference_sha256 = photos[0].sha256
        subject.photos = [{"key": photo.key, "sha256": photo.sha256} for photo in photos]
        recorded = set(
            session.scalars(
                select(Artifact.key).where(
                    Artifact.subject_id == subject.id,
                    Artifact.kind == ArtifactKind.REFERENCE_PHOTO.value,
                    Artifact.deleted_at.is_(None),
                )
            )
        )
        for photo in {photo.key: photo for photo in photos}.values():
            if photo.key not in recorded:
                session.add(_artifact_row(photo, ArtifactKind.REFERENCE_PHOTO, subject_id=subject.id))

    # --- campaigns -----------------------------------------------------------------------------
    def get_or_create_campaign(self, name: str, *, spec: dict[str, Any] | None = None) -> Campaign:
        """The campaign called ``name``; created with ``spec`` if new, returned unchanged if not."""
        with self.transaction() as session:
            existing = session.scalar(select(Campaign).where(Campaign.name == name))
            if existing is not None:
                return existing
            campaign = Campaign(name=name, spec=spec or {})
            try:
                with session.begin_nested():
                    session.add(campaign)
            except IntegrityError:  # created by someone else a moment ago
                return session.scalars(select(Campaign).where(Campaign.name == name)).one()
            return campaign

    def get_campaign(self, campaign: int | str) -> Campaign:
        with self._sessions() as session:
            return _campaign(session, campaign)

    def set_campaign_status(self, campaign_id: int, status: CampaignStatus | str) -> Campaign:
        with self.transaction() as session:
            campaign = _get(session, Campaign, campaign_id)
            campaign.status = CampaignStatus(status)
        return campaign

    # --- jobs ----------------------------------------------------------------------------------
    def get_or_create_job(
        self,
        *,
        subject_id: int,
        prompt: str,
        params: dict[str, Any] | None = None,
        negative_prompt: str | None = None,
        campaign_id: int | None = None,
    ) -> tuple[Job, bool]:
        """The job for this subject x prompt x params (in this campaign), and whether it is new.

        Re-running a campaign therefore finds its jobs, with their status, instead of duplicating them.
        """
        fingerprint = job_fingerprint(subject_id, prompt, negative_prompt, params)
        same_job = (
            select(Job)
            .where(Job.fingerprint == fingerprint)
            .where(Job.campaign_id.is_(None) if campaign_id is None else Job.campaign_id == campaign_id)
        )
        with self.transaction() as session:
            existing = session.scalar(same_job)
            if existing is not None:
                return existing, False
            check_not_purged(_get(session, Subject, subject_id))
            job = Job(
                campaign_id=campaign_id,
                subject_id=subject_id,
                prompt=prompt,
                negative_prompt=negative_prompt,
                params=params or {},
                fingerprint=fingerprint,
            )
            try:
                with session.begin_nested():
                    session.add(job)
            except IntegrityError:  # another worker created it between our SELECT and INSERT
                return session.scalars(same_job).one(), False
            return job, True

    def get_job(self, job_id: int) -> Job:
        with self._sessions() as session:
            return _get(session, Job, job_id)

    def list_jobs(
        self,
        *,
        campaign_id: int | None = None,
        subject_id: int | None = None,
        status: JobStatus | str | None = None,
    ) -> list[Job]:
        query = select(Job).order_by(Job.id)
        if campaign_id is not None:
            query = query.where(Job.campaign_id == campaign_id)
        if subject_id is not None:
            query = query.where(Job.subject_id == subject_id)
        if status is not None:
            query = query.where(Job.status == JobStatus(status))
        with self._sessions() as session:
            return list(session.scalars(query))

    def transition_job(
        self,
        job_id: int,
        to_status: JobStatus | str,
        *,
        error_stage: str | None = None,
        error_text: str | None = None,
    ) -> Job:
        """Move a job to ``to_status`` if its current status allows it (see ``JOB_TRANSITIONS``).

        Side effects by target: running sets started_at; completed/failed/cancelled/needs_review set
        finished_at; pending (a retry) adds one to ``attempt`` and clears the last error;
        needs_review raises the ``needs_review`` flag. Raises ``IllegalTransitionError`` otherwise.
        """
        target = JobStatus(to_status)
        for _ in range(_MAX_CAS_ROUNDS):
            with self.transaction() as session:
                job = _get(session, Job, job_id)
                allowed = JOB_TRANSITIONS[job.status]
                if target not in allowed:
                    raise IllegalTransitionError(
                        f"job {job_id} cannot go from {job.status.value} to {target.value}; allowed from "
                        f"{job.status.value}: {', '.join(sorted(s.value for s in allowed)) or 'none'}"
                    )
                values = _transition_values(job, target, error_stage, error_text)
                swapped = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.version == job.version)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if swapped == 1:
                    session.refresh(job)
                    log.debug("job %s: %s", job_id, target.value)
                    return job
            # Lost the race: someone changed the job since we read it. Re-read and re-decide.
        raise IllegalTransitionError(
            f"job {job_id} changed {_MAX_CAS_ROUNDS} times while moving it to {target.value}"
        )

    # --- stage runs ----------------------------------------------------------------------------
    def record_stage_start(
        self,
        job_id: int,
        stage: str,
        *,
        inputs: Sequence[str] = (),
        flow_run_id: str | None = None,
        owner: str | None = None,
    ) -> StageRun:
        with self.transaction() as session:
            job = _get(session, Job, job_id)
            run = StageRun(
                job_id=job_id,
                stage=stage,
                attempt=job.attempt,
                input_keys=list(inputs),
                flow_run_id=flow_run_id,
                owner=owner,
                started_at=utcnow(),
            )
            session.add(run)
        return run

    def record_stage_finish(
        self,
        stage_run_id: int,
        *,
        status: StageStatus | str = StageStatus.COMPLETED,
        outputs: Sequence[str] = (),
        metrics: dict[str, Any] | None = None,
        error_text: str | None = None,
        duration_s: float | None = None,
    ) -> StageRun:
        """Close a stage run. ``duration_s`` defaults to finish minus start (wall clock)."""
        final = StageStatus(status)
        if final is StageStatus.RUNNING:
            raise IllegalTransitionError("a stage run cannot finish with status 'running'")
        with self.transaction() as session:
            run = _get(session, StageRun, stage_run_id)
            finished_at = utcnow()
            # Compare-and-swap on the status: of two concurrent finishes exactly one wins.
            swapped = session.execute(
                update(StageRun)
                .where(StageRun.id == stage_run_id, StageRun.status == StageStatus.RUNNING)
                .values(
                    finished_at=finished_at,
                    status=final,
                    duration_s=(
                        duration_s
                        if duration_s is not None
                        else (finished_at - run.started_at).total_seconds()
                    ),
                    output_keys=list(outputs),
                    metrics=dict(metrics or {}),
                    error_text=error_text,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            session.refresh(run)
            if swapped != 1:
                raise IllegalTransitionError(
                    f"stage run {stage_run_id} ({run.stage}) already finished as {run.status.value}"
                )
        return run

    @contextmanager
    def stage(
        self,
        job_id: int,
        stage: str,
        *,
        inputs: Sequence[str] = (),
        flow_run_id: str | None = None,
        owner: str | None = None,
    ) -> Iterator[StageRecorder]:
        """Record a stage around a block: failed with the error's text if the block raises."""
        run = self.record_stage_start(job_id, stage, inputs=inputs, flow_run_id=flow_run_id, owner=owner)
        recorder = StageRecorder(run.id)
        started = time.monotonic()
        try:
            yield recorder
        except BaseException as err:
            self.record_stage_finish(
                run.id,
                status=StageStatus.FAILED,
                outputs=recorder.output_keys,
                metrics=recorder.metrics,
                error_text=f"{type(err).__name__}: {err}",
                duration_s=time.monotonic() - started,
            )
            raise
        self.record_stage_finish(
            run.id,
            status=recorder.status,
            outputs=recorder.output_keys,
            metrics=recorder.metrics,
            duration_s=time.monotonic() - started,
        )

    def stage_runs(self, job_id: int) -> list[StageRun]:
        with self._sessions() as session:
            return list(
                session.scalars(select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.id))
            )

    # --- artifacts -----------------------------------------------------------------------------
    def record_artifact(
        self,
        stored: StoredObject,
        *,
        kind: ArtifactKind | str,
        job_id: int | None = None,
        subject_id: int | None = None,
        campaign_id: int | None = None,
    ) -> Artifact:
        """Record that ``stored`` belongs to a job/subject/campaign. Owners missing from the call are
        taken from the job, so retention finds every biometric artifact by its subject; a biometric
        kind without a subject or job is refused (``InputError``): nothing would ever purge it."""
        kind = _artifact_kind(kind)
        if kind in BIOMETRIC_KINDS and subject_id is None and job_id is None:
            raise biometric_without_subject_error(kind)
        with self.transaction() as session:
            if job_id is not None:
                job = _get(session, Job, job_id)
                subject_id = subject_id if subject_id is not None else job.subject_id
                campaign_id = campaign_id if campaign_id is not None else job.campaign_id
            if subject_id is not None:
                subject = _get(session, Subject, subject_id)
                if kind in BIOMETRIC_KINDS or subject.erased_at is not None:
                    check_not_purged(subject)
            if campaign_id is not None:
                _get(session, Campaign, campaign_id)
            row = _artifact_row(stored, kind, job_id=job_id, subject_id=subject_id, campaign_id=campaign_id)
            session.add(row)
        return row

    def record_job_outputs(
        self, files: Sequence[tuple[StoredObject, ArtifactKind | str]], *, job_id: int
    ) -> list[Artifact]:
        """Record files a job published, all in one transaction (all rows or none). A live row of the
        job for the same key (a retried stage publishing again) is marked deleted: one live row per key."""
        rows = []
        with self.transaction() as session:
            job = _get(session, Job, job_id)
            subject = _get(session, Subject, job.subject_id)
            if subject.erased_at is not None or any(
                _artifact_kind(kind) in BIOMETRIC_KINDS for _, kind in files
            ):
                check_not_purged(subject)
            _mark_deleted(
                session,
                (Artifact.job_id == job_id) & Artifact.key.in_([stored.key for stored, _ in files]),
                utcnow(),
            )
            for stored, kind in files:
                owners = {"job_id": job_id, "subject_id": job.subject_id, "campaign_id": job.campaign_id}
                rows.append(_artifact_row(stored, _artifact_kind(kind), **owners))
            session.add_all(rows)
        return rows

    def mark_artifacts_deleted(self, artifact_ids: Sequence[int], now: datetime | None = None) -> None:
        """Record that these artifacts' objects were deleted from the store."""
        with self.transaction() as session:
            _mark_deleted(session, Artifact.id.in_(list(artifact_ids)), now or utcnow())

    def list_artifacts(
        self,
        *,
        job_id: int | None = None,
        subject_id: int | None = None,
        campaign_id: int | None = None,
        kind: ArtifactKind | str | None = None,
        include_deleted: bool = False,
    ) -> list[Artifact]:
        query = select(Artifact).order_by(Artifact.id)
        for column, value in (
            (Artifact.job_id, job_id),
            (Artifact.subject_id, subject_id),
            (Artifact.campaign_id, campaign_id),
        ):
            if value is not None:
                query = query.where(column == value)
        if kind is not None:
            query = query.where(Artifact.kind == _artifact_kind(kind).value)
        if not include_deleted:
            query = query.where(Artifact.deleted_at.is_(None))
        with self._sessions() as session:
            return list(session.scalars(query))

    # --- compute events ------------------------------------------------------------------------
    def record_compute_event(
        self,
        kind: str,
        cache_key: str,
        *,
        reused: bool,
        job_id: int | None = None,
        campaign_id: int | None = None,
        duration_s: float | None = None,
    ) -> ComputeEvent:
        """Count one result of stage ``kind``: computed now (``reused=False``) or taken from a cache."""
        with self.transaction() as session:
            if job_id is not None and campaign_id is None:
                campaign_id = _get(session, Job, job_id).campaign_id
            event = ComputeEvent(
                kind=kind,
                cache_key=cache_key,
                reused=reused,
                job_id=job_id,
                campaign_id=campaign_id,
                duration_s=duration_s,
            )
            session.add(event)
        return event

    def compute_counts(
        self, *, campaign_id: int | None = None, job_id: int | None = None
    ) -> dict[str, ComputeCounts]:
        query = select(ComputeEvent.kind, ComputeEvent.reused, func.count()).group_by(
            ComputeEvent.kind, ComputeEvent.reused
        )
        if campaign_id is not None:
            query = query.where(ComputeEvent.campaign_id == campaign_id)
        if job_id is not None:
            query = query.where(ComputeEvent.job_id == job_id)
        counts: dict[str, dict[str, int]] = {}
        with self._sessions() as session:
            for kind, reused, n in session.execute(query):
                counts.setdefault(kind, {"computed": 0, "reused": 0})["reused" if reused else "computed"] += n
        return {kind: ComputeCounts(**c) for kind, c in sorted(counts.items())}

    # --- summaries -----------------------------------------------------------------------------
    def campaign_summary(self, campaign: int | str) -> CampaignSummary:
        with self._sessions() as session:
            row = _campaign(session, campaign)
            by_status = dict(
                session.execute(
                    select(Job.status, func.count()).where(Job.campaign_id == row.id).group_by(Job.status)
                ).all()
            )
            review = list(
                session.scalars(
                    select(Job.id).where(Job.campaign_id == row.id, Job.needs_review).order_by(Job.id)
                )
            )
            failures = [
                JobFailure(job.id, job.attempt, job.error_stage, job.error_text)
                for job in session.scalars(
                    select(Job)
                    .where(Job.campaign_id == row.id, Job.status == JobStatus.FAILED)
                    .order_by(Job.id)
                )
            ]
            timings = {
                stage: StageTiming(runs, float(total or 0), float(mean or 0), float(longest or 0))
                for stage, runs, total, mean, longest in session.execute(
                    select(
                        StageRun.stage,
                        func.count(),
                        func.sum(StageRun.duration_s),
                        func.avg(StageRun.duration_s),
                        func.max(StageRun.duration_s),
                    )
                    .join(Job, Job.id == StageRun.job_id)
                    .where(Job.campaign_id == row.id, StageRun.status == StageStatus.COMPLETED)
                    .group_by(StageRun.stage)
                    .order_by(StageRun.stage)
                )
            }
        return CampaignSummary(
            campaign_id=row.id,
            name=row.name,
            status=row.status,
            jobs_by_status={status: by_status.get(status, 0) for status in JobStatus},
            needs_review_job_ids=review,
            failures=failures,
            stage_timings=timings,
            compute=self.compute_counts(campaign_id=row.id),
        )

    # --- retention -----------------------------------------------------------------------------
    def expired_subjects(self, now: datetime | None = None) -> list[Subject]:
        """Subjects whose retention has ended and whose biometric data is not purged yet."""
        now = now or utcnow()
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Subject)
                    .where(Subject.retention_until <= now, Subject.purged_at.is_(None))
                    .order_by(Subject.id)
                )
            )

    def live_keys_outside(self, keys: Sequence[str], subject_id: int) -> set[str]:
        """Which of ``keys`` are also recorded, not deleted, for anything other than this subject."""
        if not keys:
            return set()
        query = select(Artifact.key).where(
            Artifact.key.in_(list(keys)),
            Artifact.deleted_at.is_(None),
            (Artifact.subject_id != subject_id) | Artifact.subject_id.is_(None),
        )
        with self._sessions() as session:
            return set(session.scalars(query))

    def mark_subject_purged(
        self, subject_id: int, artifact_ids: Sequence[int], now: datetime | None = None
    ) -> None:
        now = now or utcnow()
        with self.transaction() as session:
            _mark_deleted(session, Artifact.id.in_(list(artifact_ids)), now)
            _get(session, Subject, subject_id).purged_at = now


# Every public call is one short transaction (or a few, each safe to repeat): each rides out a
# database restart on its own. ``stage`` is not listed: its start and finish calls are.
_RIDDEN_OUT = (
    "create_subject", "get_subject", "find_subject", "list_subjects", "set_subject_photos",
    "get_or_create_campaign", "get_campaign", "set_campaign_status", "get_or_create_job", "get_job",
    "list_jobs", "transition_job", "record_stage_start", "record_stage_finish", "stage_runs",
    "record_artifact", "record_job_outputs", "mark_artifacts_deleted", "list_artifacts",
    "record_compute_event", "compute_counts", "campaign_summary", "expired_subjects",
    "live_keys_outside", "mark_subject_purged",
)


def _riding_out(method: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        def attempt() -> Any:
            self.replay_spooled()  # endings spooled in an earlier outage land before anything new
            return method(self, *args, **kwargs)

        try:
            what = f"tracking database ({method.__name__})"
            result = ride_out(attempt, tolerance=self.outage_tolerance, what=what)
        except ServiceUnavailableError as err:
            if err.transient:
                self._spool_ending(method.__name__, signature.bind(self, *args, **kwargs).arguments)
            raise
        for job in result if isinstance(result, list) else [result]:
            if isinstance(job, Job):
                self._attempts[job.id] = job.attempt
        return result

    return call


for _name in _RIDDEN_OUT:
    setattr(Tracker, _name, _riding_out(getattr(Tracker, _name)))


def _transition_values(
    job: Job, target: JobStatus, error_stage: str | None, error_text: str | None
) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {"status": target, "version": job.version + 1}
    if target is JobStatus.RUNNING:
        values.update(started_at=now, finished_at=None)
    elif target is JobStatus.PENDING:
        values.update(
            attempt=job.attempt + 1, started_at=None, finished_at=None, error_stage=None, error_text=None
        )
    elif target in _TERMINAL_TIMESTAMPED:
        values["finished_at"] = now
    if target is JobStatus.NEEDS_REVIEW:
        values["needs_review"] = True
    if target is not JobStatus.PENDING:
        if error_stage is not None:
            values["error_stage"] = error_stage
        if error_text is not None:
            values["error_text"] = error_text
    return values


def _mark_deleted(session: Session, which: Any, now: datetime) -> None:
    session.execute(
        update(Artifact)
        .where(which, Artifact.deleted_at.is_(None))
        .values(deleted_at=now)
        .execution_options(synchronize_session=False)
    )


def _artifact_kind(kind: ArtifactKind | str) -> ArtifactKind:
    try:
        return ArtifactKind(kind)
    except ValueError:
        raise InputError(
            f"unknown artifact kind {kind!r}; known kinds: {', '.join(k.value for k in ArtifactKind)}"
        ) from None


def _artifact_row(stored: StoredObject, kind: ArtifactKind, **owners: int | None) -> Artifact:
    return Artifact(
        key=stored.key,
        sha256=stored.sha256,
        size=stored.size,
        content_type=stored.content_type,
        kind=kind.value,
        biometric=kind in BIOMETRIC_KINDS,
        **owners,
    )


def _get(session: Session, model: type, row_id: int) -> Any:
    row = session.get(model, row_id)
    if row is None:
        raise NotFoundError(f"no {model.__tablename__[:-1].replace('_', ' ')} with id {row_id}")
    return row


def _campaign(session: Session, campaign: int | str) -> Campaign:
    if isinstance(campaign, int):
        return _get(session, Campaign, campaign)
    row = session.scalar(select(Campaign).where(Campaign.name == campaign))
    if row is None:
        raise NotFoundError(f"no campaign named {campaign!r}")
    return row


def biometric_without_subject_error(
    kind: ArtifactKind, *, options: tuple[str, str] = ("subject_id", "job_id")
) -> InputError:
    """The ``InputError`` that refuses a biometric artifact nobody's retention would purge."""
    return InputError(
        f"artifact kind {kind.value!r} is biometric data: give the {options[0]} (or {options[1]}) "
        "it belongs to, so that retention can purge it"
    )


def check_not_purged(subject: Subject) -> None:
    """Raise the ``InputError`` that refuses new work for a subject whose data is gone or going:
    erased on request (``lynx subject erase``), or purged after its retention ended."""
    if subject.erased_at is not None:
        raise InputError(f"subject {subject.ref} was erased on {subject.erased_at:%Y-%m-%d}")
    if subject.purged_at is not None:
        raise InputError(
            f"subject {subject.id} ({subject.name}) was purged at {subject.purged_at:%Y-%m-%d %H:%M} UTC "
            "after its retention ended; register the person again with fresh consent"
        )
