"""Stage rows, job failures and cancellations in the tracking database.

``run_stage`` is what every stage task runs its work in: it records a stage row, and when the work
fails for good it records the stage and the error on the job and hands back a failed ticket, so one
job's failure never takes the other jobs of a campaign down with it. Transient errors are re-raised
while Prefect still has retries left. A stage past its timeout is Prefect's ``TaskRunTimeoutError``,
caught by ``stage_call`` in the flows; every row records its owner process (``lynx.liveness``) and a
run's open rows are closed when it ends (``close_run_stages``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from prefect import Task
from prefect.context import TaskRunContext
from prefect.task_engine import TaskRunTimeoutError
from sqlalchemy import select

from lynx.db.models import JobStatus, StageRun, StageStatus
from lynx.db.tracking import StageRecorder
from lynx.errors import IllegalTransitionError, LynxError
from lynx.liveness import this_process
from tasks.policy import configured, is_transient, timeout_setting
from tasks.services import services

log = logging.getLogger(__name__)

ACTIVE_STATUSES = (JobStatus.PENDING, JobStatus.RUNNING)


class RunCancelling(Exception):
    """Raised in a stage when its flow run is being cancelled (``cancel_requested``): the stage
    stops at a safe point and its job ends cancelled."""


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
    try:
        with tracker.stage(
            ticket.job_id, stage, inputs=inputs, flow_run_id=current_flow_run_id(), owner=str(this_process())
        ) as recorder:
            return work(recorder)
    except BaseException as err:  # noqa: B036 - a task's timeout arrives as CancelledError (a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit)) or _is_cancellation(err):
            # Prefect turns the cancellation of its timeout into TaskRunTimeoutError: ``stage_call``
            raise
        if isinstance(err, RunCancelling):
            mark_cancelled([ticket.job_id])
            raise
        if is_transient(err) and _retries_left():
            log.warning("job %s: %s failed on a transient error, retrying: %s", ticket.job_id, stage, err)
            raise
        text = error_text(err)
        if not isinstance(err, LynxError):
            log.exception("job %s: %s failed", ticket.job_id, stage)
        fail_job(ticket.job_id, stage, text)
        return ticket.as_failed(stage, text)


def timeout_reason(stage: str, seconds: float | None, what: str | None = None) -> str:
    """The one-line reason of a stage past its timeout, naming the setting."""
    return (
        f"{what or f'{stage} stage'} timed out after {seconds or 0:.0f} s (setting: {timeout_setting(stage)})"
    )


def stage_call(
    stage_task: Task,
    stage: str,
    *args: Any,
    videos: int = 1,
    ticket: Any = None,
    on_timeout: Callable[[str], Any] | None = None,
) -> Any:
    """Call the stage's task, ``configured`` for ``stage``; when it runs past its timeout (Prefect's
    ``TaskRunTimeoutError``), its job (``ticket``, by default the last argument) fails naming the
    setting, or ``on_timeout(reason)`` says what to return instead. A flow's other jobs go on."""
    bounded = configured(stage_task, stage, videos=videos)
    try:
        return bounded(*args)
    except TaskRunTimeoutError:
        text = timeout_reason(
            stage, bounded.timeout_seconds, "loading the model" if stage == "model" else None
        )
        log.error("%s", text)
        if on_timeout is not None:
            return on_timeout(text)
        ticket = args[-1] if ticket is None else ticket
        close_open_stages(ticket.job_id, text)
        fail_job(ticket.job_id, stage, text)
        return ticket.as_failed(stage, text)


def _is_cancellation(err: BaseException) -> bool:
    import asyncio

    return isinstance(err, asyncio.CancelledError)


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


def close_run_stages(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect hook when a flow run ends (completed, failed, crashed, cancelled): every stage row it
    left 'running' is closed as failed, so no row outlives its run."""
    text = (
        f"flow run {flow_run.name} ended {state.name if state is not None else ''} before this stage finished"
    )
    try:
        with services().tracker.transaction() as session:
            open_rows = list(
                session.scalars(
                    select(StageRun.id).where(
                        StageRun.flow_run_id == str(flow_run.id), StageRun.status == StageStatus.RUNNING
                    )
                )
            )
        for row in open_rows:
            try:
                services().tracker.record_stage_finish(row, status=StageStatus.FAILED, error_text=text)
            except IllegalTransitionError:
                continue
    except Exception:  # the database is down (the run's error says so): the next run's submit closes them
        log.debug("stage rows of flow run %s not closed", flow_run.name, exc_info=True)


# A flow's hooks for its end: its stage rows closed whatever the end (cancellation: its own hook).
ENDED_HOOKS: dict[str, Any] = dict(
    on_completion=[close_run_stages], on_failure=[close_run_stages], on_crashed=[close_run_stages]
)


def _run_and_ancestors(client: Any, flow_run_id: Any) -> list[Any]:
    """The flow run's id and those of the runs above it (a subflow's parent, a GPU run's caller)."""
    ids = []
    while flow_run_id is not None and len(ids) < 8:
        ids.append(flow_run_id)
        run = client.read_flow_run(flow_run_id)
        parent_task = run.parent_task_run_id
        flow_run_id = client.read_task_run(parent_task).flow_run_id if parent_task else None
    return ids


class CancelWatch:
    """Whether the running flow run (or a run above it) is being cancelled; it asks the Prefect API
    at most every ``every`` seconds and says False outside a flow run or when the API cannot tell."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._ids: list[Any] | None = None
        self._last = float("-inf")
        self._cancelled = False

    def __call__(self) -> bool:
        import time

        now = time.monotonic()
        if self._cancelled or now - self._last < self.every:
            return self._cancelled
        self._last = now
        flow_run_id = current_flow_run_id()
        if flow_run_id is None:
            return False
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        try:
            with get_client(sync_client=True) as client:
                if self._ids is None:
                    self._ids = _run_and_ancestors(client, flow_run_id)
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=self._ids))
                )
        except Exception:  # best effort: the worker's own cancellation still stops the run
            log.debug("could not read the state of flow run %s", flow_run_id, exc_info=True)
            return False
        states = [run.state for run in runs if run.state is not None]
        self._cancelled = any(state.is_cancelling() or state.is_cancelled() for state in states)
        return self._cancelled
