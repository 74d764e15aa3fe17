"""The Prefect task is a thin shell over analyze_reference_photo."""

from __future__ import annotations

import pytest

from lynx.assets import demo_face_path
from lynx.faces import NoFaceError, ReferenceFace
from tasks.face import detect_and_embed


def test_task_returns_the_reference_face(face_settings):
    result = detect_and_embed.fn(demo_face_path(), face_settings)
    assert isinstance(result, ReferenceFace)
    assert result.embedding.shape == (128,) and result.reference_crop.shape == (256, 256, 3)


def test_task_does_not_retry_or_persist_biometric_results():
    assert detect_and_embed.retries == 0
    assert detect_and_embed.persist_result is False


def test_task_raises_the_typed_error(tmp_path, face_settings):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200)).save(blank)
    with pytest.raises(NoFaceError):
        detect_and_embed.fn(blank, face_settings)
