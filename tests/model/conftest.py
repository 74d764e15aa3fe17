"""Fixtures of the model tests: tiny random models in the released layout, loaded the real way."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lynx_model import LynxPipeline  # noqa: E402
from lynx_model.testing import tiny_face_embedding, tiny_reference_image, write_tiny_models  # noqa: E402

PROMPT = "a woman walking in the park"
NEGATIVE = "blurred background, static"
# small enough that one three-pass step takes milliseconds: 5 frames of 32x48 -> 2x4x6 latents
SIZE = {"height": 32, "width": 48, "num_frames": 5}


@pytest.fixture(autouse=True)
def _restore_attention_backend():
    """diffusers' ``set_attention_backend`` also sets the process-wide active backend: a test that
    calls it must not change the numbers of the tests that run after it in this process."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def load(base, adapter=None, **kwargs) -> LynxPipeline:
    """The pipeline of a base folder, with the released adapter folder ``adapter`` loaded (if any)."""
    pipe = LynxPipeline.from_pretrained(base, torch_dtype=kwargs.pop("dtype", torch.float32))
    if adapter is not None:
        pipe.load_lynx_adapter(adapter, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def full_pipe(tiny_models) -> LynxPipeline:
    return load(tiny_models.base, tiny_models.full)


@pytest.fixture(scope="session")
def lite_pipe(tiny_models) -> LynxPipeline:
    return load(tiny_models.base, tiny_models.lite)


@pytest.fixture(scope="session")
def face() -> np.ndarray:
    return tiny_face_embedding(seed=3)


@pytest.fixture(scope="session")
def ref_image() -> np.ndarray:
    # 64x64 instead of the released 256x256 crop: the VAE encode dominates a tiny generation's time
    return tiny_reference_image(seed=3, size=64)


def generate(pipe, face=None, ref_image=None, **kwargs):
    """Latents of a short, small generation (override anything with kwargs)."""
    args = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        face_embeds=face,
        ref_image=ref_image,
        num_inference_steps=3,
        seed=7,
        output_type="latent",
        **SIZE,
    )
    args.update(kwargs)
    return pipe(**args).frames


def write_zeroed_adapter(source, target):
    """A copy of an adapter folder whose identity and reference layers are all zero (resampler kept)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        tensors = load_file(str(path))
        if path.name != "resampler.safetensors":
            tensors = {key: torch.zeros_like(t) for key, t in tensors.items()}
        save_file(tensors, str(target / path.name))
    return target
