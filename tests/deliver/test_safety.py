"""Content-safety gate with a real (tiny) ONNX classifier: real scores, real blocks, no fake passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lynx.errors import ModelWeightsError
from lynx.media.errors import SafetyBlockedError
from lynx.media.safety import OnnxImageClassifierSafety, SafetyChecker, SafetyGate

from .conftest import synthetic_frames


def bright(n: int = 5) -> list[np.ndarray]:
    return list(synthetic_frames(n, 48, 64, brightness=1.6))  # mostly saturated: mean ~0.85


def dark(n: int = 5) -> list[np.ndarray]:
    return list(synthetic_frames(n, 48, 64, brightness=0.3))


@pytest.mark.parametrize(("layout", "batch"), [("nchw", "N"), ("nhwc", 1)])
def test_classifier_scores_come_from_the_model(make_brightness_classifier, layout: str, batch) -> None:
    checker = OnnxImageClassifierSafety(
        make_brightness_classifier(layout=layout, batch=batch), unsafe_index=1
    )
    assert isinstance(checker, SafetyChecker)
    bright_scores, dark_scores = checker.score_frames(bright(3)), checker.score_frames(dark(3))
    assert bright_scores.shape == (3,) and np.all(bright_scores > 0.9)
    assert np.all(dark_scores < 0.05)
    # The "safe" column is the complement: picking the other index flips the scores.
    safe = OnnxImageClassifierSafety(make_brightness_classifier(layout=layout, batch=batch), unsafe_index=0)
    np.testing.assert_allclose(safe.score_frames(bright(3)), 1 - bright_scores, atol=1e-6)


def test_gate_blocks_bright_video_and_records_the_score(make_brightness_classifier) -> None:
    checker = OnnxImageClassifierSafety(make_brightness_classifier())
    gate = SafetyGate(checker, threshold=0.5, stride=2)
    passed = list(gate.screen(iter(bright(5))))
    assert len(passed) == 5  # frames flow on unchanged
    with pytest.raises(SafetyBlockedError, match="scored 0.9.* > threshold 0.5") as caught:
        gate.enforce()
    verdict = caught.value.verdict
    assert (verdict.status, verdict.frames_checked, verdict.model) == ("blocked", 3, checker.name)
    assert verdict.score > 0.9


def test_gate_passes_dark_video_with_its_real_score(make_brightness_classifier) -> None:
    gate = SafetyGate(OnnxImageClassifierSafety(make_brightness_classifier()), threshold=0.5, stride=1)
    list(gate.screen(iter(dark(4))))
    verdict = gate.enforce()
    assert verdict.status == "passed" and verdict.frames_checked == 4
    assert 0 <= verdict.score < 0.05


def test_a_single_bright_frame_among_dark_ones_blocks(make_brightness_classifier) -> None:
    gate = SafetyGate(OnnxImageClassifierSafety(make_brightness_classifier()), threshold=0.5, stride=1)
    list(gate.screen(iter(dark(3) + bright(1) + dark(3))))
    assert gate.verdict().status == "blocked"


def test_no_classifier_means_not_checked_never_passed() -> None:
    gate = SafetyGate(None, threshold=0.5, stride=1)
    list(gate.screen(iter(bright(2))))
    verdict = gate.enforce()
    assert verdict.status == "not_checked" and verdict.score is None and verdict.model is None


def test_bad_classifier_files_are_clear_errors(tmp_path: Path, make_brightness_classifier) -> None:
    junk = tmp_path / "nsfw.onnx"
    junk.write_bytes(b"definitely not protobuf")
    with pytest.raises(ModelWeightsError, match="cannot be loaded") as caught:
        OnnxImageClassifierSafety(junk)
    assert caught.value.setting == "LYNX_DELIVER_SAFETY_MODEL"
    with pytest.raises(ModelWeightsError, match="does not exist"):
        OnnxImageClassifierSafety(tmp_path / "absent.onnx")
    with pytest.raises(ModelWeightsError, match="2 classes; unsafe index 5") as caught:
        OnnxImageClassifierSafety(make_brightness_classifier(), unsafe_index=5)
    assert caught.value.setting == "LYNX_DELIVER_SAFETY_UNSAFE_INDEX"
    with pytest.raises(ModelWeightsError, match="batches of exactly 4"):
        OnnxImageClassifierSafety(make_brightness_classifier(batch=4))
