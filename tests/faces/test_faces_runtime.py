"""Execution providers and the onnxruntime double-install check."""

from __future__ import annotations

import pytest

from lynx.errors import ConfigurationError
from lynx.faces.runtime import (
    CPU,
    CUDA,
    check_onnxruntime_installation,
    installed_onnxruntime_distributions,
    onnx_providers,
    onnxruntime_conflict_message,
    torch_device,
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
