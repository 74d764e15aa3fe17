"""Several photos of one subject: same-person check, reference photo choice and the fused identity.

Real faces: scikit-image's astronaut twice (the original, and a mirrored, rotated, smaller and
low-quality JPEG of it: the same person, not the same pixels) and insightface's Tom Hanks photo
(another person), through the real demo face pack (YuNet + SFace).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lynx.errors import ConfigurationError
from lynx.faces import analyze_reference_photo
from lynx.faces.subject import (
    REFERENCE_EYE_DISTANCE,
    DifferentPersonError,
    PhotoFace,
    frontality,
    reference_score,
    size_score,
    subject_identity,
)
from lynx.faces.types import cosine_similarity

FRONTAL = [[40.0, 50.0], [100.0, 50.0], [70.0, 80.0], [45.0, 110.0], [95.0, 110.0]]


def _encode(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(
        ".jpg", np.ascontiguousarray(image_rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    assert ok
    return data.tobytes()


def _other_shot(image_rgb: np.ndarray) -> bytes:
    """The same person in another shot: mirrored, turned 12 degrees, 0.8x, a low-quality JPEG."""
    h, w = image_rgb.shape[:2]
    turned = cv2.warpAffine(
        np.ascontiguousarray(image_rgb[:, ::-1]), cv2.getRotationMatrix2D((w / 2, h / 2), 12, 1.0), (w, h)
    )
    small = cv2.resize(turned, (int(w * 0.8), int(h * 0.8)), interpolation=cv2.INTER_AREA)
    return _encode(small, quality=40)


def _photo_face(photo: bytes, settings, analyzer) -> PhotoFace:
    face = analyze_reference_photo(photo, settings, analyzer=analyzer)
    return PhotoFace(face.embedding, face.score, face.box.tolist(), face.kps.tolist())


# --- the scores, on keypoints ----------------------------------------------------------------------
def test_a_frontal_face_scores_one_and_a_turned_face_less():
    assert frontality(FRONTAL) == pytest.approx(1.0)
    turned = [point[:] for point in FRONTAL]
    turned[2] = [85.0, 80.0]  # nose a quarter of the eye distance off the midline
    assert frontality(turned) == pytest.approx(0.5)
    profile = [point[:] for point in FRONTAL]
    profile[2] = [110.0, 80.0]
    assert frontality(profile) == 0.0
    # the head's roll does not count: alignment straightens it
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rolled = (np.asarray(FRONTAL) @ rotation.T).tolist()
    assert frontality(rolled) == pytest.approx(1.0)


def test_the_size_term_is_the_eye_distance_over_the_reference_crops():
    assert REFERENCE_EYE_DISTANCE == pytest.approx(56.3, abs=0.1)  # the 256x256 template's
    assert size_score(FRONTAL) == 1.0  # eyes 60 px apart: the crop is filled natively
    half = (np.asarray(FRONTAL) / 2).tolist()
    assert size_score(half) == pytest.approx(30 / REFERENCE_EYE_DISTANCE)
    face = PhotoFace(np.ones(4, np.float32), 0.9, [0, 0, 1, 1], half)
    assert reference_score(face) == pytest.approx(0.9 * 30 / REFERENCE_EYE_DISTANCE)


def test_fusion_is_the_normalised_mean_and_best_is_the_reference_photo():
    a = np.array([1.0, 0.0, 0.0], np.float32)
    b = np.array([0.8, 0.6, 0.0], np.float32)
    small = (np.asarray(FRONTAL) / 3).tolist()
    faces = [PhotoFace(a, 0.9, [0, 0, 1, 1], small), PhotoFace(b, 0.8, [0, 0, 1, 1], FRONTAL)]
    fused = subject_identity(faces, recognizer="r", thresholds={"r": 0.5})
    expected = (a + b) / np.linalg.norm(a + b)
    assert np.allclose(fused.embedding, expected, atol=1e-6)
    assert fused.reference == 1  # the larger face, although its detector score is lower
    assert fused.consistency == pytest.approx([0.8, 0.8])
    best = subject_identity(faces, recognizer="r", fusion="best", thresholds={"r": 0.5})
    assert np.allclose(best.embedding, b) and best.similarity[1] == pytest.approx(1.0)


def test_one_photo_needs_no_threshold_and_is_its_own_identity():
    face = PhotoFace(np.array([3.0, 4.0], np.float32), 0.9, [0, 0, 1, 1], FRONTAL)
    identity = subject_identity([face], recognizer="no-threshold-known")
    assert np.allclose(identity.embedding, [0.6, 0.8]) and identity.reference == 0
    assert identity.consistency == [None] and identity.similarity == [pytest.approx(1.0)]


def test_several_photos_with_an_unknown_recogniser_name_the_setting():
    faces = [PhotoFace(np.eye(2, dtype=np.float32)[i], 0.9, [0, 0, 1, 1], FRONTAL) for i in range(2)]
    with pytest.raises(ConfigurationError, match="LYNX_FACE_SAME_PERSON_THRESHOLDS") as caught:
        subject_identity(faces, recognizer="glintr100")
    assert "no same-person threshold is known for recogniser 'glintr100'" in str(caught.value)


# --- real faces ------------------------------------------------------------------------------------
def test_two_photos_of_the_same_person_fuse(face_settings, analyzer, astronaut_rgb):
    faces = [
        _photo_face(_encode(astronaut_rgb), face_settings, analyzer),
        _photo_face(_other_shot(astronaut_rgb), face_settings, analyzer),
    ]
    identity = subject_identity(faces, recognizer=analyzer.embedder.name)

    assert analyzer.embedder.name == "sface_2021dec"
    assert identity.consistency[0] == identity.consistency[1] > 0.7  # far above SFace's 0.363
    expected = faces[0].embedding + faces[1].embedding
    assert np.allclose(identity.embedding, expected / np.linalg.norm(expected), atol=1e-5)
    assert all(similarity > 0.9 for similarity in identity.similarity)
    assert identity.reference == 0  # the original: larger and frontal
    assert identity.reference_scores[0] > identity.reference_scores[1] > 0


def test_a_photo_of_another_person_is_refused_with_its_name_and_score(
    face_settings, analyzer, astronaut_rgb, hanks_rgb
):
    faces = [
        _photo_face(_encode(astronaut_rgb), face_settings, analyzer),
        _photo_face(_other_shot(astronaut_rgb), face_settings, analyzer),
        _photo_face(_encode(hanks_rgb), face_settings, analyzer),
    ]
    score = np.mean([cosine_similarity(faces[2].embedding, faces[i].embedding) for i in (0, 1)])
    assert score < 0.3

    with pytest.raises(DifferentPersonError) as caught:
        subject_identity(
            faces, recognizer=analyzer.embedder.name, names=["eileen.jpg", "eileen-2.jpg", "tom.jpg"]
        )
    message = str(caught.value)
    assert message.startswith(
        f"photo 3 of 3 (tom.jpg) does not show the same person as the other photos: cosine {score:.3f}, "
        "below the same-person threshold 0.363 of sface_2021dec (LYNX_FACE_SAME_PERSON_THRESHOLDS)"
    )
    assert "\n" not in message
    # two photos, two people: the later one is named
    with pytest.raises(DifferentPersonError, match=r"^photo 2 of 2 \(photo 2\) does not show"):
        subject_identity([faces[0], faces[2]], recognizer=analyzer.embedder.name)


def test_a_configured_threshold_overrides_the_built_in_one(face_settings, analyzer, astronaut_rgb, hanks_rgb):
    faces = [
        _photo_face(_encode(astronaut_rgb), face_settings, analyzer),
        _photo_face(_encode(hanks_rgb), face_settings, analyzer),
    ]
    identity = subject_identity(faces, recognizer=analyzer.embedder.name, thresholds={"sface_2021dec": -1.0})
    assert len(identity.similarity) == 2
