"""What the face stage passes around: detections, and the two roles a face model can play."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class DetectedFace:
    """One face found in an image, in that image's pixel coordinates.

    ``box`` is ``[x1, y1, x2, y2]``; ``kps`` holds five ``(x, y)`` points in insightface/ArcFace
    order: the eye, mouth corner pair as they appear left-to-right in the image, nose in between
    (left eye, right eye, nose tip, left mouth corner, right mouth corner).
    """

    box: np.ndarray  # (4,) float32
    score: float
    kps: np.ndarray  # (5, 2) float32

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def short_side(self) -> float:
        return min(self.width, self.height)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: ``{"box": [...4], "score": s, "kps": [[x, y], ...5]}``."""
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "kps": [[round(float(x), 2), round(float(y), 2)] for x, y in self.kps],
        }


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces and their five keypoints in a BGR ``uint8`` image (OpenCV/insightface order)."""

    name: str

    def detect(self, image_bgr: np.ndarray) -> list[DetectedFace]: ...


@runtime_checkable
class FaceEmbedder(Protocol):
    """Turns ArcFace-aligned BGR crops of side ``input_size`` (S, 112 for most recognisers) into
    L2-normalised identity vectors.

    ``embed`` takes one crop ``(S, S, 3)`` and returns ``(dim,)``, or a batch ``(N, S, S, 3)``
    and returns ``(N, dim)``; ``dim`` and ``input_size`` are read from the model.
    """

    name: str
    dim: int
    input_size: int

    def embed(self, aligned_bgr: np.ndarray) -> np.ndarray: ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings (any scale)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape[0]} vs {b.shape[0]}")
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
