"""Where face models run: onnxruntime execution providers and the torch device.

``auto`` takes CUDA when the installed runtime offers it and CPU otherwise; it never fails for
want of a GPU. ``cuda`` is for fleets that must not silently fall back to CPU.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import onnxruntime

from lynx.errors import ConfigurationError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# Every one of these ships the same `onnxruntime` Python module; with two installed, whichever
# was unpacked last wins file by file and the result may not import or may lack CUDA.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")

# `pip install '.[gpu]'` leaves insightface's `onnxruntime` beside `onnxruntime-gpu`.
GPU_RUNTIME_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install --no-deps onnxruntime-gpu"

_PRELOAD_LOCK = threading.Lock()
_cuda_preloaded = False


def onnx_providers(device: str, available: Iterable[str] | None = None) -> list[str]:
    """Execution providers for ``device`` ('auto' | 'cpu' | 'cuda'), CPU always last as fallback.

    Without ``available`` the installed runtime is asked, after checking it is a single build.
    """
    if available is None:
        check_onnxruntime_installation()
    offered = set(onnxruntime.get_available_providers() if available is None else available)
    if device == "cpu":
        return [CPU]
    if CUDA in offered:
        if available is None:
            preload_cuda_libraries()
        return [CUDA, CPU]
    if device == "cuda":
        raise ConfigurationError(
            "LYNX_FACE_DEVICE=cuda but onnxruntime offers no CUDA provider: run `make setup GPU=1` "
            f"(or `{GPU_RUNTIME_FIX}`), or use LYNX_FACE_DEVICE=auto",
            setting="LYNX_FACE_DEVICE",
        )
    return [CPU]


def preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the nvidia pip wheels before a CUDA session is created:
    without it onnxruntime-gpu finds them only when torch was imported first, and otherwise
    falls back to CPU. Older onnxruntime builds lack ``preload_dlls``."""
    global _cuda_preloaded
    preload = getattr(onnxruntime, "preload_dlls", None)
    with _PRELOAD_LOCK:
        if _cuda_preloaded or not callable(preload):
            return
        with contextlib.redirect_stdout(sys.stderr):  # it prints its warnings; stdout may be --json
            preload()
        _cuda_preloaded = True


def check_session_device(session: onnxruntime.InferenceSession, device: str, model: str | Path) -> None:
    """Refuse a session that fell back to CPU when ``device`` is 'cuda'.

    onnxruntime-gpu lists CUDA as available even when the CUDA or cuDNN libraries cannot be
    loaded; the session is then created on CPU with only a log line.
    """
    if device != "cuda":
        return
    used = session.get_providers()
    if CUDA not in used:
        raise ConfigurationError(
            f"LYNX_FACE_DEVICE=cuda but onnxruntime runs {model} on {', '.join(used)}: the CUDA "
            "provider failed to start (CUDA/cuDNN libraries missing or not matching onnxruntime-gpu); "
            "fix the CUDA install or use LYNX_FACE_DEVICE=auto",
            setting="LYNX_FACE_DEVICE",
        )


def zoo_model(path: str | Path, providers: list[str], device: str, **options: Any) -> Any:
    """Load ``path`` through insightface's model zoo with our session options (``options`` go to
    ``get_model``), refusing a session that fell back to CPU when ``device`` is 'cuda'.

    Returns what ``get_model`` returns, None for a model the zoo does not recognise. Errors from
    loading a damaged file propagate unchanged; the device check raises ConfigurationError.
    """
    from insightface.model_zoo import model_zoo  # heavy; only the ONNX face backends need it

    model = model_zoo.get_model(str(path), providers=providers, sess_options=session_options(), **options)
    if model is not None:
        check_session_device(model.session, device, path)
    return model


def torch_device(device: str) -> str:
    """The torch device string for ``device`` ('auto' | 'cpu' | 'cuda')."""
    import torch  # only the IR-SE50 backend needs torch; keep it off the import path otherwise

    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ConfigurationError(
            "LYNX_FACE_DEVICE=cuda but torch sees no CUDA device", setting="LYNX_FACE_DEVICE"
        )
    return "cpu"


def installed_onnxruntime_distributions() -> list[str]:
    """Which onnxruntime builds pip has installed in this environment."""
    found = []
    for name in ONNXRUNTIME_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def onnxruntime_conflict_message(installed: list[str]) -> str | None:
    """The error text when more than one onnxruntime build is installed, else None."""
    if len(installed) < 2:
        return None
    return (
        f"several onnxruntime builds are installed together ({', '.join(installed)}) and overwrite "
        f"each other's files; keep one: `pip uninstall -y {' '.join(installed)} && pip install "
        "--no-deps onnxruntime-gpu` (CUDA; or `make setup GPU=1`) or `... && pip install onnxruntime` (CPU)"
    )


def check_onnxruntime_installation(installed: list[str] | None = None) -> None:
    """Raise ConfigurationError when ``installed`` (default: this environment's onnxruntime
    distributions) holds more than one build."""
    message = onnxruntime_conflict_message(
        installed_onnxruntime_distributions() if installed is None else installed
    )
    if message:
        raise ConfigurationError(message)


def session_options() -> onnxruntime.SessionOptions:
    """Session options that keep onnxruntime's graph-optimisation chatter off stderr and its idle
    threads off the CPU."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    # By default onnxruntime's worker threads busy-wait after each run. Face models run between
    # video decoding and torch (IR-SE50) calls on the same cores, which the spinning threads then
    # starve: evaluation measured 1.4x faster on 2 idle cores without it, 2-3x with other load
    # (docs/PERFORMANCE.md, Evaluation).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
