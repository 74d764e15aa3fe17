"""DeliverySpec: built from the settings, impossible values refused with the variable to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.media.errors import InvalidDeliverySpecError
from lynx.media.resize import output_size
from lynx.media.spec import DeliverySpec
from lynx.settings import LynxSettings


def test_spec_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, logo_png: Path) -> None:
    models = tmp_path / "models"
    (models / "safety").mkdir(parents=True)
    (models / "safety" / "nsfw.onnx").write_bytes(b"onnx")
    for name, value in {
        "LYNX_MODELS_DIR": str(models),
        "LYNX_DELIVER_HEIGHT": "720",
        "LYNX_DELIVER_FPS": "24",
        "LYNX_DELIVER_FPS_MODE": "duplicate",
        "LYNX_DELIVER_RENDITIONS": '["h265", "vp9"]',
        "LYNX_DELIVER_CRF": "20",
        "LYNX_DELIVER_WATERMARK": str(logo_png),
        "LYNX_DELIVER_SAFETY_MODEL": "nsfw.onnx",
        "LYNX_DELIVER_SAFETY_THRESHOLD": "0.7",
    }.items():
        monkeypatch.setenv(name, value)

    spec = DeliverySpec.from_settings(LynxSettings(), source_fps=24)

    assert (spec.height, spec.fps, spec.fps_mode, spec.crf) == (720, 24, "duplicate", 20)
    assert spec.renditions == ("h265", "vp9")
    assert spec.watermark == logo_png
    assert spec.safety_model == models / "safety" / "nsfw.onnx"  # relative: inside the models folder
    assert spec.safety_threshold == 0.7
    assert spec.source_fps == 24 and spec.target_fps == 24


def test_defaults_keep_native_size_and_rate() -> None:
    spec = DeliverySpec.from_settings(LynxSettings())
    assert (spec.height, spec.fps, spec.target_fps, spec.renditions) == (0, 0, 16.0, ())
    assert spec.upscaler == "lanczos" and spec.audio is None and spec.safety_model is None


@pytest.mark.parametrize(
    ("overrides", "setting", "message"),
    [
        ({"height": 721}, "LYNX_DELIVER_HEIGHT", "must be even"),
        ({"height": 32}, "LYNX_DELIVER_HEIGHT", "too small"),
        ({"crf": 52}, "LYNX_DELIVER_CRF", "less than or equal to 51"),
        ({"fps": -24}, "LYNX_DELIVER_FPS", "greater than or equal to 0"),
        ({"renditions": ["h265", "av2"]}, "LYNX_DELIVER_RENDITIONS", "unknown rendition 'av2'"),
        ({"renditions": ["vp9", "vp9"]}, "LYNX_DELIVER_RENDITIONS", "twice"),
        ({"preset": "ludicrous"}, "LYNX_DELIVER_PRESET", "unknown preset"),
        ({"audio": Path("/nonexistent/jingle.wav")}, "LYNX_DELIVER_AUDIO", "does not exist"),
        ({"watermark_opacity": 0}, "LYNX_DELIVER_WATERMARK_OPACITY", "greater than 0"),
        ({"upscale_tile": 64, "upscale_tile_overlap": 32}, "LYNX_DELIVER_UPSCALE_TILE_OVERLAP", "half"),
        ({"audio_bitrate": "loud"}, "LYNX_DELIVER_AUDIO_BITRATE", "invalid"),
    ],
)
def test_impossible_settings_are_refused_naming_the_variable(
    overrides: dict, setting: str, message: str
) -> None:
    with pytest.raises(InvalidDeliverySpecError, match=message) as caught:
        DeliverySpec(**overrides)
    assert caught.value.setting == setting
    assert setting in str(caught.value)
    assert isinstance(caught.value, ConfigurationError)  # CLI exit code 2


def test_missing_model_files_name_their_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelWeightsError, match="needs a weight file") as caught:
        DeliverySpec(upscaler="realesrgan")
    assert caught.value.setting == "LYNX_DELIVER_REALESRGAN_WEIGHTS"
    with pytest.raises(ModelWeightsError, match="do not exist"):
        DeliverySpec(upscaler="realesrgan", realesrgan_weights=tmp_path / "RealESRGAN_x4plus.pth")
    with pytest.raises(ModelWeightsError, match="does not exist") as caught:
        DeliverySpec(safety_model=tmp_path / "nsfw.onnx")
    assert caught.value.setting == "LYNX_DELIVER_SAFETY_MODEL"


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ((832, 480), 0, (832, 480)),
        ((832, 480), 720, (1248, 720)),
        ((832, 480), 1080, (1872, 1080)),
        ((480, 832), 1080, (624, 1080)),  # portrait keeps its aspect
        ((96, 64), 144, (216, 144)),
        ((100, 64), 150, (234, 150)),  # 234.375 -> nearest even
        ((832, 480), 360, (624, 360)),  # smaller than the source: a downscale
    ],
)
def test_output_size_keeps_aspect_with_even_sides(source: tuple, target: int, expected: tuple) -> None:
    assert output_size(*source, target) == expected
