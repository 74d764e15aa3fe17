"""One person, several photos: are they the same person, which photo gives the reference, one identity.

A subject may come with several photos (angles, lighting). Each is analysed like a single photo
(largest face, aligned, embedded); then, with no Prefect, store or database involved:

1. **Same person?** Each photo's consistency is its mean cosine similarity with the other photos'
   embeddings. The least consistent photo below the recogniser's same-person threshold is refused
   with its number, name and score (``DifferentPersonError``), before any GPU time is spent.
2. **Reference photo.** The Ref-adapter takes one aligned face crop, so one photo is chosen by
   ``reference_score`` = detector score x size x frontality (each in [0, 1]; ties: the earlier
   photo):
   - *size*: the distance between the eyes over the eye distance of the 256x256 reference crop's
     template (56 px), capped at 1: a face whose eyes are at least that far apart fills the crop
     with its own pixels, a smaller one is upsampled into it;
   - *frontality*: 1 - 2 x (the nose tip's distance from the face's midline, the line through the
     midpoints of the eyes and of the mouth corners, over the eye distance), floored at 0. A
     frontal face has its nose on the midline; turning the head moves the nose off it.
3. **Identity.** ``fuse`` (the default): the normalised mean of every photo's embedding; ``best``:
   the reference photo's own embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lynx.errors import ConfigurationError, InputError
from lynx.faces.align import extended_template, template_for_size
from lynx.faces.analyzer import REFERENCE_CROP_SIZE
from lynx.faces.types import cosine_similarity, l2_normalise

Fusion = Literal["fuse", "best"]
THRESHOLD_SETTING = "LYNX_FACE_SAME_PERSON_THRESHOLDS"

#: Same-person cosine thresholds of recognisers that publish one, by recogniser name. SFace's is
#: OpenCV's own (its face recognition sample and model zoo: cosine >= 0.363 means same identity,
#: tuned on LFW). Cosine scales differ between recognisers, so others must be configured.
KNOWN_SAME_PERSON_THRESHOLDS: dict[str, float] = {"sface_2021dec": 0.363}


class DifferentPersonError(InputError):
    """A subject's photos do not all show the same person."""


@dataclass(frozen=True)
class PhotoFace:
    """What the face stage found in one photo of a subject (no pixels)."""

    embedding: np.ndarray  # (dim,) float32, unit length
    det_score: float
    box: Sequence[float]  # [x1, y1, x2, y2]
    kps: Sequence[Sequence[float]]  # 5 x (x, y): eyes, nose tip, mouth corners


@dataclass(frozen=True)
class SubjectIdentity:
    """The subject's identity from all of its photos."""

    embedding: np.ndarray  # (dim,) float32, unit length: what the identity adapter conditions on
    reference: int  # index of the photo the reference (and ArcFace) crop comes from
    fusion: Fusion
    reference_scores: list[float]  # per photo, see reference_score
    consistency: list[float | None]  # per photo: mean cosine with the others (None for one photo)
    similarity: list[float]  # per photo: cosine with ``embedding``


def _template_eye_distance() -> float:
    template = template_for_size(extended_template(), REFERENCE_CROP_SIZE)
    return float(np.linalg.norm(template[1] - template[0]))


#: Eye distance in the reference crop (56 px at 256x256): the face size that fills it natively.
REFERENCE_EYE_DISTANCE = _template_eye_distance()


def frontality(kps: Sequence[Sequence[float]]) -> float:
    """1 for a frontal face, falling to 0 as the head turns (see the module docstring)."""
    points = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    left_eye, right_eye, nose, left_mouth, right_mouth = points
    eye_distance = float(np.linalg.norm(right_eye - left_eye))
    if eye_distance <= 0:
        return 0.0
    top, bottom = (left_eye + right_eye) / 2, (left_mouth + right_mouth) / 2
    axis = bottom - top
    length = float(np.linalg.norm(axis))
    if length <= 0:
        return 0.0
    offset = abs(float(axis[0] * (nose - top)[1] - axis[1] * (nose - top)[0])) / length
    return max(0.0, 1.0 - 2.0 * offset / eye_distance)


def size_score(kps: Sequence[Sequence[float]]) -> float:
    """The eye distance over the reference crop's, capped at 1."""
    points = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    return min(1.0, float(np.linalg.norm(points[1] - points[0])) / REFERENCE_EYE_DISTANCE)


def reference_score(face: PhotoFace) -> float:
    """How good a reference crop the photo's face makes: detector score x size x frontality."""
    return float(face.det_score) * size_score(face.kps) * frontality(face.kps)


def consistency(embeddings: Sequence[np.ndarray]) -> list[float | None]:
    """Each embedding's mean cosine with the others (None when there is only one)."""
    if len(embeddings) < 2:
        return [None] * len(embeddings)
    return [
        float(np.mean([cosine_similarity(e, other) for j, other in enumerate(embeddings) if j != i]))
        for i, e in enumerate(embeddings)
    ]


def same_person_threshold(recognizer: str, configured: Mapping[str, float]) -> float:
    """The cosine at or above which two photos show the same person, for ``recognizer``."""
    thresholds = {**KNOWN_SAME_PERSON_THRESHOLDS, **configured}
    if recognizer not in thresholds:
        raise ConfigurationError(
            f"no same-person threshold is known for recogniser {recognizer!r}, needed to check that "
            f"several photos show one person; set {THRESHOLD_SETTING} to a JSON object such as "
            f'{{"{recognizer}": <cosine>}} (measure pairs with `lynx faces compare`)',
            setting=THRESHOLD_SETTING,
        )
    return float(thresholds[recognizer])


def subject_identity(
    faces: Sequence[PhotoFace],
    *,
    recognizer: str,
    fusion: Fusion = "fuse",
    thresholds: Mapping[str, float] | None = None,
    names: Sequence[str] | None = None,
) -> SubjectIdentity:
    """Check that the photos show one person, choose the reference photo and make the identity.

    ``names`` label the photos in the error (default: "photo N"). One photo needs no threshold.
    """
    if not faces:
        raise InputError("a subject needs at least one photo")
    embeddings = [l2_normalise(face.embedding) for face in faces]
    scores = consistency(embeddings)
    if len(faces) > 1:
        threshold = same_person_threshold(recognizer, thresholds or {})
        worst = min(range(len(faces)), key=lambda i: (scores[i], -i))  # ties: the later photo
        if scores[worst] < threshold:
            label = names[worst] if names else f"photo {worst + 1}"
            raise DifferentPersonError(
                f"photo {worst + 1} of {len(faces)} ({label}) does not show the same person as the "
                f"other photos: cosine {scores[worst]:.3f}, below the same-person threshold "
                f"{threshold:.3f} of {recognizer} ({THRESHOLD_SETTING}); remove it or use another photo"
            )
    quality = [reference_score(face) for face in faces]
    reference = max(range(len(faces)), key=lambda i: (quality[i], -i))  # ties: the earlier photo
    if fusion == "fuse":
        embedding = l2_normalise(np.mean(np.stack(embeddings), axis=0))
    else:
        embedding = embeddings[reference]
    return SubjectIdentity(
        embedding=embedding.astype(np.float32),
        reference=reference,
        fusion=fusion,
        reference_scores=quality,
        consistency=scores,
        similarity=[cosine_similarity(e, embedding) for e in embeddings],
    )
