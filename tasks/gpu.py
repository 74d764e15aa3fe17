"""Hand-off to the GPU stages: batches of jobs, one GPU flow run each, results read back by key.

With a Prefect server and LYNX_GPU_DEPLOYMENT set, each batch is a run of that deployment on the
GPU work pool (``run_deployment``); in the embedded default the GPU flow runs in this process as a
subflow, one batch at a time. Either way only the batch's parameters (job ids, keys, settings)
go over, and what came out is read back from the tracking database: the decode stage's row names
the intermediate video's key. Batches hold a slot of the Prefect global concurrency limit named
after the GPU pool while they run, so a campaign never queues more GPU runs than there are workers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Flow, task
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency

from lynx.db.models import JobStatus, StageStatus
from lynx.errors import ConfigurationError
from lynx.jobs import GpuBatchRequest, GpuJobSpec, JobTicket
from lynx.ledger import video_of
from lynx.settings import LynxSettings
from tasks.services import services
from tasks.tracking import close_open_stages, error_text, fail_job, latest_stage, request_cancellation

log = logging.getLogger(__name__)

# In-process GPU batches share this process's one model; they run one after the other.
_in_process = threading.Lock()


def gpu_batches(tickets: list[JobTicket], size: int | None = None) -> list[list[JobTicket]]:
    """Tickets that need the GPU stages in batches of LYNX_GPU_BATCH_SIZE; one variant per batch,
    subjects kept together. A job whose decoded video an earlier run stored needs none."""
    size = size or services().settings.gpu_batch_size
    active = [ticket for ticket in tickets if ticket.needs_gpu]
    batches: list[list[JobTicket]] = []
    by_variant = sorted(active, key=lambda ticket: ticket.settings.variant or "")
    for _, group in itertools.groupby(by_variant, key=lambda ticket: ticket.settings.variant or ""):
        members = sorted(group, key=lambda ticket: (ticket.subject_id, ticket.job_id))
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    return batches


def decoded_earlier(tickets: list[JobTicket]) -> list[JobTicket]:
    """Active tickets whose decoded video is stored already (by an earlier attempt): ready to deliver."""
    return [ticket for ticket in tickets if ticket.active and ticket.video is not None]


def _limit_exists(name: str) -> bool:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return False
    return True


@contextmanager
def gpu_slot(pool: str) -> Iterator[None]:
    """Hold one slot of the global concurrency limit named after the GPU pool, if it exists.

    Without the limit (the embedded default) batches are not bounded; asking Prefect for a slot
    of a missing limit (``strict=False``) costs seconds per batch, so we look it up first.
    """
    if not _limit_exists(pool):
        log.info("no global concurrency limit %r: GPU batches are not bounded", pool)
        yield
        return
    with concurrency(pool, occupy=1, strict=True):
        yield


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _state_text(run_name: str, state: Any) -> str:
    name = state.name if state is not None else "without a state"
    message = (getattr(state, "message", None) or "").strip().splitlines()
    return f"GPU flow run {run_name} ended {name}" + (f": {message[0]}" if message else "")


def wait_for_final(flow_run_id: Any, settings: LynxSettings) -> Any | None:
    """The GPU run's final state, read every LYNX_GPU_POLL_SECONDS; None past the operator's limit
    LYNX_GPU_DEPLOYMENT_TIMEOUT (unset: no limit). A run whose process died is marked Crashed by the
    heartbeat automation (deployments/automations.py), which bounds the wait (docs/flows.md)."""
    from prefect import get_client

    limit = settings.gpu_deployment_timeout
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        if deadline is not None and time.monotonic() >= deadline:
            return None
        pause = settings.gpu_poll_seconds
        time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))


def unfinished_jobs(batch: GpuBatchRequest) -> list[GpuJobSpec]:
    """The batch's jobs a crashed GPU run left to do: still running, no decoded video of their attempt."""
    tracker = services().tracker
    left = []
    for spec in batch.jobs:
        if tracker.get_job(spec.job_id).status is not JobStatus.RUNNING:
            continue  # failed or cancelled in the GPU run: recorded already
        if latest_stage(spec.job_id, "decode", attempt=spec.attempt, status=StageStatus.COMPLETED) is None:
            left.append(spec)
    return left


def run_on_gpu_pool(batch: GpuBatchRequest, settings: LynxSettings) -> str | None:
    """Run the batch as a run of LYNX_GPU_DEPLOYMENT; returns why it did not complete, if it did not.

    When the run ends Crashed (its process or machine died; the heartbeat automation says so), the
    jobs it left unfinished go to the GPU pool again as a new run, up to LYNX_GPU_RESUBMIT_ATTEMPTS
    times; their sampling resumes from its last checkpoint.
    """
    from prefect.deployments import run_deployment

    name = f"gpu-jobs-{'-'.join(map(str, batch.job_ids[:8]))}"
    resubmits = settings.gpu_resubmit_attempts
    for attempt in range(resubmits + 1):
        run_name = name if attempt == 0 else f"{name}-resubmit-{attempt}"
        # timeout=0: created and left to run; its state is polled here
        run = run_deployment(
            settings.gpu_deployment,
            parameters={"batch": batch.model_dump(mode="json")},
            timeout=0,
            flow_run_name=run_name,
        )
        state = wait_for_final(run.id, settings)
        if state is None:
            try:
                request_cancellation(run.id, "the calling flow gave up waiting")
            except Exception:  # best effort: its jobs are failed either way
                log.warning("could not cancel GPU flow run %s", run_name, exc_info=True)
            return (
                f"GPU flow run {run_name} did not finish within {settings.gpu_deployment_timeout:.0f} s "
                "(setting: LYNX_GPU_DEPLOYMENT_TIMEOUT)"
            )
        if state.is_completed():
            return None
        problem = _state_text(run_name, state)
        if not state.is_crashed():
            return problem
        left = unfinished_jobs(batch)
        if not left:
            return None
        if attempt == resubmits:
            return f"{problem} (re-submitted {resubmits} times; setting: LYNX_GPU_RESUBMIT_ATTEMPTS)"
        for spec in left:
            close_open_stages(spec.job_id, problem)
        log.warning(
            "%s: re-submitting jobs %s to the GPU pool (%s of %s)",
            problem,
            [spec.job_id for spec in left],
            attempt + 1,
            resubmits,
        )
        batch = batch.model_copy(update={"jobs": left})
    return None  # not reached: the last attempt returns above


def run_in_process(batch: GpuBatchRequest, gpu_flow: Flow) -> str | None:
    """Run the GPU flow here as a subflow; returns why it did not complete, if it did not."""
    with _in_process:
        state = gpu_flow(batch=batch, return_state=True)
    return None if state.is_completed() else _state_text("(in-process)", state)


def gpu_result(ticket: JobTicket, problem: str | None) -> JobTicket:
    """The ticket after the GPU stages, from what the tracking database holds for its job."""
    tracker = services().tracker
    job = tracker.get_job(ticket.job_id)
    if job.status is JobStatus.FAILED:
        return ticket.as_failed(job.error_stage or "gpu", job.error_text or "failed in the GPU stages")
    if job.status is JobStatus.CANCELLED:
        return ticket.model_copy(update={"status": "cancelled"})
    decoded = latest_stage(ticket.job_id, "decode", attempt=ticket.attempt, status=StageStatus.COMPLETED)
    if decoded is None:  # the GPU run died (or stopped) before this job's video was stored
        text = problem or "the GPU stages ended without storing this job's video"
        close_open_stages(ticket.job_id, text)
        fail_job(ticket.job_id, "gpu", text)
        return ticket.as_failed("gpu", text)
    return ticket.model_copy(update={"video": video_of(decoded)})


def hand_off(batch: GpuBatchRequest, gpu_flow: Flow, settings: LynxSettings) -> str | None:
    """Run the batch's GPU stages (on the GPU pool or here); returns why they did not complete."""
    if settings.gpu_deployment and not _api_url():
        raise ConfigurationError(
            "LYNX_GPU_DEPLOYMENT is set but no Prefect server is configured (PREFECT_API_URL)",
            setting="LYNX_GPU_DEPLOYMENT",
        )
    with gpu_slot(settings.gpu_pool):
        if settings.gpu_deployment:
            return run_on_gpu_pool(batch, settings)
        return run_in_process(batch, gpu_flow)


def hand_off_error(err: BaseException, settings: LynxSettings) -> str:
    """One line for an error that kept the batch from reaching (or coming back from) the GPU stages."""
    from prefect.exceptions import ObjectNotFound

    if isinstance(err, ObjectNotFound) and settings.gpu_deployment:
        # Prefect's own message is empty ("None"): name what was looked up and where it is set.
        return (
            f"GPU deployment {settings.gpu_deployment!r} not found on the Prefect server "
            "(setting: LYNX_GPU_DEPLOYMENT)"
        )
    return f"GPU hand-off failed: {error_text(err)}"


def run_batch(tickets: list[JobTicket], gpu_flow: Flow) -> list[JobTicket]:
    """Run the GPU stages for the tickets that need them as one GPU flow run; returns every ticket
    updated (a ticket whose decoded video is stored already comes back as it was).

    Whatever goes wrong here fails this batch's jobs at stage 'gpu' with the reason; it is never
    raised, so a campaign's other batches are still delivered and reported.
    """
    settings = services().settings
    active = [ticket for ticket in tickets if ticket.needs_gpu]
    if not active:
        return tickets
    batch = GpuBatchRequest(jobs=[ticket.for_gpu() for ticket in active], variant=active[0].settings.variant)
    try:
        problem = hand_off(batch, gpu_flow, settings)
    except Exception as err:
        problem = hand_off_error(err, settings)
        log.warning("GPU hand-off of jobs %s failed", batch.job_ids, exc_info=True)
    if problem:
        log.error("%s", problem)
    return [_result_or_failed(ticket, problem) if ticket.needs_gpu else ticket for ticket in tickets]


def _result_or_failed(ticket: JobTicket, problem: str | None) -> JobTicket:
    try:
        return gpu_result(ticket, problem)
    except Exception as err:  # the tracking database did not answer: this job fails, the others go on
        text = problem or f"the GPU stages' results could not be read: {error_text(err)}"
        log.warning("job %s: reading its GPU results failed", ticket.job_id, exc_info=True)
        try:
            fail_job(ticket.job_id, "gpu", text)
        except Exception:  # recorded by the next run's submit (a job left running by a gone run)
            log.warning("job %s could not be marked failed", ticket.job_id, exc_info=True)
        return ticket.as_failed("gpu", text)


@task(name="gpu-stages", cache_policy=NONE, persist_result=False)
def run_gpu_batch(tickets: list[JobTicket], gpu_flow: Flow) -> list[JobTicket]:
    """One GPU flow run for a batch (under the GPU pool's concurrency limit); tickets come back updated.

    Not ``configured()`` like the stages: a retry would start a second GPU run for jobs the first
    may still be running (and ``run_batch`` raises nothing to retry on), and a task timeout would
    also count the wait for a GPU slot behind a campaign's earlier batches. The wait for the run
    ends when Prefect calls it final (a dead run is marked Crashed and re-submitted), or at the
    operator's LYNX_GPU_DEPLOYMENT_TIMEOUT.
    """
    return run_batch(tickets, gpu_flow)
