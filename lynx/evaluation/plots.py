"""Report figures as PNG bytes, drawn with matplotlib's Agg canvas.

Figures are built on ``matplotlib.figure.Figure`` directly rather than pyplot: no global figure
state, no GUI backend, safe in worker threads. Same data, same bytes (PNG carries no timestamp).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lynx.evaluation.evaluator import VideoResult

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _threshold_line(axes, threshold: float | None, *, vertical: bool) -> None:
    if threshold is None:
        return
    draw = axes.axvline if vertical else axes.axhline
    draw(threshold, color="black", linestyle="--", linewidth=1, label=f"gate threshold {threshold:.2f}")


def similarity_distributions(
    results: Sequence[VideoResult], recognizers: Sequence[str], *, threshold: float | None = None
) -> bytes:
    """Histograms per recogniser: per-video mean similarity (left) and every sampled frame (right)."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    per_video, per_frame = figure.subplots(1, 2)
    bins = np.linspace(-0.2, 1.0, 25)
    for index, name in enumerate(recognizers):
        colour = _COLOURS[index % len(_COLOURS)]
        means = [r.mean(name) for r in results if r.metrics and r.mean(name) is not None]
        frames = [v for r in results if r.metrics for v in r.metrics[name].per_frame if v is not None]
        per_video.hist(np.clip(means, -0.2, 1.0), bins=bins, alpha=0.55, color=colour, label=name)
        per_frame.hist(np.clip(frames, -0.2, 1.0), bins=bins, alpha=0.55, color=colour, label=name)
    for axes, title, unit in (
        (per_video, "Per-video mean similarity", "videos"),
        (per_frame, "Per-frame similarity", "frames"),
    ):
        _threshold_line(axes, threshold, vertical=True)
        axes.set_title(title)
        axes.set_xlabel("cosine similarity to the reference")
        axes.set_ylabel(unit)
        axes.set_xlim(-0.2, 1.0)
        axes.legend(fontsize="small")
    return _png(figure)


def similarity_over_time(
    results: Sequence[VideoResult], recognizer: str, *, threshold: float | None = None, limit: int = 40
) -> bytes:
    """Per-frame similarity along each video (gaps where no face was found): identity stability."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    axes = figure.subplots()
    scored = [r for r in results if r.metrics is not None][:limit]
    alpha = 0.9 if len(scored) <= 8 else 0.35
    for index, result in enumerate(scored):
        values = np.array([np.nan if v is None else v for v in result.metrics[recognizer].per_frame], float)
        frames = np.arange(len(values)) * result.stride
        label = f"{result.item.subject} / {result.item.label}" if len(scored) <= 8 else None
        axes.plot(
            frames,
            values,
            marker=".",
            linewidth=1,
            alpha=alpha,
            label=label,
            color=_COLOURS[index % len(_COLOURS)],
        )
    _threshold_line(axes, threshold, vertical=False)
    axes.set_title(f"Similarity over time ({recognizer})")
    axes.set_xlabel("frame")
    axes.set_ylabel("cosine similarity")
    axes.set_ylim(-0.2, 1.0)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small", loc="lower left")
    return _png(figure)


def similarity_by_subject(
    results: Sequence[VideoResult], recognizer: str, *, threshold: float | None = None
) -> bytes:
    """Box plot of per-video mean similarity for each subject."""
    groups: dict[str, list[float]] = {}
    for result in results:
        if result.metrics is not None and result.mean(recognizer) is not None:
            groups.setdefault(result.item.subject, []).append(result.mean(recognizer))
    figure = Figure(figsize=(10, max(2.5, 0.35 * len(groups) + 1.2)), layout="constrained")
    axes = figure.subplots()
    if groups:
        axes.boxplot(list(groups.values()), orientation="horizontal", tick_labels=list(groups))
    else:
        axes.text(0.4, 0.5, "no video showed a face", transform=axes.transAxes)
    _threshold_line(axes, threshold, vertical=True)
    axes.set_title(f"Per-video mean similarity by subject ({recognizer})")
    axes.set_xlabel("cosine similarity")
    axes.set_xlim(-0.2, 1.0)
    return _png(figure)
