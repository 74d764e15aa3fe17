"""The quality gate: a deliverable that does not look like its subject is held for review.

With ``LYNX_QUALITY_GATE_THRESHOLD`` set, a video whose mean similarity (by the gate's recogniser,
``LYNX_QUALITY_GATE_RECOGNIZER``) is below the threshold, or whose share of sampled frames
showing a face is below ``LYNX_QUALITY_GATE_MIN_FACE_SHARE``, fails the gate. In the ``lynx``
flow a failing job goes to ``needs_review`` (flag raised, reason in its error text) instead of
``completed``, so the campaign summary lists it rather than delivering it silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lynx.db.models import Job, JobStatus
from lynx.db.tracking import Tracker
from lynx.evaluation.evaluator import Evaluator, VideoResult
from lynx.evaluation.recognizers import EvaluationModels
from lynx.evaluation.sources import job_item
from lynx.faces.similarity import FaceSimilarity
from lynx.settings import LynxSettings
from lynx.store.base import ArtifactStore

GATE_STAGE = "quality_gate"


@dataclass(frozen=True)
class GateVerdict:
    """Whether a video passed; ``reason`` is one line a reviewer can act on."""

    enabled: bool
    passed: bool
    reason: str
    recognizer: str | None = None
    similarity: float | None = None
    face_share: float | None = None
    threshold: float | None = None
    min_face_share: float | None = None

    @property
    def needs_review(self) -> bool:
        return self.enabled and not self.passed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


GATE_OFF = GateVerdict(
    enabled=False, passed=True, reason="quality gate off (LYNX_QUALITY_GATE_THRESHOLD unset)"
)


def gate_verdict(
    metrics: Mapping[str, FaceSimilarity], recognizer: str, settings: LynxSettings
) -> GateVerdict:
    """Judge one video's metrics; ``recognizer`` is the display name the gate reads."""
    threshold = settings.quality_gate_threshold
    if threshold is None:
        return GATE_OFF
    result = metrics[recognizer]
    min_share = settings.quality_gate_min_face_share
    common = {
        "enabled": True,
        "recognizer": recognizer,
        "similarity": result.mean,
        "face_share": result.face_share,
        "threshold": threshold,
        "min_face_share": min_share,
    }
    if result.frames_with_face == 0:
        return GateVerdict(passed=False, reason="no face found in any sampled frame", **common)
    if result.face_share < min_share:
        return GateVerdict(
            passed=False,
            reason=f"a face shows in {result.face_share:.0%} of sampled frames, below the "
            f"required {min_share:.0%}",
            **common,
        )
    assert result.mean is not None  # frames with a face always give a mean
    if result.mean < threshold:
        return GateVerdict(
            passed=False,
            reason=f"identity similarity {result.mean:.3f} ({recognizer}) is below the "
            f"threshold {threshold:.3f}",
            **common,
        )
    return GateVerdict(
        passed=True,
        reason=f"identity similarity {result.mean:.3f} ({recognizer}) >= {threshold:.3f}",
        **common,
    )


def judge(result: VideoResult, recognizer: str, settings: LynxSettings) -> GateVerdict:
    """The gate's verdict on one evaluated video: one that could not be evaluated cannot pass."""
    if settings.quality_gate_threshold is None or result.metrics is not None:
        return gate_verdict(result.metrics or {}, recognizer, settings)
    return GateVerdict(
        enabled=True,
        passed=False,
        reason=f"could not be evaluated: {result.error}",
        recognizer=recognizer,
        threshold=settings.quality_gate_threshold,
        min_face_share=settings.quality_gate_min_face_share,
    )


def hold_for_review(tracker: Tracker, job_id: int, verdict: GateVerdict) -> Job:
    """Move a running job that failed the gate to ``needs_review``, with the reason as its error text."""
    return tracker.transition_job(
        job_id, JobStatus.NEEDS_REVIEW, error_stage=GATE_STAGE, error_text=f"quality gate: {verdict.reason}"
    )


def gate_job(
    job_id: int,
    *,
    settings: LynxSettings,
    tracker: Tracker,
    store: ArtifactStore,
    models: EvaluationModels | None = None,
) -> GateVerdict:
    """Evaluate a running job's delivered video and hold the job for review if it fails the gate.

    With the gate off nothing is measured. A video that cannot be evaluated (no reference photo,
    unreadable file) fails the gate: nothing unverified goes out as passed. The caller completes
    the job when the verdict passed.
    """
    if settings.quality_gate_threshold is None:
        return GATE_OFF
    with Evaluator(settings, tracker=tracker, store=store, models=models) as evaluator:
        result = evaluator.evaluate(job_item(tracker, tracker.get_job(job_id)))
        verdict = judge(result, evaluator.gate_recognizer, settings)
    if verdict.needs_review:
        hold_for_review(tracker, job_id, verdict)
    return verdict
