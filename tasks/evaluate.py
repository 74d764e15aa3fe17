"""Prefect tasks of the evaluation: collect the videos, score them, publish the report.

Each task composes plain functions of ``lynx.evaluation`` over the process's services (settings,
tracker, store: ``tasks.services``). None persists its result: results are small, and reference
embeddings (biometric) never leave the scoring task's memory anyway. Only transient storage and
database errors are retried (``tasks.policy``); re-scoring after a retry reuses what was stored.
The quality gate runs inside the deliver stage (``tasks/deliver.py`` calls ``gate_job``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE

from lynx.evaluation.evaluator import Evaluator, VideoResult, local_copy
from lynx.evaluation.publish import EvaluationOutcome, artifact_key, outcome_of, publish_report, video_rows
from lynx.evaluation.recognizers import cached_evaluation_models
from lynx.evaluation.report import render_report
from lynx.evaluation.sources import EvaluationSource, collect_source
from tasks.policy import retry_on_transient
from tasks.services import services

#: Tries of each Prefect artifact of the report, LYNX_RETRY_DELAY_SECONDS apart (doubling).
ARTIFACT_ATTEMPTS = 3


@task(name="collect-videos", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def collect_videos(
    campaign: str | None = None, manifest: str | None = None, name: str | None = None
) -> EvaluationSource:
    """The finished jobs of a campaign, or the videos of a manifest, with their reference photos."""
    source = collect_source(services().tracker, campaign=campaign, manifest=manifest, name=name)
    get_run_logger().info("%s", source.description)
    return source


@task(name="score-videos", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def score_videos(source: EvaluationSource, force: bool = False) -> list[VideoResult]:
    """Identity metrics of every video by every recogniser, recorded in the tracking database.

    Videos measured before with the same reference, stride and setup are reused unless ``force``.
    A progress artifact moves with each video.
    """
    logger = get_run_logger()
    svc = services()
    total = len(source.items)
    progress = create_progress_artifact(
        0.0,
        key=artifact_key("lynx-eval", source.name) + "-progress",
        description=f"Evaluating {total} videos of {source.name}",
    )
    results: list[VideoResult] = []
    with Evaluator(svc.settings, tracker=svc.tracker, store=svc.store, force=force) as evaluator:
        for done, item in enumerate(source.items, 1):
            result = evaluator.evaluate(item)
            results.append(result)
            if result.metrics is None:
                logger.warning("%s (%s): not evaluated: %s", item.label, item.subject, result.error)
            else:
                means = ", ".join(
                    f"{name} {'-' if r.mean is None else f'{r.mean:.3f}'}"
                    for name, r in result.metrics.items()
                )
                logger.info("%s (%s): %s%s", item.label, item.subject, means, " (reused)" * result.reused)
            update_progress_artifact(progress, 100.0 * done / max(total, 1))
    return results


@task(
    name="evaluation-report", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient
)
def evaluation_report(
    source: EvaluationSource, results: list[VideoResult], report_dir: str | None = None
) -> EvaluationOutcome:
    """Render the HTML report, upload it, and link it and a per-video table from Prefect artifacts.

    Publishing is the last step that may fail the task; the artifacts after it retry on their own.
    """
    svc = services()
    models = cached_evaluation_models(svc.settings)
    recognizers, gate_recognizer = models.names, models.resolve(svc.settings.quality_gate_recognizer)
    with tempfile.TemporaryDirectory(prefix="lynx-report-") as folder:
        html = render_report(
            results,
            name=source.name,
            source=source.description,
            recognizers=recognizers,
            gate_recognizer=gate_recognizer,
            settings=svc.settings,
            open_video=lambda item: local_copy(
                item.video, store=svc.store if item.in_store else None, folder=Path(folder)
            ),
        )
    report = publish_report(
        html,
        name=source.name,
        settings=svc.settings,
        store=svc.store,
        tracker=svc.tracker,
        campaign_id=source.campaign_id,
        out_dir=Path(report_dir) if report_dir else None,
    )
    outcome = outcome_of(
        source.name,
        results,
        recognizers=recognizers,
        gate_recognizer=gate_recognizer,
        settings=svc.settings,
        report=report,
    )
    key = artifact_key("lynx-eval", source.name)
    lines = outcome.summary_lines()
    rows = video_rows(
        results, recognizers=recognizers, gate_recognizer=gate_recognizer, settings=svc.settings
    )
    delay = svc.settings.retry_delay_seconds
    _present(
        "report link",
        lambda: create_link_artifact(
            report.url,
            link_text=f"Evaluation report: {source.name}",
            key=f"{key}-report",
            description=f"Self-contained HTML report, stored as {report.key}",
        ),
        delay,
    )
    _present(
        "per-video table",
        lambda: create_table_artifact(
            rows, key=key, description=f"Identity similarity per video: {source.description}"
        ),
        delay,
    )
    _present(
        "summary",
        lambda: create_markdown_artifact(
            "\n".join([f"# {lines[0]}", "", "```", *lines[1:], "```"]),
            key=f"{key}-summary",
            description="Evaluation summary",
        ),
        delay,
    )
    return outcome


def _present(what: str, create: Callable[[], object], delay: float) -> None:
    """Create one Prefect artifact, retrying here, never by re-running the task: the report is
    already uploaded and recorded, and a task retry would upload and record a second one. After
    the last attempt the artifact is left out with a warning (the report itself is the record)."""
    for attempt in range(1, ARTIFACT_ATTEMPTS + 1):
        try:
            create()
            return
        except Exception as err:
            if attempt == ARTIFACT_ATTEMPTS:
                get_run_logger().warning(
                    "evaluation %s artifact not created after %d attempts: %s", what, attempt, err
                )
                return
            time.sleep(delay * 2 ** (attempt - 1))
