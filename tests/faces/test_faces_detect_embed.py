"""Detection and embedding with the real demo models on real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lynx.faces import DetectedFace, FaceDetector, FaceEmbedder, cosine_similarity, load_face_analyzer

SAME_PERSON = 0.8  # SFace measured 0.94-0.96 here for the variants below
DIFFERENT_PEOPLE = 0.4  # measured: astronaut, Hanks vs the rest 0.02-0.15; t1 among itself up to 0.36


def _largest_embedding(analyzer, image_rgb):
    faces = analyzer.find_faces(image_rgb)
    assert faces, "expected a face"
    return analyzer.embed(image_rgb, faces[analyzer.largest(faces)])


def _jpeg(image_rgb, quality):
    ok, data = cv2.imencode(".jpg", image_rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


def _rotate(image_rgb, degrees, scale=1.0):
    h, w = image_rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    return cv2.warpAffine(image_rgb, matrix, (w, h))


def test_models_fulfil_the_protocols(analyzer):
    assert isinstance(analyzer.detector, FaceDetector)
    assert isinstance(analyzer.embedder, FaceEmbedder)
    assert analyzer.embedder.dim == 128  # read from SFace's output, not assumed
    assert analyzer.embedder.name == "sface_2021dec"


def test_t1_has_six_faces(analyzer, t1_rgb):
    faces = analyzer.find_faces(t1_rgb)
    assert len(faces) == 6
    for face in faces:
        assert isinstance(face, DetectedFace)
        assert face.box.shape == (4,) and face.kps.shape == (5, 2) and face.score >= 0.5
        x1, y1, x2, y2 = face.box
        assert (x1 <= face.kps[:, 0]).all() and (face.kps[:, 0] <= x2).all()
        assert (y1 <= face.kps[:, 1]).all() and (face.kps[:, 1] <= y2).all()
        # ArcFace order: eyes above nose above mouth; image-left eye and mouth corner first
        assert face.kps[0, 0] < face.kps[1, 0] and face.kps[3, 0] < face.kps[4, 0]
        assert face.kps[:2, 1].max() < face.kps[2, 1] < face.kps[3:, 1].min()


def test_astronaut_has_one_face_where_it_is(analyzer, astronaut_rgb):
    faces = analyzer.find_faces(astronaut_rgb)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 150 < x1 < 200 and 40 < y1 < 90 and 250 < x2 < 290 and 150 < y2 < 200


def test_blank_images_have_no_faces(analyzer):
    assert analyzer.find_faces(np.zeros((480, 640, 3), np.uint8)) == []
    assert analyzer.find_faces(np.full((64, 2000, 3), 200, np.uint8)) == []


@pytest.mark.parametrize(
    "variant",
    [
        lambda im: np.ascontiguousarray(im[:, ::-1]),
        lambda im: _rotate(im, 12, 0.8),
        lambda im: _rotate(im, -20),
        lambda im: cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA),
        lambda im: cv2.resize(im, (1400, 1400), interpolation=cv2.INTER_CUBIC),
        lambda im: _jpeg(im, 25),
        lambda im: np.ascontiguousarray(im[30:330, 100:350]),
    ],
    ids=["flip", "rotate12-scale0.8", "rotate-20", "half", "upscale", "jpeg-q25", "crop"],
)
def test_same_person_survives_photo_changes(analyzer, astronaut_rgb, variant):
    original = _largest_embedding(analyzer, astronaut_rgb)
    assert cosine_similarity(original, _largest_embedding(analyzer, variant(astronaut_rgb))) > SAME_PERSON


def test_different_people_are_far_apart(analyzer, astronaut_rgb, t1_rgb, hanks_rgb):
    astronaut = _largest_embedding(analyzer, astronaut_rgb)
    hanks = _largest_embedding(analyzer, hanks_rgb)
    t1 = [analyzer.embed(t1_rgb, face) for face in analyzer.find_faces(t1_rgb)]
    assert cosine_similarity(astronaut, hanks) < DIFFERENT_PEOPLE
    for other in t1:
        assert cosine_similarity(astronaut, other) < DIFFERENT_PEOPLE
        assert cosine_similarity(hanks, other) < DIFFERENT_PEOPLE
    for i in range(len(t1)):
        for j in range(i + 1, len(t1)):
            assert cosine_similarity(t1[i], t1[j]) < DIFFERENT_PEOPLE


def test_embeddings_are_unit_vectors_and_batching_changes_nothing(analyzer, t1_rgb):
    from lynx.faces.align import arcface_crop

    bgr = np.ascontiguousarray(t1_rgb[..., ::-1])
    crops = np.stack([arcface_crop(bgr, face.kps) for face in analyzer.find_faces(t1_rgb)])
    batch = analyzer.embedder.embed(crops)
    assert batch.shape == (6, 128) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.stack([analyzer.embedder.embed(crop) for crop in crops])
    assert np.allclose(batch, singles, atol=1e-5)
    with pytest.raises(ValueError, match="112x112"):
        analyzer.embedder.embed(np.zeros((100, 100, 3), np.uint8))


def test_detector_size_setting_is_used(settings_for, t1_rgb):
    small = load_face_analyzer(settings_for(face_detector_size=320))
    assert small.detector.input_size == 320
    # At 320 px the faces of t1 are ~25 px; the detector still finds most of them.
    assert 4 <= len(small.find_faces(t1_rgb)) <= 6


def test_threshold_setting_is_used(settings_for, t1_rgb):
    strict = load_face_analyzer(settings_for(face_detection_threshold=0.99))
    assert strict.find_faces(t1_rgb) == []
