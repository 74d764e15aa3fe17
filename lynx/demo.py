"""The demo setup: the demo face pack, a tiny RANDOM Lynx model for it, and the environment to use them.

The tiny model has the exact folder layout of the real weights (a Wan2.1 diffusers folder plus
``lynx_full``/``lynx_lite`` adapter folders) and loads through the same code, but its weights are
random: it exercises the whole pipeline in seconds on a CPU and its videos are noise. It is sized
for the demo face pack's recogniser (128-d embeddings), which the released adapters (512-d ArcFace)
cannot take.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lynx.jobs import GenerationSettings, Variant
from lynx.settings import LynxSettings, get_settings

DEMO_PROMPT = "a person smiling at the camera"
#: Small enough for a first run on a laptop CPU: 17 frames of 128x128, 8 steps.
DEMO_SETTINGS = GenerationSettings(frames=17, height=128, width=128, steps=8)
DEMO_WARNING = (
    "the demo model has RANDOM weights: its video is noise. It only shows that every stage runs; "
    "put the real Wan2.1 + Lynx weights in place for real videos (see docs/flows.md)."
)


def demo_embedding_dim(settings: LynxSettings) -> int:
    """Width of the embeddings the configured face pack gives (the demo model is built to match)."""
    from lynx.faces import cached_face_analyzer

    return int(cached_face_analyzer(settings).embedder.dim)


def ensure_demo_model(settings: LynxSettings) -> Path:
    """Write the tiny random model under LYNX_DEMO_MODEL_DIR unless a valid one is there; returns it."""
    from lynx_model.testing import TinyModelSpec, write_tiny_models

    root = settings.resolved_demo_model_dir
    write_tiny_models(root, variant="both", spec=TinyModelSpec(face_dim=demo_embedding_dim(settings)))
    return root


def ensure_demo_setup(settings: LynxSettings) -> Path:
    """The demo face pack and the tiny model (each built only if missing); returns the model folder."""
    from lynx.faces import ensure_demo_pack

    ensure_demo_pack(settings)
    return ensure_demo_model(settings)


def demo_worker_env(settings: LynxSettings, variant: Variant = "full") -> dict[str, str]:
    """The LYNX_* lines that point a worker (or any lynx process) at the demo face pack and model
    under ``settings``' models folder, as built by ``ensure_demo_setup``."""
    root = settings.resolved_demo_model_dir
    return {
        "LYNX_MODELS_DIR": str(settings.resolved_models_dir),
        "LYNX_FACE_PACK": settings.face_pack,
        "LYNX_DEMO_MODEL_DIR": str(root),
        "LYNX_BASE_MODEL_PATH": str(root / "base"),
        "LYNX_ADAPTER_PATH": str(root / f"lynx_{variant}"),
        "LYNX_MODEL_VARIANT": variant,
    }


@contextmanager
def demo_model_environment(settings: LynxSettings, variant: Variant = "full") -> Iterator[None]:
    """Point LYNX_BASE_MODEL_PATH / LYNX_ADAPTER_PATH at the demo model while the block runs."""
    root = settings.resolved_demo_model_dir
    values = {
        "LYNX_BASE_MODEL_PATH": str(root / "base"),
        "LYNX_ADAPTER_PATH": str(root / f"lynx_{variant}"),
        "LYNX_MODEL_VARIANT": variant,
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
