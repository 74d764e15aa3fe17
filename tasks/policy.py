"""Retries and timeouts of the stages.

Only transient failures are retried: a storage or database server that did not answer, or a read
that raced an overwrite. Retrying a photo without a face or missing weights would only fail again,
later; those fail the job at once. Delays grow exponentially from LYNX_RETRY_DELAY_SECONDS.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prefect import Task
from sqlalchemy.exc import DBAPIError

from lynx.errors import ChecksumMismatchError, ServiceUnavailableError
from lynx.settings import LynxSettings, get_settings

T = TypeVar("T", bound=Task)

# Seconds allowed per stage, by the setting that holds them.
_TIMEOUT_SETTING = {
    "submit": "face_timeout",
    "face": "face_timeout",
    "model": "model_load_timeout",
    "reference": "reference_timeout",
    "text": "reference_timeout",
    "sample": "sample_timeout",
    "decode": "decode_timeout",
    "deliver": "deliver_timeout",
    "report": "face_timeout",
}
# Stages whose work (and timeout) grows with the job's candidates: one video each.
PER_VIDEO_STAGES = ("sample", "decode")


def is_transient(err: BaseException) -> bool:
    """True for errors that a later attempt can get past (servers briefly gone, racing reads)."""
    if isinstance(err, (ServiceUnavailableError, ChecksumMismatchError, ConnectionError)):
        return True
    # A connection that broke mid-transaction surfaces as a DBAPI error flagged as a disconnect.
    return isinstance(err, DBAPIError) and bool(err.connection_invalidated)


def retry_on_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry the task only if it failed on a transient error."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the result itself could not be read: do not guess
        return False
    return isinstance(error, BaseException) and is_transient(error)


def retry_delays(settings: LynxSettings) -> list[float]:
    return [settings.retry_delay_seconds * 2**attempt for attempt in range(settings.task_retries)]


def stage_timeout(stage: str, settings: LynxSettings | None = None, *, videos: int = 1) -> float:
    """Seconds allowed for ``stage`` of one job; sampling and decoding per video (candidate)."""
    settings = settings or get_settings()
    per_video = videos if stage in PER_VIDEO_STAGES else 1
    return float(getattr(settings, _TIMEOUT_SETTING[stage])) * per_video


def timeout_setting(stage: str) -> str:
    return f"LYNX_{_TIMEOUT_SETTING[stage].upper()}"


def configured(task: T, stage: str, settings: LynxSettings | None = None, *, videos: int = 1) -> T:
    """``task`` with the retries, backoff and timeout the settings give ``stage`` (for a job of
    ``videos`` candidates).

    Task options are fixed when a module is imported; settings are read when the flow runs (a
    worker's environment, a test's), so flows apply them here.
    """
    settings = settings or get_settings()
    return task.with_options(
        retries=settings.task_retries,
        retry_delay_seconds=retry_delays(settings) or 0,
        retry_condition_fn=retry_on_transient,
        timeout_seconds=stage_timeout(stage, settings, videos=videos),
    )
