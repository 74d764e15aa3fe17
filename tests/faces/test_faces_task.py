"""The Prefect task is a thin shell over analyze_reference_photo."""

from __future__ import annotations

import pytest

from lynx.assets import demo_face_path
from lynx.faces import NoFaceError, ReferenceFace
from tasks.face import detect_and_embed, face_cache_key


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


def test_face_cache_key_changes_when_a_model_file_is_replaced(tmp_path, face_models_dir):
    """A recogniser swapped under the same name must not reuse embeddings of the old one."""
    import shutil

    from tests.faces.conftest import make_settings

    models = tmp_path / "models"
    shutil.copytree(face_models_dir, models)
    settings = make_settings(tmp_path / "home", models)
    before = face_cache_key("ab" * 32, settings)
    assert face_cache_key("ab" * 32, settings) == before
    assert face_cache_key("cd" * 32, settings) != before

    recognizer = settings.resolved_face_pack_dir / "sface_2021dec.onnx"
    data = bytearray(recognizer.read_bytes())
    data[-1] ^= 0xFF
    recognizer.write_bytes(bytes(data))
    assert face_cache_key("ab" * 32, settings) != before
