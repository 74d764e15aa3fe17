"""The final Prefect state of a ``lynx`` or ``lynx-campaign`` run, told by its jobs' outcomes.

Alerting reads Prefect states, so a run ends Failed when a job of it failed or was cancelled, with
the reason in the state's message; the outcomes stay readable: the state's data is a
``RunFailedError`` that carries them (``outcomes_of``), and the tracking database stays the ledger.
A run that is itself being cancelled ends Cancelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect.states import Cancelled, Completed, Failed, State

from lynx.errors import JobFailedError
from lynx.jobs import JobOutcome

_OK = ("completed", "needs_review")


class RunFailedError(JobFailedError):
    """A run whose jobs did not all complete; ``outcomes`` are every job's outcome."""

    def __init__(self, message: str, outcomes: Sequence[JobOutcome], *, one_job: bool = False) -> None:
        super().__init__(message)
        self.outcomes = list(outcomes)
        self.one_job = one_job  # a ``lynx`` run: its result is the one outcome, not a list

    def __reduce__(self) -> Any:  # picklable (results may be persisted) despite the keyword
        return _rebuild, (self.message, self.outcomes, self.one_job)


def _rebuild(message: str, outcomes: list[JobOutcome], one_job: bool) -> RunFailedError:
    return RunFailedError(message, outcomes, one_job=one_job)


def job_reason(outcome: JobOutcome) -> str:
    """One line: why the job did not complete."""
    job = f"job {outcome.job_id}" if outcome.job_id is not None else "the request"
    if outcome.status == "cancelled":
        return f"{job} was cancelled" + (f": {outcome.error_text}" if outcome.error_text else "")
    return f"{job} failed at stage {outcome.error_stage}: {outcome.error_text}"


def job_state(outcome: JobOutcome, *, cancelling: bool = False) -> JobOutcome | State:
    """The ``lynx`` run's end: its outcome (Completed), or Failed / Cancelled with the reason."""
    if outcome.status not in ("failed", "cancelled"):
        return outcome
    reason = job_reason(outcome)
    if cancelling:
        return Cancelled(message=reason, data=RunFailedError(reason, [outcome], one_job=True))
    return Failed(message=reason, data=RunFailedError(reason, [outcome], one_job=True))


def campaign_summary(outcomes: Sequence[JobOutcome]) -> tuple[bool, str]:
    """Whether every job completed or is held for review, and a one-line summary."""
    total = len(outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    cancelled = [o for o in outcomes if o.status == "cancelled"]
    running = [o for o in outcomes if o.status not in _OK and o.status not in ("failed", "cancelled")]
    held = sum(o.status == "needs_review" for o in outcomes)
    if not (failed or cancelled or running):
        text = f"{total} of {total} jobs completed"
        return True, text + (f" ({held} held for review)" if held else "")
    parts = []
    if failed:
        parts.append(f"{len(failed)} of {total} jobs failed: {job_reason(failed[0])}")
    if cancelled:
        parts.append(f"{len(cancelled)} of {total} jobs cancelled")
    if running:
        parts.append(f"{len(running)} of {total} jobs still running in another flow run")
    if held:
        parts.append(f"{held} held for review")
    return False, "; ".join(parts)


def campaign_state(outcomes: Sequence[JobOutcome], *, cancelling: bool = False) -> list[JobOutcome] | State:
    """The ``lynx-campaign`` run's end: Completed only when every job completed or is held."""
    ok, text = campaign_summary(outcomes)
    if ok:
        return Completed(message=text, data=list(outcomes))
    kind = Cancelled if cancelling else Failed
    return kind(message=text, data=RunFailedError(text, outcomes))


def outcomes_of(state_or_result: Any) -> Any:
    """What a run returned, whatever its end: its outcome(s), also from a Failed run's state."""
    value = state_or_result
    if isinstance(value, State):
        value = value.result(raise_on_failure=False)
    if isinstance(value, RunFailedError):
        return value.outcomes[0] if value.one_job else value.outcomes
    return value
