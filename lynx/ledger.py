"""The job ledger: what a job has finished, and what a re-run or a retry of it still has to do.

Plain functions over the tracking database (a ``Tracker``) and the artifact store; the stages call
them and the tests call them alone. Stored work counts only while it verifies: its object is in
the store and its bytes hash to the sha256 the tracking database recorded for it
(``LYNX_LEDGER_VERIFY=checksum``, reading them in full) or at least the store's own record of the
object says so (``record``, no download). The rules:

- **Delivered means deliverables that verify.** A job completed or held for review was delivered
  by the last completed ``deliver`` row of its attempt; every file that row lists must verify
  against its live artifact row. A job whose files do not is failed at stage ``deliver`` naming
  what is wrong, and what is left of its files is withdrawn (``reopen_undelivered``), so the run
  that found it delivers it again; it is never reported completed with dangling keys.
- **A decoded video is delivered, not made again.** The newest completed ``decode`` row of any
  attempt whose lossless intermediate still verifies is the job's video (``stored_video``): a
  retried job goes straight to delivery and no GPU stage runs for it. An intermediate that does
  not verify is deleted and its row marked deleted; without one the job is generated again.
- **Sampling resumes from the newest checkpoint that verifies** (``latest_checkpoint``). Checkpoint
  keys name the job, not the attempt (``checkpoint_key``), so any later attempt finds them. They
  derive from the subject's face, so they are recorded as biometric artifacts of the subject (kind
  ``sampling_checkpoint``: the retention purge and an erasure find them) and dropped once the
  decoded video is stored (``drop_checkpoints``). ``store_checkpoint`` records a checkpoint's row
  before writing its object and deletes the older checkpoints only after the new one is stored: a
  process killed at any moment leaves no object without a row and always a whole checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lynx.db.models import Artifact, ArtifactKind, Job, JobStatus, StageRun, StageStatus
from lynx.db.tracking import Tracker
from lynx.errors import ArtifactNotFoundError, ChecksumMismatchError, IllegalTransitionError
from lynx.jobs import CandidateVideo, GpuJobResult
from lynx.media.provenance import sha256_file
from lynx.store import ArtifactStore, StoredObject
from lynx.store.base import CHUNK_SIZE

log = logging.getLogger(__name__)

Verification = Literal["checksum", "record"]
CHECKPOINT_CONTENT_TYPE = "application/vnd.lynx.sampling-checkpoint"
DELIVERED = (JobStatus.COMPLETED, JobStatus.NEEDS_REVIEW)
# Problems named in a job's error text; the rest are counted.
_SHOWN_PROBLEMS = 3


def verify(
    store: ArtifactStore, key: str, sha256: str, size: int, *, how: Verification = "checksum"
) -> str | None:
    """None when the object under ``key`` holds the recorded bytes, else what is wrong with it.

    ``how="record"`` trusts the store's record of the object's sha256 and size; ``"checksum"``
    also reads every byte and hashes it. A store that does not answer raises
    (``ServiceUnavailableError``): an outage is not evidence that work is lost.
    """
    try:
        record = store.stat(key)
    except ArtifactNotFoundError:
        return "missing"
    if record.sha256 != sha256 or record.size != size:
        return "replaced by other bytes"
    if how == "checksum":
        try:
            with store.open_read(key) as reader:
                while reader.read(CHUNK_SIZE):
                    pass
        except ArtifactNotFoundError:
            return "missing"
        except ChecksumMismatchError:
            return "corrupt"
    return None


def discard(tracker: Tracker, store: ArtifactStore, rows: Sequence[Artifact]) -> None:
    """Delete the rows' objects, then mark the rows deleted (a failure leaves the rows live)."""
    for row in rows:
        store.delete(row.key)
    tracker.mark_artifacts_deleted([row.id for row in rows])


def _newest(rows: Sequence[StageRun], stage: str, attempt: int | None = None) -> list[StageRun]:
    """Completed rows of ``stage`` (of ``attempt``, if given), newest first."""
    return [
        row
        for row in reversed(rows)
        if row.stage == stage
        and row.status is StageStatus.COMPLETED
        and (attempt is None or row.attempt == attempt)
    ]


# --- deliverables ----------------------------------------------------------------------------------
def undelivered(
    tracker: Tracker, store: ArtifactStore, job: Job, *, how: Verification = "checksum"
) -> list[str]:
    """What is wrong with a delivered job's files ("<key> missing", ...); empty when all verify."""
    delivery = next(iter(_newest(tracker.stage_runs(job.id), "deliver", job.attempt)), None)
    if delivery is None:
        return [f"no completed delivery of attempt {job.attempt} is recorded"]
    live = {row.key: row for row in tracker.list_artifacts(job_id=job.id) if row.key in delivery.output_keys}
    problems = []
    for key in delivery.output_keys:
        row = live.get(key)
        problem = "not recorded" if row is None else verify(store, key, row.sha256, row.size, how=how)
        if problem is not None:
            problems.append(f"{key} {problem}")
    return problems


def reopen_undelivered(
    tracker: Tracker, store: ArtifactStore, job_id: int, *, how: Verification = "checksum"
) -> Job:
    """Fail a completed (or held) job whose deliverables do not all verify; returns the job as it is now.

    What is left of its files is withdrawn first (objects deleted, rows marked deleted), so a job
    that is not completed never keeps a partial delivery; the failure names the damaged files. A job
    in any other status, or whose files verify, is returned unchanged.
    """
    job = tracker.get_job(job_id)
    if job.status not in DELIVERED:
        return job
    problems = undelivered(tracker, store, job, how=how)
    if not problems:
        return job
    delivery = next(iter(_newest(tracker.stage_runs(job.id), "deliver", job.attempt)), None)
    keys = set(delivery.output_keys) if delivery is not None else set()
    discard(tracker, store, [row for row in tracker.list_artifacts(job_id=job.id) if row.key in keys])
    text = "deliverables missing or corrupt: " + "; ".join(problems[:_SHOWN_PROBLEMS])
    if len(problems) > _SHOWN_PROBLEMS:
        text += f" (and {len(problems) - _SHOWN_PROBLEMS} more)"
    was = job.status.value
    try:
        job = tracker.transition_job(job.id, JobStatus.FAILED, error_stage="deliver", error_text=text)
    except IllegalTransitionError:  # another run found it first
        return tracker.get_job(job.id)
    log.warning("job %s was %s, but %s: it is failed and retried", job.id, was, text)
    return job


# --- the decoded video -----------------------------------------------------------------------------
def video_of(decode: StageRun) -> GpuJobResult:
    """The decoded video a completed ``decode`` row records (key, frames, rate, model, upscaling)."""
    metrics = decode.metrics
    return GpuJobResult(
        job_id=decode.job_id,
        status="completed",
        intermediate_key=decode.output_keys[0],
        candidates=[
            CandidateVideo(seed=item["seed"], intermediate_key=item["key"])
            for item in metrics.get("candidates", [])
        ],
        frames=metrics.get("frames"),
        fps=metrics.get("fps"),
        variant=metrics.get("variant"),
        model_version=metrics.get("model_version"),
        upscaled=metrics.get("upscaled"),
        loras=metrics.get("loras") or [],
        step_cache=metrics.get("step_cache"),
    )


def stored_video(
    tracker: Tracker, store: ArtifactStore, job_id: int, *, how: Verification = "checksum"
) -> GpuJobResult | None:
    """The job's newest decoded video that still verifies, from any attempt; None if there is none.

    A job with several candidates counts as decoded only while every candidate's video verifies.
    Intermediates that no longer verify are deleted and their rows marked deleted on the way (with
    the other candidates of that decode, which cannot be delivered without it).
    """
    frames = {row.key: row for row in tracker.list_artifacts(job_id=job_id, kind=ArtifactKind.FRAMES)}
    for decode in _newest(tracker.stage_runs(job_id), "decode"):
        rows = [frames.get(key) for key in decode.output_keys]
        if not rows or any(row is None for row in rows):  # deleted since, or never recorded
            continue
        problems = [(row, verify(store, row.key, row.sha256, row.size, how=how)) for row in rows]
        bad = [(row, problem) for row, problem in problems if problem is not None]
        if not bad:
            return video_of(decode)
        for row, problem in bad:
            log.warning("job %s: decoded video %s is %s; dropped", job_id, row.key, problem)
        discard(tracker, store, rows)
    return None


# --- sampling checkpoints --------------------------------------------------------------------------
def checkpoint_key(job_id: int, steps_done: int, batch: str = "") -> str:
    """Where the job's checkpoint after ``steps_done`` steps is stored (the same for every attempt);
    ``batch`` names one batch of a job's candidates, each checkpointed on its own."""
    return f"{_checkpoint_prefix(job_id, batch)}step-{steps_done:05d}.safetensors"


def _checkpoint_prefix(job_id: int, batch: str) -> str:
    return f"checkpoints/job-{job_id}/" + (f"{batch}/" if batch else "")


def _checkpoints(tracker: Tracker, job_id: int, batch: str | None) -> list[Artifact]:
    """The job's checkpoint rows, oldest first: all of them (``batch`` None) or one batch's."""
    rows = tracker.list_artifacts(job_id=job_id, kind=ArtifactKind.SAMPLING_CHECKPOINT)
    if batch is None:
        return rows
    prefix = _checkpoint_prefix(job_id, batch)
    return [row for row in rows if row.key.startswith(prefix) and "/" not in row.key[len(prefix) :]]


def store_checkpoint(
    tracker: Tracker, store: ArtifactStore, job_id: int, path: Path, steps_done: int, *, batch: str = ""
) -> StoredObject:
    """Store a checkpoint file of the job (of its candidate ``batch``), then delete the older ones
    of that batch.

    The row comes first: a process killed mid-upload leaves a row without an object (found and
    dropped by ``latest_checkpoint``), never an object that retention would not know of.
    """
    sha256, size = sha256_file(path), path.stat().st_size
    key = checkpoint_key(job_id, steps_done, batch)
    expected = StoredObject(key, sha256, size, CHECKPOINT_CONTENT_TYPE)
    row = tracker.record_artifact(expected, kind=ArtifactKind.SAMPLING_CHECKPOINT, job_id=job_id)
    try:
        stored = store.put_file(path, key=key, content_type=CHECKPOINT_CONTENT_TYPE)
    except BaseException:
        tracker.mark_artifacts_deleted([row.id])
        raise
    older = [other for other in _checkpoints(tracker, job_id, batch) if other.id != row.id]
    # an older row of this very key (an attempt that checkpointed the same step) names the new object
    discard(tracker, store, [other for other in older if other.key != key])
    tracker.mark_artifacts_deleted([other.id for other in older if other.key == key])
    return stored


def latest_checkpoint(
    tracker: Tracker, store: ArtifactStore, job_id: int, dest: Path, *, batch: str = ""
) -> Artifact | None:
    """Download the job's newest checkpoint (of candidate ``batch``) that verifies to ``dest``;
    returns its row, or None.

    A checkpoint whose object is missing (a write that never finished) or damaged is dropped and
    the next older one tried.
    """
    for row in reversed(_checkpoints(tracker, job_id, batch)):
        try:
            stored = store.get_file(row.key, dest)
        except ArtifactNotFoundError:
            problem = "missing"
        except ChecksumMismatchError:
            problem = "corrupt"
        else:
            if stored.sha256 == row.sha256 and stored.size == row.size:
                return row
            problem = "replaced by other bytes"
        log.warning("job %s: sampling checkpoint %s is %s; dropped", job_id, row.key, problem)
        discard(tracker, store, [row])
    return None


def drop_checkpoints(
    tracker: Tracker, store: ArtifactStore, job_id: int, *, batch: str | None = None
) -> int:
    """Delete the job's checkpoints (every one by default: its video is stored; or one candidate
    batch's); returns how many there were."""
    rows = _checkpoints(tracker, job_id, batch)
    discard(tracker, store, rows)
    return len(rows)
