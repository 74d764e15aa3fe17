"""Identity metrics of one video: the paper's face resemblance, per recogniser.

For every sampled frame the detector runs once; the largest face is aligned once per crop size
and every recogniser embeds that crop and compares it (cosine) with its own embedding of the
reference photo. Per recogniser the result is the mean over frames that show a face, the share of
frames that do, and the spread over time (std, min, max). Frames stream: one is held at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lynx.errors import ConfigurationError
from lynx.evaluation.recognizers import EvaluationModels
from lynx.faces import FaceAnalyzer, FaceEmbedder, analyze_reference_photo, arcface_crop, cosine_similarity
from lynx.faces.similarity import FaceSimilarity, SimilarityStats, iter_video_frames
from lynx.faces.types import l2_normalise
from lynx.images import load_image
from lynx.settings import LynxSettings


@dataclass(frozen=True)
class VideoMetrics:
    """Per-recogniser similarity of one video to its reference, and what it took to measure."""

    by_recognizer: dict[str, FaceSimilarity]
    stride: int
    seconds: float

    @property
    def frames_sampled(self) -> int:
        return next(iter(self.by_recognizer.values())).frames_total

    @property
    def frames_with_face(self) -> int:
        # Detection is shared, so every recogniser saw the same faces.
        return next(iter(self.by_recognizer.values())).frames_with_face


def reference_embeddings(
    photo: str | Path | bytes, models: EvaluationModels, settings: LynxSettings
) -> dict[str, np.ndarray]:
    """The reference face embedded by every recogniser, by display name.

    The photo goes through the face stage's own policy (largest face, minimum size), detected once.
    The result is biometric data: keep it in memory for the evaluation, never store it.
    """
    first, *_ = models.recognizers.values()
    reference = analyze_reference_photo(photo, settings, analyzer=FaceAnalyzer(models.detector, first))
    image_bgr: np.ndarray | None = None
    embeddings: dict[str, np.ndarray] = {}
    for name, embedder in models.recognizers.items():
        size = _input_size(embedder)
        if size == reference.arcface_crop.shape[0]:
            crop = np.ascontiguousarray(reference.arcface_crop[..., ::-1])
        else:  # a recogniser with another input size: align again from the photo itself
            if image_bgr is None:
                image_bgr = np.ascontiguousarray(
                    load_image(photo, max_pixels=settings.max_image_pixels)[..., ::-1]
                )
            crop = arcface_crop(image_bgr, reference.kps, size)
        embeddings[name] = embedder.embed(crop)
    return embeddings


def subject_reference_embeddings(
    photos: Sequence[str | Path | bytes], models: EvaluationModels, settings: LynxSettings
) -> dict[str, np.ndarray]:
    """A subject's reference for every recogniser: the normalised mean of its photos' embeddings,
    as the face stage fuses them (with one photo, that photo's). Biometric: keep it in memory."""
    if not photos:
        raise ValueError("a subject reference needs at least one photo")
    per_photo = [reference_embeddings(photo, models, settings) for photo in photos]
    if len(per_photo) == 1:
        return per_photo[0]
    return {
        name: l2_normalise(np.mean([l2_normalise(photo[name]) for photo in per_photo], axis=0))
        for name in models.recognizers
    }


def evaluate_frames(
    frames: Iterable[np.ndarray],
    references: Mapping[str, np.ndarray],
    models: EvaluationModels,
    *,
    stride: int = 1,
) -> dict[str, FaceSimilarity]:
    """Score every ``stride``-th RGB frame of ``frames`` with every recogniser of ``models``."""
    if stride < 1:
        raise ValueError("stride must be at least 1")
    for name, embedder in models.recognizers.items():
        if name not in references:
            raise ConfigurationError(f"no reference embedding for recogniser {name!r}")
        if np.asarray(references[name]).size != embedder.dim:
            raise ConfigurationError(
                f"the reference embedding for {name!r} is {np.asarray(references[name]).size}-d but the "
                f"recogniser gives {embedder.dim}-d; embed the reference with the same recogniser"
            )
    stats = {name: SimilarityStats() for name in models.recognizers}
    for index, frame in enumerate(frames):
        if index % stride:
            continue
        frame_bgr = np.ascontiguousarray(frame[..., ::-1])
        faces = models.detector.detect(frame_bgr)
        if not faces:
            for running in stats.values():
                running.add(None)
            continue
        kps = faces[FaceAnalyzer.largest(faces)].kps
        crops: dict[int, np.ndarray] = {}  # aligned once per input size, shared by the recognisers
        for name, embedder in models.recognizers.items():
            size = _input_size(embedder)
            if size not in crops:
                crops[size] = arcface_crop(frame_bgr, kps, size)
            stats[name].add(cosine_similarity(embedder.embed(crops[size]), references[name]))
    return {name: running.result() for name, running in stats.items()}


def evaluate_video(
    video: str | Path, references: Mapping[str, np.ndarray], models: EvaluationModels, *, stride: int
) -> VideoMetrics:
    """Stream a video file (PyAV, one frame at a time) through ``evaluate_frames``.

    A video with no face anywhere is a result (``frames_with_face == 0``), not an error; an
    unreadable file raises ``InputError``.
    """
    started = time.perf_counter()
    results = evaluate_frames(iter_video_frames(video, stride), references, models, stride=1)
    return VideoMetrics(by_recognizer=results, stride=stride, seconds=time.perf_counter() - started)


def _input_size(embedder: FaceEmbedder) -> int:
    return int(getattr(embedder, "input_size", 112))
