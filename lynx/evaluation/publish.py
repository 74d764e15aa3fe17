"""Where an evaluation's results go: a report file, the artifact store, and a small outcome.

Each run writes its report under ``LYNX_EVAL_REPORTS_DIR/<name>/<UTC time>/report.html`` (or a
folder the caller names), uploads it to ``reports/eval/<name>/<UTC time>/report.html`` and records
it as a ``report`` artifact of the campaign. Reports are history: a re-run adds a report, while the
metrics it shows are the same rows (see ``records``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lynx.db.models import ArtifactKind
from lynx.db.tracking import Tracker
from lynx.evaluation.aggregate import overall_stats
from lynx.evaluation.evaluator import VideoResult
from lynx.evaluation.gate import judge
from lynx.settings import LynxSettings
from lynx.store.base import ArtifactStore

REPORT_CONTENT_TYPE = "text/html; charset=utf-8"


class PublishedReport(BaseModel):
    path: Path
    key: str
    url: str
    sha256: str
    size: int


class EvaluationOutcome(BaseModel):
    """What ``lynx-eval`` returns and ``lynx eval`` prints: counts, means and where the report is."""

    name: str
    videos: int
    evaluated: int
    reused: int
    not_evaluated: int
    no_face: int
    needs_review: int | None  # None: the gate is off
    mean_similarity: dict[str, float | None]  # per recogniser, over videos with a face
    gate_recognizer: str
    report: PublishedReport | None = None

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.name}: {self.videos} videos, {self.evaluated} evaluated ({self.reused} reused), "
            f"{self.not_evaluated} not evaluated, {self.no_face} without a face",
        ]
        lines += [
            f"  {name}: mean similarity {'-' if mean is None else f'{mean:.3f}'}"
            + (" (gate)" if name == self.gate_recognizer and self.needs_review is not None else "")
            for name, mean in self.mean_similarity.items()
        ]
        lines.append(
            "  quality gate: off" if self.needs_review is None else f"  needs review: {self.needs_review}"
        )
        if self.report is not None:
            lines += [f"report: {self.report.path}", f"stored as {self.report.key}: {self.report.url}"]
        return lines


def slug(name: str) -> str:
    """Lower-case ASCII letters, digits and dashes: safe in store keys, folder names and Prefect
    artifact keys ("Été 2025" -> "ete-2025"). Many names share a slug: see ``artifact_key``."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:80] or "evaluation"


def artifact_key(prefix: str, name: str) -> str:
    """The Prefect artifact key of ``name`` (a campaign, an evaluation): readable slug, then a hash of
    the exact name, since Prefect keeps one history per key and names like "Spring 2025" and
    "spring-2025" (or two sharing their first 60 characters) must not write into each other's."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{prefix}-{slug(name)[:60]}-{digest}"


def outcome_of(
    name: str,
    results: Sequence[VideoResult],
    *,
    recognizers: Sequence[str],
    gate_recognizer: str,
    settings: LynxSettings,
    report: PublishedReport | None = None,
) -> EvaluationOutcome:
    overall = overall_stats(results, recognizers)
    gate_on = settings.quality_gate_threshold is not None
    return EvaluationOutcome(
        name=name,
        videos=len(results),
        evaluated=overall.scored,
        reused=sum(1 for r in results if r.reused),
        not_evaluated=len(results) - overall.scored,
        no_face=overall.no_face,
        needs_review=sum(1 for r in results if judge(r, gate_recognizer, settings).needs_review)
        if gate_on
        else None,
        mean_similarity={name: spread.mean for name, spread in overall.by_recognizer.items()},
        gate_recognizer=gate_recognizer,
        report=report,
    )


def video_rows(
    results: Sequence[VideoResult],
    *,
    recognizers: Sequence[str],
    gate_recognizer: str,
    settings: LynxSettings,
) -> list[dict[str, Any]]:
    """One flat row per video, for a Prefect table artifact or a CSV."""
    rows = []
    for result in results:
        item, judged = result.item, judge(result, gate_recognizer, settings)
        row: dict[str, Any] = {
            "subject": item.subject,
            "prompt": item.prompt,
            "video": item.video or "",
            "job": item.job_id,
        }
        for name in recognizers:
            mean = result.mean(name)
            row[name] = None if mean is None else round(mean, 4)
        row["face_share"] = round(result.metrics[recognizers[0]].face_share, 3) if result.metrics else None
        row["gate"] = (
            ("review: " + judged.reason) if judged.needs_review else ("pass" if judged.enabled else "off")
        )
        row["note"] = result.error or ("reused" if result.reused else "")
        rows.append(row)
    return rows


def publish_report(
    html: str,
    *,
    name: str,
    settings: LynxSettings,
    store: ArtifactStore,
    tracker: Tracker,
    campaign_id: int | None = None,
    out_dir: Path | None = None,
    when: datetime | None = None,
) -> PublishedReport:
    """Write the report file, upload it and record it; returns where it is (URL: presigned for S3,
    ``file://`` for the local store)."""
    # Microseconds: two evaluations of one campaign within a second must not share a report key.
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = Path(out_dir) if out_dir is not None else settings.resolved_eval_reports_dir / slug(name) / stamp
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.html"
    path.write_text(html, encoding="utf-8")
    key = f"reports/eval/{slug(name)}/{stamp}/report.html"
    stored = store.put_file(path, key=key, content_type=REPORT_CONTENT_TYPE)
    tracker.record_artifact(stored, kind=ArtifactKind.REPORT, campaign_id=campaign_id)
    return PublishedReport(
        path=path.resolve(),
        key=stored.key,
        url=store.presigned_url(stored.key),
        sha256=stored.sha256,
        size=stored.size,
    )
