"""Evaluation: how much generated videos look like their subject (the paper's face resemblance).

Plain functions and small classes, no Prefect: ``tasks/evaluate.py`` and ``flows/evaluate.py``
(flow ``lynx-eval``) compose them, ``lynx eval`` and ``lynx bench`` call the flow.

- ``recognizers``: the detector and every recogniser of ``LYNX_EVAL_RECOGNIZERS``;
- ``metrics``: per-video similarity, one detection pass per sampled frame;
- ``sources``: what to evaluate (a campaign's delivered videos, or a manifest);
- ``evaluator``: scoring with stored-metric reuse, files fetched from the store;
- ``records``: the ``evaluations`` table; ``gate``: the quality gate;
- ``aggregate``, ``plots``, ``report``: the self-contained HTML report.
"""

from lynx.evaluation.evaluator import Evaluator, VideoResult
from lynx.evaluation.gate import GateVerdict, gate_job, gate_verdict
from lynx.evaluation.metrics import VideoMetrics, evaluate_frames, evaluate_video, reference_embeddings
from lynx.evaluation.recognizers import (
    EvaluationModels,
    RecognizerSpec,
    cached_evaluation_models,
    load_evaluation_models,
)
from lynx.evaluation.report import render_report
from lynx.evaluation.sources import (
    EvalItem,
    EvaluationSource,
    Manifest,
    collect_source,
    load_manifest,
    manifest_items,
)

__all__ = [
    "EvalItem",
    "EvaluationModels",
    "EvaluationSource",
    "Evaluator",
    "GateVerdict",
    "Manifest",
    "RecognizerSpec",
    "VideoMetrics",
    "VideoResult",
    "cached_evaluation_models",
    "collect_source",
    "evaluate_frames",
    "evaluate_video",
    "gate_job",
    "gate_verdict",
    "load_evaluation_models",
    "load_manifest",
    "manifest_items",
    "reference_embeddings",
    "render_report",
]
