"""Identity resemblance of a generated video to its reference (the paper's face-resemblance metric).

Frames stream through: each sampled frame is searched for faces, the largest is embedded and
compared (cosine) with the reference embedding; the per-video result is the mean over frames that
show a face plus the share of frames that do. Nothing holds more than one frame at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lynx.errors import ConfigurationError, InputError
from lynx.faces.analyzer import FaceAnalyzer
from lynx.faces.types import cosine_similarity


@dataclass(frozen=True)
class FaceSimilarity:
    """Cosine statistics over the sampled frames that show a face (None when none does)."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    frames_total: int  # frames sampled (every `stride`-th frame)
    frames_with_face: int
    face_share: float  # frames_with_face / frames_total (0.0 for an empty video)
    per_frame: list[float | None] = field(default_factory=list)  # one entry per sampled frame

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean, "std": self.std, "min": self.min, "max": self.max,
            "frames_total": self.frames_total, "frames_with_face": self.frames_with_face,
            "face_share": self.face_share, "per_frame": list(self.per_frame),
        }


def video_face_similarity(
    frames: Iterable[np.ndarray],
    reference_embedding: np.ndarray,
    analyzer: FaceAnalyzer,
    *,
    stride: int = 1,
    reference_model: str | None = None,
) -> FaceSimilarity:
    """Compare every ``stride``-th RGB frame's largest face with ``reference_embedding``.

    ``reference_model`` names the recogniser that made the reference; when given it must be the
    analyzer's: two recognisers of the same width still embed into unrelated spaces.
    """
    if stride < 1:
        raise ValueError("stride must be at least 1")
    if reference_model is not None and reference_model != analyzer.embedder.name:
        raise ConfigurationError(
            f"the reference embedding was made by recogniser {reference_model!r}, not "
            f"{analyzer.embedder.name!r}; embed the reference and the video with the same "
            "LYNX_EMBEDDING_BACKEND and LYNX_FACE_RECOGNIZER",
            setting="LYNX_EMBEDDING_BACKEND",
        )
    reference = np.asarray(reference_embedding, dtype=np.float32).ravel()
    if reference.shape[0] != analyzer.embedder.dim:
        raise ConfigurationError(
            f"the reference embedding is {reference.shape[0]}-d but recogniser "
            f"{analyzer.embedder.name!r} gives {analyzer.embedder.dim}-d; embed the reference and the "
            "video with the same LYNX_EMBEDDING_BACKEND",
            setting="LYNX_EMBEDDING_BACKEND",
        )
    stats = SimilarityStats()
    for index, frame in enumerate(frames):
        if index % stride:
            continue
        faces = analyzer.find_faces(frame)
        if not faces:
            stats.add(None)
            continue
        stats.add(cosine_similarity(analyzer.embed(frame, faces[FaceAnalyzer.largest(faces)]), reference))
    return stats.result()


class SimilarityStats:
    """Running statistics of per-frame similarities (None = no face in that frame).

    Welford's running mean/variance: a stream of any length in constant memory, apart from the
    per-frame list the result carries.
    """

    def __init__(self) -> None:
        self.per_frame: list[float | None] = []
        self._count, self._mean, self._squares = 0, 0.0, 0.0
        self._low, self._high = math.inf, -math.inf

    def add(self, value: float | None) -> None:
        self.per_frame.append(value)
        if value is None:
            return
        self._count += 1
        delta = value - self._mean
        self._mean += delta / self._count
        self._squares += delta * (value - self._mean)
        self._low, self._high = min(self._low, value), max(self._high, value)

    def result(self) -> FaceSimilarity:
        total, count = len(self.per_frame), self._count
        if count == 0:
            return FaceSimilarity(None, None, None, None, total, 0, 0.0, list(self.per_frame))
        return FaceSimilarity(
            mean=self._mean, std=math.sqrt(self._squares / count), min=self._low, max=self._high,
            frames_total=total, frames_with_face=count, face_share=count / total,
            per_frame=list(self.per_frame),
        )


def iter_video_frames(path: str | Path, stride: int = 1) -> Iterator[np.ndarray]:
    """Decode a video file's first video stream lazily, yielding every ``stride``-th frame as RGB."""
    import av

    if stride < 1:
        raise ValueError("stride must be at least 1")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video {path} does not exist")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise InputError(f"{path} is not a readable video ({err})") from err
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = 0
        try:
            for frame in container.decode(stream):
                if decoded % stride == 0:
                    yield frame.to_ndarray(format="rgb24")
                decoded += 1
        except av.error.FFmpegError as err:
            raise InputError(f"{path} could not be decoded after {decoded} frames ({err})") from err
