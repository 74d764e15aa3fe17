"""Scoring items against the tracking database and the artifact store, with one set of models.

``Evaluator`` is what the task and the CLI use: for each ``EvalItem`` it reuses stored metrics
when the same video, reference, stride and setup were measured before, else it fetches the files
(streamed from the store into a private temp folder), embeds the reference once per photo,
scores the video, records the rows (and, for a job, an ``evaluate`` stage run and a compute
event). Reference embeddings live in memory only and, with the downloaded files, are dropped
when the evaluator closes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lynx.db.tracking import Tracker
from lynx.errors import InputError, NotFoundError
from lynx.evaluation.metrics import evaluate_video, subject_reference_embeddings
from lynx.evaluation.recognizers import EvaluationModels, cached_evaluation_models, setup_for
from lynx.evaluation.records import save_metrics, stored_metrics
from lynx.evaluation.sources import EvalItem
from lynx.faces.pack import sha256_file
from lynx.faces.similarity import FaceSimilarity
from lynx.settings import LynxSettings
from lynx.store.base import ArtifactStore

log = logging.getLogger(__name__)

EVALUATE_STAGE = "evaluate"


@dataclass(frozen=True)
class VideoResult:
    """The outcome for one item: metrics by recogniser, or the reason there are none."""

    item: EvalItem
    stride: int
    metrics: dict[str, FaceSimilarity] | None = None
    reused: bool = False
    seconds: float = 0.0
    error: str | None = None

    def mean(self, recognizer: str) -> float | None:
        return self.metrics[recognizer].mean if self.metrics else None


class Evaluator:
    """Evaluates items one by one; use as a context manager (it owns a temp folder)."""

    def __init__(
        self,
        settings: LynxSettings,
        *,
        tracker: Tracker,
        store: ArtifactStore | None = None,
        models: EvaluationModels | None = None,
        stride: int | None = None,
        force: bool = False,
    ) -> None:
        self.settings = settings
        self.tracker = tracker
        self.store = store
        self.models = models or cached_evaluation_models(settings)
        self.stride = stride or settings.eval_frame_stride
        self.force = force
        self.gate_recognizer = self.models.resolve(settings.quality_gate_recognizer)
        self._setups = {name: setup_for(self.models.setup, name) for name in self.models.names}
        self._references: dict[str, dict[str, np.ndarray]] = {}
        self._workdir = Path(tempfile.mkdtemp(prefix="lynx-eval-"))

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._references.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def evaluate(self, item: EvalItem) -> VideoResult:
        """Score one item. Problems with the item itself (missing or unreadable file, no face in the
        reference photo) come back as ``error``; missing models and dead services raise."""
        if item.skip_reason is not None:
            return VideoResult(item, self.stride, error=item.skip_reason)
        try:
            video_sha = item.video_sha256 or sha256_file(Path(item.video))
            reference_sha = item.reference_sha256 or sha256_file(Path(item.reference))
            if not self.force:
                stored = stored_metrics(
                    self.tracker,
                    video_sha256=video_sha,
                    reference_sha256=reference_sha,
                    stride=self.stride,
                    setups=self._setups,
                )
                if stored is not None:
                    self._count(item, video_sha, reference_sha, reused=True)
                    return VideoResult(item, self.stride, stored, reused=True)
            return self._measure(item, video_sha, reference_sha)
        except (InputError, NotFoundError) as err:  # this item's files, not the run, are at fault
            log.warning("cannot evaluate %s: %s", item.label, err)
            return VideoResult(item, self.stride, error=str(err))

    def _measure(self, item: EvalItem, video_sha: str, reference_sha: str) -> VideoResult:
        started = time.perf_counter()
        if item.job_id is None:
            metrics = self._score(item, reference_sha)
        else:
            with self.tracker.stage(
                item.job_id, EVALUATE_STAGE, inputs=[item.video, item.reference]
            ) as stage:
                metrics = self._score(item, reference_sha)
                stage.metrics.update(
                    stride=self.stride,
                    frames_sampled=metrics.frames_sampled,
                    frames_with_face=metrics.frames_with_face,
                    similarity={name: r.mean for name, r in metrics.by_recognizer.items()},
                )
        save_metrics(
            self.tracker,
            video=item.video,
            video_sha256=video_sha,
            reference_sha256=reference_sha,
            stride=self.stride,
            metrics=metrics.by_recognizer,
            setups=self._setups,
            job_id=item.job_id,
            duration_s=metrics.seconds,
        )
        seconds = time.perf_counter() - started
        self._count(item, video_sha, reference_sha, reused=False, duration_s=seconds)
        return VideoResult(item, self.stride, metrics.by_recognizer, seconds=seconds)

    def _score(self, item: EvalItem, reference_sha: str):
        references = self._reference_embeddings(item, reference_sha)
        with self.local_file(item, item.video) as video:
            return evaluate_video(video, references, self.models, stride=self.stride)

    def _reference_embeddings(self, item: EvalItem, reference_sha: str) -> dict[str, np.ndarray]:
        if reference_sha not in self._references:
            locations = item.references or (item.reference,)
            with ExitStack() as files:
                photos = [files.enter_context(self.local_file(item, location)) for location in locations]
                self._references[reference_sha] = subject_reference_embeddings(
                    photos, self.models, self.settings
                )
        return self._references[reference_sha]

    def local_file(self, item: EvalItem, location: str) -> AbstractContextManager[Path]:
        """A local path for one of ``item``'s files (downloaded into the evaluator's temp folder)."""
        return local_copy(location, store=self.store if item.in_store else None, folder=self._workdir)

    def _count(
        self,
        item: EvalItem,
        video_sha: str,
        reference_sha: str,
        *,
        reused: bool,
        duration_s: float | None = None,
    ) -> None:
        self.tracker.record_compute_event(
            EVALUATE_STAGE,
            f"{video_sha}:{reference_sha[:16]}:{self.stride}",
            reused=reused,
            job_id=item.job_id,
            duration_s=duration_s,
        )


@contextmanager
def local_copy(location: str, *, store: ArtifactStore | None, folder: Path) -> Iterator[Path]:
    """A local path for ``location``: the file itself (``store`` None), or a download from the store
    into ``folder``, verified against its sha256 and removed on exit."""
    if store is None:
        yield Path(location)
        return
    handle, name = tempfile.mkstemp(prefix="fetched-", suffix=Path(location).suffix, dir=folder)
    os.close(handle)
    path = Path(name)
    try:
        store.get_file(location, path)
        yield path
    finally:
        path.unlink(missing_ok=True)
