"""Per-campaign numbers from per-video results: overall, per subject and per prompt.

The paper reports, per recogniser, the mean over videos of each video's mean face similarity
(LYNX_SPEC section 8); a video where no face was found has no similarity and is counted apart
(``no_face``) instead of dragging the mean to zero.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lynx.evaluation.evaluator import VideoResult
from lynx.evaluation.sources import EvalItem


@dataclass(frozen=True)
class Spread:
    """Statistics of per-video mean similarities (None when no video had a face)."""

    videos: int
    mean: float | None
    median: float | None
    std: float | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls(0, None, None, None, None, None)
        return cls(
            len(values),
            statistics.fmean(values),
            statistics.median(values),
            statistics.pstdev(values),
            min(values),
            max(values),
        )


@dataclass(frozen=True)
class GroupStats:
    """One row of a per-subject / per-prompt table (or the whole run)."""

    key: str
    items: int  # videos listed
    scored: int  # videos evaluated (not skipped, not failed)
    no_face: int  # evaluated videos without a single face
    face_share: float | None  # mean share of sampled frames with a face, over evaluated videos
    by_recognizer: dict[str, Spread]


def group_stats(
    results: Iterable[VideoResult], recognizers: Sequence[str], key: Callable[[EvalItem], str]
) -> list[GroupStats]:
    """Results grouped by ``key(item)``, groups in order of first appearance."""
    groups: dict[str, list[VideoResult]] = {}
    for result in results:
        groups.setdefault(key(result.item), []).append(result)
    return [_stats(name, members, recognizers) for name, members in groups.items()]


def overall_stats(results: Sequence[VideoResult], recognizers: Sequence[str]) -> GroupStats:
    return _stats("all videos", list(results), recognizers)


def _stats(name: str, members: list[VideoResult], recognizers: Sequence[str]) -> GroupStats:
    scored = [r for r in members if r.metrics is not None]
    first = recognizers[0]
    shares = [r.metrics[first].face_share for r in scored]
    return GroupStats(
        key=name,
        items=len(members),
        scored=len(scored),
        no_face=sum(1 for r in scored if r.metrics[first].frames_with_face == 0),
        face_share=statistics.fmean(shares) if shares else None,
        by_recognizer={
            recognizer: Spread.of(
                [r.metrics[recognizer].mean for r in scored if r.metrics[recognizer].mean is not None]
            )
            for recognizer in recognizers
        },
    )


def ranked(results: Iterable[VideoResult], recognizer: str) -> list[VideoResult]:
    """Evaluated videos from most to least similar; videos without a face come last."""
    scored = [r for r in results if r.metrics is not None]
    return sorted(scored, key=lambda r: (r.mean(recognizer) is None, -(r.mean(recognizer) or 0.0)))
