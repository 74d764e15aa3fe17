"""Stage rows, job failures and cancellations in the tracking database.

``run_stage`` is what every stage task runs its work in: it records a stage row, and when the work
fails for good it records the stage and the error on the job and hands back a failed ticket, so one
job's failure never takes the other jobs of a campaign down with it. Transient errors are re-raised
while Prefect still has retries left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from prefect.context import TaskRunContext
from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from lynx.db.models import JobStatus, StageRun, StageStatus, utcnow
from lynx.db.tracking import StageRecorder
from lynx.errors import IllegalTransitionError, LynxError
from lynx.settings import LynxSettings
from tasks.policy import is_transient, longest_stage_timeout, stage_timeout, timeout_setting
from tasks.services import services

log = logging.getLogger(__name__)

ACTIVE_STATUSES = (JobStatus.PENDING, JobStatus.RUNNING)
# Slack on top of a stage's timeout for a live run to record how the stage ended (retries, slow
# database); a run silent for longer than that is taken for dead (see ``silent_too_long``).
SILENCE_MARGIN_S = 600.0


class Ticket(Protocol):
    """Anything a stage runs for: a job id and whether the job is still in the pipeline."""

    job_id: int

    @property
    def active(self) -> bool: ...

    def as_failed(self, stage: str, text: str) -> Any: ...


TicketT = TypeVar("TicketT", bound=Ticket)


def current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def error_text(err: BaseException) -> str:
    """One line a user can act on: LynxErrors speak for themselves, other errors name their type."""
    if isinstance(err, LynxError):
        return str(err)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _retries_left() -> bool:
    context = TaskRunContext.get()
    if context is None:
        return False
    return context.task_run.run_count <= (context.task.retries or 0)


def run_stage(
    ticket: TicketT,
    stage: str,
    work: Callable[[StageRecorder], TicketT],
    *,
    inputs: Sequence[str] = (),
) -> TicketT:
    """Run ``work`` as stage ``stage`` of the ticket's job, recorded in ``stage_runs``.

    Inactive tickets pass through untouched. A failure that is final (not transient, or no retries
    left) marks the job failed with ``error_stage``/``error_text`` and returns
    ``ticket.as_failed(stage, text)``; a stage that runs past its timeout fails the same way,
    naming the setting.
    """
    if not ticket.active:
        return ticket
    tracker = services().tracker
    started = time.monotonic()
    try:
        with tracker.stage(
            ticket.job_id, stage, inputs=inputs, flow_run_id=current_flow_run_id()
        ) as recorder:
            return work(recorder)
    except BaseException as err:  # noqa: B036 - timeouts arrive as CancelledError (a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        if is_transient(err) and _retries_left():
            log.warning("job %s: %s failed on a transient error, retrying: %s", ticket.job_id, stage, err)
            raise
        timed_out = timeout_text(err, stage, started, f"{stage} stage", videos=getattr(ticket, "videos", 1))
        if timed_out is None and _is_cancellation(err):
            mark_cancelled([ticket.job_id])
            raise
        text = timed_out or error_text(err)
        if not isinstance(err, LynxError):
            log.exception("job %s: %s failed", ticket.job_id, stage)
        fail_job(ticket.job_id, stage, text)
        return ticket.as_failed(stage, text)


def _is_cancellation(err: BaseException) -> bool:
    import asyncio

    return isinstance(err, asyncio.CancelledError)


def timeout_text(
    err: BaseException,
    stage: str,
    started: float,
    what: str,
    settings: LynxSettings | None = None,
    *,
    videos: int = 1,
) -> str | None:
    """The one-line reason when ``err`` is the stage's timeout (``what`` names the work), else None.

    Prefect delivers a task's timeout as a cancellation, as it does a cancelled run: one that comes
    before the stage's timeout is up is the run being cancelled, not the stage timing out.
    """
    if not _is_cancellation(err):
        return None
    elapsed = time.monotonic() - started
    if elapsed < stage_timeout(stage, settings, videos=videos) * 0.99:
        return None
    return f"{what} timed out after {elapsed:.0f} s (setting: {timeout_setting(stage)})"


def fail_job(job_id: int, stage: str, text: str) -> None:
    """Record that the job failed in ``stage`` (a job that is no longer running is left as it is)."""
    tracker = services().tracker
    try:
        tracker.transition_job(job_id, JobStatus.FAILED, error_stage=stage, error_text=text)
    except IllegalTransitionError as err:
        log.warning("job %s not marked failed: %s", job_id, err)


def mark_cancelled(job_ids: Sequence[int]) -> list[int]:
    """Move the jobs that are still pending or running to cancelled; returns those moved."""
    tracker = services().tracker
    moved = []
    for job_id in job_ids:
        if tracker.get_job(job_id).status in ACTIVE_STATUSES:
            try:
                tracker.transition_job(job_id, JobStatus.CANCELLED, error_text="the flow run was cancelled")
                moved.append(job_id)
            except IllegalTransitionError:  # it finished in the meantime
                continue
    return moved


def jobs_of_flow_run(flow_run_id: str) -> list[int]:
    """Jobs that a flow run worked on: those with a stage row recorded under its id."""
    with services().tracker.transaction() as session:
        return list(
            session.scalars(
                select(StageRun.job_id)
                .where(StageRun.flow_run_id == flow_run_id)
                .distinct()
                .order_by(StageRun.job_id)
            )
        )


def last_activity(flow_run_id: str) -> StageRun | None:
    """The stage row with the newest start or finish among the jobs a flow run worked on (in the
    attempts it worked on), whichever run wrote it: its GPU runs record its jobs' GPU stages."""
    mine = aliased(StageRun)
    activity = func.coalesce(StageRun.finished_at, StageRun.started_at)
    with services().tracker.transaction() as session:
        return session.scalars(
            select(StageRun)
            .join(mine, (mine.job_id == StageRun.job_id) & (mine.attempt == StageRun.attempt))
            .where(mine.flow_run_id == flow_run_id)
            .order_by(activity.desc(), StageRun.id.desc())
            .limit(1)
        ).first()


def silent_too_long(flow_run_id: str, now: datetime | None = None) -> bool:
    """Whether a flow run that Prefect still calls running has died unreported.

    Prefect marks a run final only if something reports it: on the embedded server a run killed by
    SIGKILL, the OOM killer or a reboot (or one whose worker machine died) stays 'Running' for good.
    A live run ends every stage within the stage's timeout and starts the next stage within the
    longest one (waiting for a GPU batch or loading the model); past that, plus a margin, it is gone.
    """
    newest = last_activity(flow_run_id)
    if newest is None:
        return True
    if newest.status is StageStatus.RUNNING:
        videos = services().tracker.get_job(newest.job_id).params.get("candidates", 1)
        since, limit = newest.started_at, stage_timeout(newest.stage, videos=videos)
    else:
        since, limit = newest.finished_at or newest.started_at, longest_stage_timeout()
    return (now or utcnow()) - since > timedelta(seconds=limit + SILENCE_MARGIN_S)


def close_open_stages(job_id: int, text: str) -> None:
    """Stage rows left 'running' by a process that died are closed as failed."""
    tracker = services().tracker
    for run in tracker.stage_runs(job_id):
        if run.status is StageStatus.RUNNING:
            try:
                tracker.record_stage_finish(run.id, status=StageStatus.FAILED, error_text=text)
            except IllegalTransitionError:
                continue


def latest_stage(
    job_id: int, stage: str, *, attempt: int, status: StageStatus | None = None
) -> StageRun | None:
    """The newest row of ``stage`` for the job's ``attempt`` (optionally only with ``status``)."""
    rows = [
        run
        for run in services().tracker.stage_runs(job_id)
        if run.stage == stage and run.attempt == attempt and (status is None or run.status is status)
    ]
    return rows[-1] if rows else None


def request_cancellation(flow_run_id: Any, message: str) -> None:
    """Ask Prefect to cancel a flow run (its worker stops it and runs its cancellation hooks)."""
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message=message))


def cancel_child_runs(flow_run_id: Any) -> list[str]:
    """Ask Prefect to cancel the unfinished subflow runs (the GPU runs) of a flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
    unfinished = [child for child in children if child.state is not None and not child.state.is_final()]
    for child in unfinished:
        request_cancellation(child.id, "its parent flow run was cancelled")
    return [child.name for child in unfinished]


def cancel_flow_run_jobs(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_cancellation`` hook: the run's jobs end cancelled, and so do its GPU runs."""
    moved = mark_cancelled(jobs_of_flow_run(str(flow_run.id)))
    if moved:
        log.info("flow run %s cancelled: jobs %s marked cancelled", flow_run.name, moved)
    try:
        children = cancel_child_runs(flow_run.id)
    except Exception:  # the jobs are cancelled already; a GPU run left over finds them so
        log.warning("could not cancel the subflow runs of %s", flow_run.name, exc_info=True)
        return
    if children:
        log.info("flow run %s cancelled: GPU runs %s cancelled too", flow_run.name, children)
