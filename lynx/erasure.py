"""Erasure on request: a subject's photos and everything derived from them, gone from store and database.

Beside the retention purge (``lynx.retention``), a data subject may ask to be forgotten now.
``erase_subject`` removes, across every campaign:

* **objects**: every object recorded as an artifact of the subject or of one of its jobs, whatever
  its kind (photos, face embeddings and crops, identity tokens, reference features, intermediates,
  sampling checkpoints, kinds added later), every object under one of its jobs' key prefixes
  (``JOB_PREFIXES``, recorded or not) and every key a stage row of its jobs names. Kept are prompt
  embeddings (made from the prompt text alone), objects also recorded for another subject
  (identical bytes share a content-addressed key; retention does the same) and, unless
  ``with_deliverables``, the delivered files (and the evaluation reports of the subject's
  campaigns, which show frames of its videos);
* **rows and fields**: the artifact rows of the erased objects, the evaluations of the subject's
  jobs and photos, the identity measurements of its jobs' stage rows (the face stage's box and
  scores, the evaluate stage's and the deliver stage's similarities), and the subject's photo
  fields. The subject row stays, marked ``erased_at``, so that new jobs are refused with "subject
  ID was erased on DATE"; its jobs stay as history (prompts, settings, statuses, timings).

It ends with a **receipt** (``ErasureReceipt``: what was removed and kept, counts and keys, when; no
pixels, embeddings or scores) stored in the ``erasures`` table and in the store under
``erasures/``.

**Crash safety.** Steps, each safe to repeat: (1) mark the subject erased and open an erasure row
(no new job or artifact is accepted for it from then on); (2) plan the keys and save the plan in
the row, before anything is deleted; (3) delete the objects (deleting a missing one is fine); (4)
write the receipt object; (5) in one transaction, delete and clear the rows and close the erasure.
A run killed anywhere is finished by the next ``erase_subject``, which takes up the open row and
its saved plan; erasing an erased subject again removes what may have appeared since (or the
deliverables, when asked for now) and otherwise returns the last receipt.

Jobs of the subject still pending or running are failed ("subject ... was erased") rather than
waited for: a run still working on one finds its next write refused, and the stages delete an
object they stored but could not record, so nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import delete, or_, select, update

from lynx.db.models import (
    Artifact,
    ArtifactKind,
    Campaign,
    Erasure,
    Evaluation,
    Job,
    JobStatus,
    StageRun,
    Subject,
    utcnow,
)
from lynx.db.tracking import Tracker
from lynx.errors import ArtifactNotFoundError, IllegalTransitionError, NotFoundError
from lynx.media.publish import deliverable_prefix
from lynx.settings import LynxSettings
from lynx.store import ArtifactStore, open_store

log = logging.getLogger(__name__)

RECEIPT_SCHEMA = "lynx.erasure/1"
RECEIPTS_PREFIX = "erasures"
#: Key prefixes that hold one job's objects, whether or not each object is recorded.
JOB_PREFIXES = ("intermediates/job-{job_id}/",)
#: Kinds derived from the prompt text alone: shared by every subject, nothing of the person in them.
TEXT_ONLY_KINDS = frozenset({ArtifactKind.PROMPT_EMBEDS.value})
#: Kinds of the delivered files: erased only with ``with_deliverables``.
DELIVERABLE_KINDS = frozenset(
    {ArtifactKind.VIDEO.value, ArtifactKind.PREVIEW.value, ArtifactKind.MANIFEST.value}
)
#: Stage-row metrics that measure the subject's identity (in its photos or its videos).
IDENTITY_METRICS = {
    "face": None,  # every metric: the box, detector score and per-photo scores of the face in a photo
    "evaluate": None,  # every metric: similarities of the video to the subject
    "deliver": ("similarity", "score", "candidates", "quality_gate"),
}
_SUBJECT_NUMBER = re.compile(r"^(?:subject-)?(\d+)$")


class ErasureReceipt(BaseModel):
    """What an erasure removed and kept: keys and counts, never pixels, embeddings or scores."""

    schema_: str = Field(default=RECEIPT_SCHEMA, alias="schema")
    erasure_id: int
    subject: str
    subject_id: int
    requested_at: datetime
    finished_at: datetime | None = None
    with_deliverables: bool
    jobs: list[int] = Field(default_factory=list, description="The subject's jobs (rows kept as history).")
    removed_keys: list[str] = Field(default_factory=list)
    removed_by_kind: dict[str, int] = Field(default_factory=dict)
    removed_bytes: int = 0
    kept_deliverables: list[str] = Field(default_factory=list, description="Kept: not asked to erase them.")
    kept_shared: list[str] = Field(
        default_factory=list, description="Kept: also recorded for another subject."
    )
    kept_text_only: int = Field(default=0, description="Prompt embeddings kept: made from text alone.")
    rows_deleted: dict[str, int] = Field(default_factory=dict)
    fields_cleared: list[str] = Field(default_factory=list)
    jobs_stopped: list[int] = Field(
        default_factory=list, description="Jobs failed because they were running."
    )
    receipt_key: str | None = None
    already_erased: bool = Field(default=False, description="Nothing was left: the last receipt, unchanged.")

    model_config = {"populate_by_name": True}

    @property
    def objects_removed(self) -> int:
        return len(self.removed_keys)


def find_subject(tracker: Tracker, ref: str) -> Subject:
    """The subject users call ``ref``: its id (external ref), or ``subject-N`` / ``N`` for row N."""
    subject = tracker.find_subject(ref)
    if subject is not None:
        return subject
    number = _SUBJECT_NUMBER.match(ref)
    if number is not None:
        try:
            return tracker.get_subject(int(number.group(1)))
        except NotFoundError:
            pass
    raise NotFoundError(f"no subject {ref!r}; `lynx subject list` shows the subjects")


def erase_subject(
    settings: LynxSettings,
    ref: str,
    *,
    with_deliverables: bool = False,
    tracker: Tracker | None = None,
    store: ArtifactStore | None = None,
    flow_run_id: str | None = None,
) -> ErasureReceipt:
    """Erase the subject ``ref`` (see the module docstring); safe to run again after any crash."""
    own_tracker = tracker is None
    tracker = tracker or Tracker.from_settings(settings)
    store = store or open_store(settings)
    try:
        subject = find_subject(tracker, ref)
        store.check()  # fail before marking anything if the store is unreachable
        erasure, earlier = _open_erasure(tracker, subject.id, with_deliverables, flow_run_id)
        if erasure is None:  # erased before: anything left, or newly asked for?
            plan = _plan(tracker, store, subject.id, with_deliverables)
            if not plan.erase:
                return earlier.model_copy(update={"already_erased": True})
            erasure, _ = _open_erasure(tracker, subject.id, with_deliverables, flow_run_id, again=True)
        stopped = _stop_jobs(tracker, subject.id)
        plan = _plan(tracker, store, subject.id, erasure.with_deliverables)
        planned = _save_plan(tracker, erasure.id, plan)
        for entry in planned:  # (3) objects first: rows still point at them if this run dies
            store.delete(entry["key"])
        receipt = _receipt(erasure, subject, plan, planned, stopped)
        receipt_key = f"{RECEIPTS_PREFIX}/subject-{subject.id}/erasure-{erasure.id}.json"
        receipt = receipt.model_copy(update={"receipt_key": receipt_key})
        _finish(tracker, store, erasure.id, subject.id, planned, receipt)
        log.info(
            "erased subject %s: %d objects removed, %d deliverables and %d shared objects kept",
            receipt.subject,
            receipt.objects_removed,
            len(receipt.kept_deliverables),
            len(receipt.kept_shared),
        )
        return _receipt_of(tracker.transaction, erasure.id)
    finally:
        if own_tracker:
            tracker.close()


# --- (1) the erasure row ---------------------------------------------------------------------------
def _open_erasure(
    tracker: Tracker,
    subject_id: int,
    with_deliverables: bool,
    flow_run_id: str | None,
    *,
    again: bool = False,
) -> tuple[Erasure | None, ErasureReceipt | None]:
    """The open erasure of the subject (resumed, or opened now), or (None, last receipt) when the
    subject is erased already and ``again`` is false."""
    with tracker.transaction() as session:
        subject = session.get(Subject, subject_id, with_for_update=True)
        rows = list(
            session.scalars(select(Erasure).where(Erasure.subject_id == subject_id).order_by(Erasure.id))
        )
        open_rows = [row for row in rows if row.finished_at is None]
        if open_rows:  # a run that died midway: finish it, with deliverables if either run asked
            erasure = open_rows[-1]
            erasure.with_deliverables = erasure.with_deliverables or with_deliverables
            erasure.flow_run_id = flow_run_id or erasure.flow_run_id
            return erasure, None
        if rows and not again:
            return None, ErasureReceipt.model_validate(rows[-1].receipt)
        now = utcnow()
        subject.erased_at = subject.erased_at or now
        erasure = Erasure(
            subject_id=subject_id,
            subject_ref=subject.ref,
            with_deliverables=with_deliverables,
            flow_run_id=flow_run_id,
            started_at=now,
        )
        session.add(erasure)
        session.flush()
        return erasure, None


def _stop_jobs(tracker: Tracker, subject_id: int) -> list[int]:
    """Fail the subject's jobs still pending or running: a run working on one is refused its next write."""
    stopped = []
    subject = tracker.get_subject(subject_id)
    for job in tracker.list_jobs(subject_id=subject_id):
        if job.status not in (JobStatus.PENDING, JobStatus.RUNNING):
            continue
        target = JobStatus.CANCELLED if job.status is JobStatus.PENDING else JobStatus.FAILED
        try:
            tracker.transition_job(
                job.id, target, error_stage="erasure", error_text=f"subject {subject.ref} was erased"
            )
            stopped.append(job.id)
        except IllegalTransitionError:  # it ended meanwhile
            continue
    return stopped


# --- (2) what to erase -----------------------------------------------------------------------------
class _Plan(BaseModel):
    erase: dict[str, dict[str, Any]] = Field(default_factory=dict)  # key -> {"kind", "size"}
    kept_deliverables: set[str] = Field(default_factory=set)
    kept_shared: set[str] = Field(default_factory=set)
    kept_text_only: set[str] = Field(default_factory=set)
    jobs: list[int] = Field(default_factory=list)


def _plan(tracker: Tracker, store: ArtifactStore, subject_id: int, with_deliverables: bool) -> _Plan:
    """Every key derived from the subject, sorted into erase and keep (see the module docstring)."""
    with tracker.transaction() as session:
        subject = session.get(Subject, subject_id)
        jobs = list(session.scalars(select(Job).where(Job.subject_id == subject_id).order_by(Job.id)))
        job_ids = [job.id for job in jobs]
        campaigns = {
            row.id: row.name
            for row in session.scalars(select(Campaign).where(Campaign.id.in_({j.campaign_id for j in jobs})))
        }
        owned = or_(Artifact.subject_id == subject_id, Artifact.job_id.in_(job_ids))
        rows = list(session.scalars(select(Artifact).where(owned)))
        stage_keys = [
            key
            for run in session.scalars(select(StageRun).where(StageRun.job_id.in_(job_ids)))
            for key in [*run.input_keys, *run.output_keys]
        ]
        reports = []
        if with_deliverables and campaigns:
            reports = list(
                session.scalars(
                    select(Artifact).where(
                        Artifact.kind == ArtifactKind.REPORT.value,
                        Artifact.campaign_id.in_(list(campaigns)),
                        Artifact.deleted_at.is_(None),
                    )
                )
            )
        photo_keys = [photo["key"] for photo in subject.photo_list]

    deliverable_prefixes = [
        deliverable_prefix(campaigns.get(job.campaign_id), str(job.id)) + "/" for job in jobs
    ]
    found: dict[str, dict[str, Any]] = {}
    for row in [*rows, *reports]:
        if row.deleted_at is not None and not store.exists(row.key):
            continue  # deleted before (e.g. sampling checkpoints once the video was stored)
        found.setdefault(row.key, {"kind": row.kind, "size": row.size})
    for key in [*photo_keys, *stage_keys]:
        found.setdefault(key, {"kind": None, "size": None})
    for prefix in [
        p.format(job_id=job_id) for job_id in job_ids for p in JOB_PREFIXES
    ] + deliverable_prefixes:
        for key in store.list(prefix):
            found.setdefault(key, {"kind": None, "size": None})

    shared = _shared_keys(tracker, list(found), subject_id)
    plan = _Plan(jobs=job_ids)
    for key, entry in sorted(found.items()):
        deliverable = entry["kind"] in DELIVERABLE_KINDS or entry["kind"] == ArtifactKind.REPORT.value
        deliverable = deliverable or any(key.startswith(prefix) for prefix in deliverable_prefixes)
        if entry["kind"] in TEXT_ONLY_KINDS:
            plan.kept_text_only.add(key)
        elif key in shared:
            plan.kept_shared.add(key)
        elif deliverable and not with_deliverables:
            if store.exists(key):
                plan.kept_deliverables.add(key)
        elif entry["kind"] is not None or store.exists(key):
            plan.erase[key] = {"kind": entry["kind"] or _kind_of(key), "size": entry["size"]}
    for key, entry in plan.erase.items():
        if entry["size"] is None:
            try:
                entry["size"] = store.stat(key).size
            except ArtifactNotFoundError:
                entry["size"] = 0
    return plan


def _kind_of(key: str) -> str:
    """The kind of an object no row records, from where it lies."""
    if key.startswith("intermediates/"):
        return ArtifactKind.FRAMES.value
    if key.startswith("deliverables/"):
        return "deliverable"
    return "unrecorded"


def _shared_keys(tracker: Tracker, keys: list[str], subject_id: int) -> set[str]:
    """Which keys are also recorded, live, for another subject."""
    if not keys:
        return set()
    with tracker.transaction() as session:
        return set(
            session.scalars(
                select(Artifact.key).where(
                    Artifact.key.in_(keys),
                    Artifact.deleted_at.is_(None),
                    Artifact.subject_id.is_not(None),
                    Artifact.subject_id != subject_id,
                )
            )
        )


def _save_plan(tracker: Tracker, erasure_id: int, plan: _Plan) -> list[dict[str, Any]]:
    """Merge the plan into the erasure row's (an earlier run's keys stay planned); return it all."""
    with tracker.transaction() as session:
        erasure = session.get(Erasure, erasure_id, with_for_update=True)
        planned = {entry["key"]: entry for entry in erasure.planned}
        for key, entry in plan.erase.items():
            planned.setdefault(key, {"key": key, **entry})
        erasure.planned = sorted(planned.values(), key=lambda entry: entry["key"])
        return list(erasure.planned)


# --- (4, 5) receipt and rows -----------------------------------------------------------------------
def _receipt(
    erasure: Erasure, subject: Subject, plan: _Plan, planned: list[dict[str, Any]], stopped: list[int]
) -> ErasureReceipt:
    by_kind: dict[str, int] = {}
    for entry in planned:
        by_kind[entry["kind"]] = by_kind.get(entry["kind"], 0) + 1
    return ErasureReceipt(
        erasure_id=erasure.id,
        subject=subject.ref,
        subject_id=subject.id,
        requested_at=erasure.started_at,
        with_deliverables=erasure.with_deliverables,
        jobs=plan.jobs,
        removed_keys=[entry["key"] for entry in planned],
        removed_by_kind=dict(sorted(by_kind.items())),
        removed_bytes=sum(entry["size"] or 0 for entry in planned),
        kept_deliverables=sorted(plan.kept_deliverables),
        kept_shared=sorted(plan.kept_shared),
        kept_text_only=len(plan.kept_text_only),
        jobs_stopped=stopped,
    )


def _finish(
    tracker: Tracker,
    store: ArtifactStore,
    erasure_id: int,
    subject_id: int,
    planned: list[dict[str, Any]],
    receipt: ErasureReceipt,
) -> None:
    """Write the receipt object, then delete and clear the rows and close the erasure, in one transaction."""
    keys = [entry["key"] for entry in planned]
    with tracker.transaction() as session:
        subject = session.get(Subject, subject_id, with_for_update=True)
        job_ids = list(session.scalars(select(Job.id).where(Job.subject_id == subject_id)))
        erased_sha256 = set(
            session.scalars(
                select(Artifact.sha256).where(
                    Artifact.key.in_(keys),
                    or_(Artifact.subject_id == subject_id, Artifact.job_id.in_(job_ids)),
                )
            )
        )
        photo_sha256 = [photo["sha256"] for photo in subject.photo_list]
        references = set(photo_sha256) | ({subject.reference_set_sha256} if photo_sha256 else set())
        references |= set(
            session.scalars(
                select(Artifact.sha256).where(
                    Artifact.subject_id == subject_id, Artifact.kind == ArtifactKind.REFERENCE_PHOTO.value
                )
            )
        )
        owned = or_(Artifact.subject_id == subject_id, Artifact.job_id.in_(job_ids))
        artifacts = session.execute(delete(Artifact).where(Artifact.key.in_(keys), owned)).rowcount
        # rows of objects deleted before the erasure (sampling checkpoints once their video was
        # stored): nothing to remove from the store, but their row still names derived data
        artifacts += session.execute(
            delete(Artifact).where(
                owned,
                Artifact.deleted_at.is_not(None),
                Artifact.kind.not_in(sorted(TEXT_ONLY_KINDS)),
            )
        ).rowcount
        evaluations = session.execute(
            delete(Evaluation).where(
                or_(
                    Evaluation.job_id.in_(job_ids),
                    Evaluation.reference_sha256.in_(references),
                    Evaluation.video_sha256.in_(erased_sha256),
                )
            )
        ).rowcount
        cleared = 0
        for run in session.scalars(
            select(StageRun).where(StageRun.job_id.in_(job_ids), StageRun.stage.in_(list(IDENTITY_METRICS)))
        ):
            names = IDENTITY_METRICS[run.stage]
            kept = {} if names is None else {k: v for k, v in run.metrics.items() if k not in names}
            if kept != run.metrics:
                run.metrics = kept
                cleared += 1
        # objects that were the campaign's (evaluation reports), not the subject's: rows marked deleted
        session.execute(
            update(Artifact)
            .where(Artifact.key.in_(keys), Artifact.deleted_at.is_(None))
            .values(deleted_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        subject.photos = None
        subject.reference_key = None
        subject.reference_sha256 = None
        finished = receipt.model_copy(
            update={
                "finished_at": utcnow(),
                "rows_deleted": {"artifacts": artifacts, "evaluations": evaluations},
                "fields_cleared": [
                    "subjects.photos",
                    "subjects.reference_key",
                    "subjects.reference_sha256",
                    f"stage_runs.metrics (identity measurements of {cleared} stage rows)",
                ],
            }
        )
        document = finished.model_dump(mode="json", by_alias=True)
        # the receipt object first: a run that dies before the commit writes the same key again
        store.put_bytes(
            json.dumps(document, indent=2).encode("utf-8"),
            key=finished.receipt_key,
            content_type="application/json",
        )
        session.execute(
            update(Erasure)
            .where(Erasure.id == erasure_id)
            .values(receipt=document, receipt_key=finished.receipt_key, finished_at=finished.finished_at)
        )


def _receipt_of(transaction: Any, erasure_id: int) -> ErasureReceipt:
    with transaction() as session:
        return ErasureReceipt.model_validate(session.get(Erasure, erasure_id).receipt)


# --- reading ---------------------------------------------------------------------------------------
def subject_status(subject: Subject, erasures: Iterable[Erasure] = ()) -> str:
    """One word or phrase for a subject's state: active, purged, erased, or an erasure under way."""
    if any(erasure.finished_at is None for erasure in erasures):
        return "erasure under way (run `lynx subject erase` again to finish it)"
    if subject.erased_at is not None:
        return f"erased on {subject.erased_at:%Y-%m-%d}"
    if subject.purged_at is not None:
        return f"purged on {subject.purged_at:%Y-%m-%d} (retention)"
    return "active"


def erasures_of(tracker: Tracker, subject_id: int) -> list[Erasure]:
    with tracker.transaction() as session:
        rows = list(
            session.scalars(select(Erasure).where(Erasure.subject_id == subject_id).order_by(Erasure.id))
        )
        session.expunge_all()
        return rows
