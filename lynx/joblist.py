"""What operators ask of the tracking database: a campaign's jobs, jobs by state, one job in full.

Plain functions over a ``Tracker`` (``lynx campaign status``, ``lynx jobs list|show``); they only
read, and never contact the artifact store: keys are shown, not links.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lynx.db.models import JobStatus, StageStatus
from lynx.errors import InputError

if TYPE_CHECKING:
    from lynx.db.models import Job, StageRun
    from lynx.db.tracking import Tracker

STATES = [status.value for status in JobStatus]


def shorten(text: str | None, width: int = 40) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_state(state: str | None) -> JobStatus | None:
    """A job state as typed by a user (any case), or a one-line error listing the valid ones."""
    if state is None:
        return None
    try:
        return JobStatus(state.strip().lower())
    except ValueError:
        raise InputError(f"unknown job state {state!r}; states: {', '.join(STATES)}") from None


def _delivered(runs: list[StageRun], job: Job) -> dict[str, Any]:
    """Metrics of the job's completed deliver stage of its current attempt ({} when none)."""
    done = [
        run for run in runs
        if run.stage == "deliver" and run.attempt == job.attempt and run.status is StageStatus.COMPLETED
    ]
    return dict(done[-1].metrics or {}) if done else {}


def job_row(tracker: Tracker, job: Job, subjects: dict[int, str] | None = None) -> dict[str, Any]:
    """One job as a table row: id, subject, prompt, state, attempt, chosen score, seed, candidates,
    deliverable key and error."""
    if subjects is not None and job.subject_id in subjects:
        subject = subjects[job.subject_id]
    else:
        record = tracker.get_subject(job.subject_id)
        subject = record.external_ref or record.name
        if subjects is not None:
            subjects[job.subject_id] = subject
    metrics = _delivered(tracker.stage_runs(job.id), job)
    delivered = job.status in (JobStatus.COMPLETED, JobStatus.NEEDS_REVIEW)
    score = metrics.get("score")
    return {
        "id": job.id,
        "subject": subject,
        "prompt": job.prompt,
        "state": job.status.value,
        "attempt": job.attempt,
        "score": None if score is None else round(float(score), 3),
        "seed": metrics.get("seed", job.params.get("seed")) if delivered else job.params.get("seed"),
        "candidates": job.params.get("candidates", 1),
        "deliverable": metrics.get("master_key") if delivered else None,
        "error": f"{job.error_stage}: {job.error_text}" if job.error_text else None,
    }


def campaign_rows(tracker: Tracker, name: str) -> list[dict[str, Any]]:
    """Every job of campaign ``name`` (NotFoundError, one line, when there is no such campaign)."""
    campaign = tracker.get_campaign(name)
    subjects: dict[int, str] = {}
    return [job_row(tracker, job, subjects) for job in tracker.list_jobs(campaign_id=campaign.id)]


def job_rows(
    tracker: Tracker, *, campaign: str | None = None, state: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Jobs, newest first, optionally of one campaign and/or in one state, at most ``limit``."""
    status = parse_state(state)
    campaign_id = tracker.get_campaign(campaign).id if campaign else None
    jobs = tracker.list_jobs(campaign_id=campaign_id, status=status)[::-1]
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be 1 or more, not {limit}")
        jobs = jobs[:limit]
    subjects: dict[int, str] = {}
    return [job_row(tracker, job, subjects) for job in jobs]


def job_detail(tracker: Tracker, job_id: int) -> dict[str, Any]:
    """One job in full: its fields, every stage run (status, duration, error) and its deliverables."""
    job = tracker.get_job(job_id)
    row = job_row(tracker, job)
    campaign = tracker.get_campaign(job.campaign_id).name if job.campaign_id is not None else None
    runs = tracker.stage_runs(job.id)
    metrics = _delivered(runs, job)
    deliverables = {
        name: value for name, value in metrics.items() if name.endswith("_key") and isinstance(value, str)
    }
    return {
        **row,
        "prompt": job.prompt,
        "campaign": campaign,
        "negative_prompt": job.negative_prompt,
        "params": job.params,
        "needs_review": job.needs_review,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "stages": [
            {
                "stage": run.stage,
                "attempt": run.attempt,
                "status": run.status.value,
                "started_at": _iso(run.started_at),
                "duration_s": None if run.duration_s is None else round(run.duration_s, 3),
                "error": run.error_text,
                "flow_run_id": run.flow_run_id,
            }
            for run in runs
        ],
        "deliverables": deliverables,
    }


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def render_table(rows: list[dict[str, Any]], columns: list[str], widths: dict[str, int] | None = None) -> str:
    """A plain fixed-width text table (no colours, so it pipes and greps)."""
    widths = widths or {}

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        text = "-" if value is None or value == "" else str(value)
        return shorten(text, widths[column]) if column in widths else text

    cells = [[cell(row, column) for column in columns] for row in rows]
    sizes = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(size) for column, size in zip(columns, sizes, strict=True)).rstrip()]
    for line in cells:
        lines.append("  ".join(text.ljust(size) for text, size in zip(line, sizes, strict=True)).rstrip())
    return "\n".join(lines)
