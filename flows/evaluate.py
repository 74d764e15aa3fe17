"""Flow ``lynx-eval``: identity metrics and a report for a finished campaign or any set of videos.

Idempotent: metrics are rows keyed by (video, reference, recogniser, stride), so a re-run finds
them instead of measuring again (``force`` re-measures) and only adds a fresh report.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from lynx.evaluation.publish import EvaluationOutcome, slug
from lynx.settings import get_settings
from tasks.evaluate import collect_videos, evaluation_report, score_videos
from tasks.policy import retry_delays


def _run_name() -> str:
    parameters = flow_run.parameters
    what = (
        parameters.get("name")
        or parameters.get("campaign")
        or Path(parameters.get("manifest") or "videos").stem
    )
    return f"eval-{slug(str(what))}"


def _retrying(task):
    """The task with LYNX_TASK_RETRIES retries (transient errors only) and exponential backoff."""
    settings = get_settings()
    return task.with_options(retries=settings.task_retries, retry_delay_seconds=retry_delays(settings) or 0)


@flow(name="lynx-eval", flow_run_name=_run_name, log_prints=True)
def lynx_eval(
    campaign: str | None = None,
    manifest: str | None = None,
    name: str | None = None,
    force: bool = False,
    report_dir: str | None = None,
) -> EvaluationOutcome:
    """Evaluate a campaign's delivered videos (``campaign``) or a manifest's videos (``manifest``:
    a YAML/JSON file of ``{video, reference_photo, subject, prompt}``)."""
    # Step 1: the videos and the reference photos they should resemble.
    source = _retrying(collect_videos)(campaign=campaign, manifest=manifest, name=name)
    # Step 2: similarity per video and recogniser, recorded in the tracking database.
    results = _retrying(score_videos)(source, force=force)
    # Step 3: the HTML report, uploaded and linked, plus a per-video table artifact.
    return _retrying(evaluation_report)(source, results, report_dir=report_dir)
