"""The evaluation report: one self-contained HTML file.

Everything is inside the file: CSS inline, figures and contact sheets as base64 ``data:`` URIs, no
script and no external request, so it opens the same from a laptop, an e-mail or a presigned URL.
Rendered with jinja2 (autoescaped: prompts and names are user text).
"""

from __future__ import annotations

import base64
import json
import platform
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2

from lynx.evaluation.aggregate import group_stats, overall_stats, ranked
from lynx.evaluation.evaluator import VideoResult
from lynx.evaluation.gate import judge
from lynx.evaluation.plots import similarity_by_subject, similarity_distributions, similarity_over_time
from lynx.evaluation.sources import EvalItem
from lynx.media.previews import contact_sheet_indices, grab_frames, write_contact_sheet
from lynx.media.probe import probe_video
from lynx.settings import LynxSettings

SHEET_FRAMES, SHEET_COLUMNS, SHEET_TILE_HEIGHT = 8, 4, 120
#: Settings shown in the report: what the numbers depend on (never secrets or URLs).
SHOWN_SETTINGS = (
    "eval_recognizers",
    "eval_frame_stride",
    "quality_gate_threshold",
    "quality_gate_recognizer",
    "quality_gate_min_face_share",
    "face_pack",
    "face_detector_size",
    "face_detection_threshold",
    "face_min_size",
    "face_device",
)
_PACKAGES = ("lynx", "insightface", "onnxruntime", "torch", "av", "matplotlib")

OpenVideo = Callable[[EvalItem], AbstractContextManager[Path]]


@dataclass(frozen=True)
class ContactSheet:
    title: str
    caption: str
    png: str  # data URI


def render_report(
    results: Sequence[VideoResult],
    *,
    name: str,
    source: str,
    recognizers: Sequence[str],
    gate_recognizer: str,
    settings: LynxSettings,
    open_video: OpenVideo,
    generated_at: datetime | None = None,
) -> str:
    """The report's HTML. ``open_video(item)`` yields a local path to the item's video (needed only
    for the contact sheets of the best and worst videos)."""
    threshold = settings.quality_gate_threshold
    rows = [{"result": r, "verdict": judge(r, gate_recognizer, settings)} for r in results]
    # Best and worst never overlap: with few videos, the better half are "best".
    order = [r for r in ranked(results, gate_recognizer) if r.metrics[gate_recognizer].frames_total]
    best_count = min(settings.eval_report_contact_sheets, (len(order) + 1) // 2)
    worst_count = min(settings.eval_report_contact_sheets, len(order) - best_count)
    best, worst = order[:best_count], order[::-1][:worst_count]
    context: dict[str, Any] = {
        "name": name,
        "source": source,
        "generated_at": (generated_at or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC"),
        "recognizers": list(recognizers),
        "gate_recognizer": gate_recognizer,
        "threshold": threshold,
        "min_face_share": settings.quality_gate_min_face_share,
        "rows": rows,
        "review": [row for row in rows if row["verdict"].needs_review],
        "failed": [r for r in results if r.metrics is None],
        "reused": sum(1 for r in results if r.reused),
        "overall": overall_stats(results, recognizers),
        "by_subject": group_stats(results, recognizers, lambda item: item.subject),
        "by_prompt": group_stats(results, recognizers, lambda item: item.prompt),
        "figures": _figures(results, recognizers, gate_recognizer, threshold),
        "best": [_sheet(r, "best", i, gate_recognizer, open_video) for i, r in enumerate(best, 1)],
        "worst": [_sheet(r, "worst", i, gate_recognizer, open_video) for i, r in enumerate(worst, 1)],
        "settings": {f"LYNX_{key.upper()}": _shown(getattr(settings, key)) for key in SHOWN_SETTINGS},
        "software": _software(),
    }
    return _environment().get_template("report.html.j2").render(**context)


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("lynx.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = lambda value, digits=3: "–" if value is None else f"{value:.{digits}f}"
    environment.filters["pct"] = lambda value: "–" if value is None else f"{value:.0%}"
    return environment


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figures(
    results: Sequence[VideoResult], recognizers: Sequence[str], gate_recognizer: str, threshold: float | None
) -> list[dict[str, str]]:
    return [
        {
            "title": "Similarity distributions",
            "png": _data_uri(similarity_distributions(results, recognizers, threshold=threshold)),
        },
        {
            "title": "Identity stability over time",
            "png": _data_uri(similarity_over_time(results, gate_recognizer, threshold=threshold)),
        },
        {
            "title": "Similarity by subject",
            "png": _data_uri(similarity_by_subject(results, gate_recognizer, threshold=threshold)),
        },
    ]


def _sheet(
    result: VideoResult, rank: str, place: int, recognizer: str, open_video: OpenVideo
) -> ContactSheet:
    """A contact sheet of frames spread over the part of the video that was sampled."""
    item = result.item
    similarity = result.metrics[recognizer]
    sampled = max(similarity.frames_total, 1)
    with open_video(item) as video, tempfile.TemporaryDirectory(prefix="lynx-sheet-") as folder:
        fps = probe_video(video).fps or 1.0
        frames = grab_frames(video, contact_sheet_indices((sampled - 1) * result.stride + 1, SHEET_FRAMES))
        path = Path(folder) / "sheet.png"
        write_contact_sheet(
            frames, path, columns=SHEET_COLUMNS, tile_height=SHEET_TILE_HEIGHT, fps=fps, tags={}
        )
        png = path.read_bytes()
    mean = "no face found" if similarity.mean is None else f"mean {similarity.mean:.3f}"
    return ContactSheet(
        title=f"{rank} #{place}: {item.subject} / {item.label}",
        caption=f"{mean} ({recognizer}), face in {similarity.face_share:.0%} of sampled frames; "
        f"prompt: {item.prompt}",
        png=_data_uri(png),
    )


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _software() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
