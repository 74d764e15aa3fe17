"""The end of a run as users see it: job outcomes, a table artifact for campaigns, a link for one job.

Outcomes are read from the tracking database, not from what the run passed around, so the summary
also covers jobs completed by earlier runs and failures recorded by a GPU run on another machine.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from lynx.db.models import JobStatus, StageStatus
from lynx.errors import LynxError
from lynx.evaluation.publish import artifact_key
from lynx.jobs import JobOutcome, JobTicket
from tasks.services import services
from tasks.tracking import latest_stage

_REPORTED = {
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.NEEDS_REVIEW: "needs_review",
    JobStatus.RUNNING: "running",
    JobStatus.PENDING: "running",
}


def job_outcome(job_id: int, *, current_flow_run: str | None = None) -> JobOutcome:
    """One job's outcome; ``earlier`` when its deliverables were made by another flow run."""
    svc = services()
    job = svc.tracker.get_job(job_id)
    subject = svc.tracker.get_subject(job.subject_id)
    delivered = latest_stage(job_id, "deliver", attempt=job.attempt, status=StageStatus.COMPLETED)
    metrics = delivered.metrics if delivered else {}
    # A job held by the quality gate keeps its files: the reviewer needs to find them.
    reviewable = (JobStatus.COMPLETED, JobStatus.NEEDS_REVIEW)
    master = metrics.get("master_key") if job.status in reviewable else None
    url = None
    if master:
        try:
            url = svc.store.presigned_url(master)
        except LynxError:  # deleted since: report the key without a link
            url = None
    return JobOutcome(
        job_id=job.id,
        subject=subject.external_ref or subject.name,
        prompt=job.prompt,
        status=_REPORTED[job.status],
        attempt=job.attempt,
        master_key=master,
        manifest_key=metrics.get("manifest_key") if master else None,
        deliverable_url=url,
        similarity=metrics.get("similarity"),
        candidates=job.params.get("candidates", 1),
        seed=metrics.get("seed", job.params.get("seed")) if master else None,
        score=metrics.get("score"),
        error_stage=job.error_stage,
        error_text=job.error_text,
        earlier=bool(delivered and current_flow_run and delivered.flow_run_id != current_flow_run),
    )


def refused_outcome(ticket: JobTicket) -> JobOutcome:
    """The outcome of a request refused before a job was recorded (its subject was purged)."""
    return JobOutcome(
        job_id=None,
        subject=ticket.subject_ref,
        prompt=ticket.prompt,
        status="failed",
        attempt=ticket.attempt,
        error_stage=ticket.error_stage,
        error_text=ticket.error_text,
    )


def ticket_outcome(ticket: JobTicket, *, current_flow_run: str | None = None) -> JobOutcome:
    if ticket.job_id is None:
        return refused_outcome(ticket)
    return job_outcome(ticket.job_id, current_flow_run=current_flow_run)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def candidate_score(outcome: JobOutcome) -> str:
    """The chosen candidate's identity score as the table shows it ("" for a job of one video)."""
    if outcome.candidates == 1 or outcome.master_key is None:
        return ""
    return "no face" if outcome.score is None else f"{outcome.score:.3f}"


def outcome_rows(outcomes: Sequence[JobOutcome]) -> list[dict[str, object]]:
    return [
        {
            "job": "" if outcome.job_id is None else outcome.job_id,
            "subject": outcome.subject,
            "prompt": outcome.prompt if len(outcome.prompt) <= 60 else outcome.prompt[:57] + "...",
            "status": outcome.status + (" (earlier run)" if outcome.earlier else ""),
            "attempt": outcome.attempt,
            "deliverable": outcome.deliverable_url or outcome.master_key or "",
            "similarity": "" if outcome.similarity is None else f"{outcome.similarity:.3f}",
            "best of": outcome.candidates,
            "seed": "" if outcome.seed is None else outcome.seed,
            "score": candidate_score(outcome),
            "error": f"{outcome.error_stage}: {outcome.error_text}" if outcome.error_text else "",
        }
        for outcome in outcomes
    ]


@task(name="report-campaign", cache_policy=NONE)
def report_campaign(campaign: str, tickets: list[JobTicket]) -> list[JobOutcome]:
    """Every ticket's outcome, as a table artifact 'campaign-<name>-<hash>' and a compute summary."""
    svc = services()
    outcomes = [ticket_outcome(ticket, current_flow_run=_flow_run_id()) for ticket in tickets]
    key = artifact_key("campaign", campaign)
    create_table_artifact(outcome_rows(outcomes), key=key, description=f"Campaign {campaign}: jobs")
    summary = svc.tracker.campaign_summary(campaign)
    counts = "\n".join(
        f"| {kind} | {c.computed} | {c.reused} |" for kind, c in sorted(summary.compute.items())
    )
    done = sum(outcome.status == "completed" for outcome in outcomes)
    create_markdown_artifact(
        f"# Campaign {campaign}\n\n{done} of {len(outcomes)} jobs completed.\n\n"
        f"| result | computed | reused |\n| --- | --- | --- |\n{counts}\n",
        key=key + "-compute",
        description=f"Campaign {campaign}: what was computed and what was reused",
    )
    return outcomes


@task(name="report-job", cache_policy=NONE)
def report_job(ticket: JobTicket) -> JobOutcome:
    """The job's outcome, with a link artifact to its master video when it completed."""
    outcome = ticket_outcome(ticket, current_flow_run=_flow_run_id())
    job_id = outcome.job_id
    if outcome.deliverable_url:
        create_link_artifact(
            outcome.deliverable_url,
            link_text=f"job {job_id}: master.mp4",
            key=f"deliverable-job-{job_id}",
            description=f"Deliverables of job {job_id} ({outcome.master_key})",
        )
    return outcome
