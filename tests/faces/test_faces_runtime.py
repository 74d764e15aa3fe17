"""Execution providers and the onnxruntime double-install check."""

from __future__ import annotations

import logging

import pytest

from lynx.errors import ConfigurationError
from lynx.faces import runtime
from lynx.faces.runtime import (
    CPU,
    CUDA,
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


def test_conflict_message_names_both_builds():
    assert onnxruntime_conflict_message(["onnxruntime"]) is None
    message = onnxruntime_conflict_message(["onnxruntime", "onnxruntime-gpu"])
    assert "onnxruntime-gpu" in message and "pip uninstall" in message


def test_installed_runtime_is_found():
    assert "onnxruntime" in installed_onnxruntime_distributions()


def test_warning_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "_conflict_checked", False)
    both = ["onnxruntime", "onnxruntime-gpu"]
    monkeypatch.setattr(runtime, "installed_onnxruntime_distributions", lambda: both)
    with caplog.at_level(logging.WARNING, logger="lynx.faces.runtime"):
        runtime.warn_on_onnxruntime_conflict()
        runtime.warn_on_onnxruntime_conflict()
    assert len([r for r in caplog.records if "several onnxruntime builds" in r.getMessage()]) == 1
