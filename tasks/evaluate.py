"""Prefect tasks of the evaluation: collect the videos, score them, publish the report, gate a job.

Each task composes plain functions of ``lynx.evaluation``. None persists its result: results
are small, and reference embeddings (biometric) never leave the scoring task's memory anyway.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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

from lynx.db.tracking import Tracker
from lynx.evaluation.evaluator import Evaluator, VideoResult, local_copy
from lynx.evaluation.gate import GateVerdict, gate_job
from lynx.evaluation.publish import EvaluationOutcome, outcome_of, publish_report, slug, video_rows
from lynx.evaluation.recognizers import cached_evaluation_models
from lynx.evaluation.report import render_report
from lynx.evaluation.sources import EvaluationSource, collect_source
from lynx.settings import LynxSettings
from lynx.store import ArtifactStore, open_store


@contextmanager
def _services(settings: LynxSettings) -> Iterator[tuple[Tracker, ArtifactStore]]:
    with Tracker.from_settings(settings) as tracker:
        yield tracker, open_store(settings)


@task(name="collect-videos", cache_policy=NONE, persist_result=False)
def collect_videos(
    *,
    settings: LynxSettings,
    campaign: str | None = None,
    manifest: str | None = None,
    name: str | None = None,
) -> EvaluationSource:
    """The finished jobs of a campaign, or the videos of a manifest, with their reference photos."""
    with _services(settings) as (tracker, _):
        source = collect_source(tracker, campaign=campaign, manifest=manifest, name=name)
    get_run_logger().info("%s", source.description)
    return source


@task(name="score-videos", cache_policy=NONE, persist_result=False)
def score_videos(
    source: EvaluationSource, *, settings: LynxSettings, force: bool = False
) -> list[VideoResult]:
    """Identity metrics of every video by every recogniser, recorded in the tracking database.

    Videos measured before with the same reference, stride and setup are reused unless ``force``.
    A progress artifact moves with each video.
    """
    logger = get_run_logger()
    total = len(source.items)
    progress = create_progress_artifact(
        0.0,
        key=f"lynx-eval-{slug(source.name)}-progress",
        description=f"Evaluating {total} videos of {source.name}",
    )
    results: list[VideoResult] = []
    with (
        _services(settings) as (tracker, store),
        Evaluator(settings, tracker=tracker, store=store, force=force) as evaluator,
    ):
        for done, item in enumerate(source.items, 1):
            result = evaluator.evaluate(item)
            results.append(result)
            if result.metrics is None:
                logger.warning("%s (%s): not evaluated: %s", item.label, item.subject, result.error)
            else:
                means = ", ".join(
                    f"{n} {'-' if r.mean is None else f'{r.mean:.3f}'}" for n, r in result.metrics.items()
                )
                logger.info(
                    "%s (%s): %s%s", item.label, item.subject, means, " (reused)" if result.reused else ""
                )
            update_progress_artifact(progress, 100.0 * done / max(total, 1))
    return results


@task(name="evaluation-report", cache_policy=NONE, persist_result=False)
def evaluation_report(
    source: EvaluationSource,
    results: list[VideoResult],
    *,
    settings: LynxSettings,
    report_dir: str | None = None,
) -> EvaluationOutcome:
    """Render the HTML report, upload it, and link it and a per-video table from Prefect artifacts."""
    models = cached_evaluation_models(settings)
    recognizers, gate_recognizer = models.names, models.resolve(settings.quality_gate_recognizer)
    with (
        _services(settings) as (tracker, store),
        tempfile.TemporaryDirectory(prefix="lynx-report-") as folder,
    ):
        html = render_report(
            results,
            name=source.name,
            source=source.description,
            recognizers=recognizers,
            gate_recognizer=gate_recognizer,
            settings=settings,
            open_video=lambda item: local_copy(
                item.video, store=store if item.in_store else None, folder=Path(folder)
            ),
        )
        report = publish_report(
            html,
            name=source.name,
            settings=settings,
            store=store,
            tracker=tracker,
            campaign_id=source.campaign_id,
            out_dir=Path(report_dir) if report_dir else None,
        )
    outcome = outcome_of(
        source.name,
        results,
        recognizers=recognizers,
        gate_recognizer=gate_recognizer,
        settings=settings,
        report=report,
    )
    key = f"lynx-eval-{slug(source.name)}"
    create_link_artifact(
        report.url,
        link_text=f"Evaluation report: {source.name}",
        key=f"{key}-report",
        description=f"Self-contained HTML report, stored as {report.key}",
    )
    create_table_artifact(
        video_rows(results, recognizers=recognizers, gate_recognizer=gate_recognizer, settings=settings),
        key=key,
        description=f"Identity similarity per video: {source.description}",
    )
    create_markdown_artifact(
        "\n".join(["# " + outcome.summary_lines()[0], "", "```", *outcome.summary_lines()[1:], "```"]),
        key=f"{key}-summary",
        description="Evaluation summary",
    )
    return outcome


@task(name="quality-gate", cache_policy=NONE, persist_result=False)
def quality_gate(job_id: int, *, settings: LynxSettings) -> GateVerdict:
    """Hold a running job for review when its delivered video fails the gate (see lynx.evaluation.gate)."""
    with _services(settings) as (tracker, store):
        verdict = gate_job(job_id, settings=settings, tracker=tracker, store=store)
    log = get_run_logger()
    (log.warning if verdict.needs_review else log.info)("job %s: %s", job_id, verdict.reason)
    return verdict


__all__ = ["collect_videos", "evaluation_report", "quality_gate", "score_videos"]
