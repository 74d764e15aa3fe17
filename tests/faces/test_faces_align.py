"""Alignment: pixel-identical to insightface's norm_crop, and the spec's extended reference crop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lynx.faces.align import (
    ARCFACE_TEMPLATE,
    arcface_crop,
    extended_template,
    reference_crop,
    similarity_transform,
    template_for_size,
)


@pytest.fixture(scope="module")
def t1_faces(analyzer, t1_rgb):
    return analyzer.find_faces(t1_rgb)


def _jittered(kps: np.ndarray, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(kps + rng.normal(0, 2.5, kps.shape)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("size", [112, 128, 224, 256])
def test_crops_are_bit_identical_to_insightface_norm_crop(t1_rgb, t1_faces, size):
    from insightface.utils import face_align

    bgr = np.ascontiguousarray(t1_rgb[..., ::-1])
    for face in t1_faces:
        for kps in [face.kps, *_jittered(face.kps, 5)]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scikit-image deprecates the estimate() insightface calls
                expected = face_align.norm_crop(bgr, landmark=kps, image_size=size)
            assert np.array_equal(arcface_crop(bgr, kps, size), expected)


def test_similarity_transform_recovers_a_known_transform():
    angle, scale, shift = np.deg2rad(17.0), 1.7, np.array([30.0, -12.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = ARCFACE_TEMPLATE.astype(np.float64)
    target = source @ (scale * rotation).T + shift
    matrix = similarity_transform(source, target)
    assert np.allclose(matrix[:, :2], scale * rotation, atol=1e-9)
    assert np.allclose(matrix[:, 2], shift, atol=1e-9)


def test_similarity_transform_never_mirrors():
    mirrored = ARCFACE_TEMPLATE.copy()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    matrix = similarity_transform(ARCFACE_TEMPLATE, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_extended_template_follows_the_spec():
    # LYNX_SPEC 2.4: down 10 px, then x0.8 about (56, 56); 256 px uses the 128 convention
    # (x2, then x + 16).
    expected_112 = (ARCFACE_TEMPLATE + [0.0, 10.0] - 56.0) * 0.8 + 56.0
    assert np.allclose(extended_template(), expected_112)
    assert np.allclose(template_for_size(extended_template(), 256), expected_112 * 2 + [16.0, 0.0])
    with pytest.raises(ValueError):
        template_for_size(ARCFACE_TEMPLATE, 200)


def test_reference_crop_puts_the_keypoints_on_the_extended_template(astronaut_rgb, analyzer):
    face = analyzer.find_faces(astronaut_rgb)[0]
    crop = reference_crop(astronaut_rgb, face.kps)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    matrix = similarity_transform(face.kps, template_for_size(extended_template(), 256))
    mapped = face.kps @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - template_for_size(extended_template(), 256)).max() < 8.0  # a real face fits to ~2%
    # The extended crop shows more of the head: the eyes sit closer together than in the 112 crop.
    arc_eyes = np.diff(ARCFACE_TEMPLATE[:2, 0])[0] / 112
    ref_eyes = np.diff(template_for_size(extended_template(), 256)[:2, 0])[0] / 256
    assert ref_eyes < arc_eyes


def test_crop_keeps_the_channel_order(astronaut_rgb, analyzer):
    face = analyzer.find_faces(astronaut_rgb)[0]
    rgb = arcface_crop(astronaut_rgb, face.kps)
    bgr = arcface_crop(np.ascontiguousarray(astronaut_rgb[..., ::-1]), face.kps)
    assert np.array_equal(rgb, bgr[..., ::-1])
