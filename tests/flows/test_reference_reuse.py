"""The unconditional reference is the same for every face: reusing it changes nothing."""

from __future__ import annotations

import torch

from lynx_model import LynxPipeline
from lynx_model.testing import tiny_reference_image


def test_passing_an_earlier_unconditional_reference_gives_the_same_features(tiny_model_dir):
    pipe = LynxPipeline.from_pretrained(tiny_model_dir / "base", torch_dtype=torch.float32)
    pipe.load_lynx_adapter(tiny_model_dir / "lynx_full")
    first = pipe.encode_reference(tiny_reference_image(seed=1, size=64), seed=5)
    second = pipe.encode_reference(tiny_reference_image(seed=2, size=64), seed=5)
    reused = pipe.encode_reference(tiny_reference_image(seed=2, size=64), seed=5, uncond=first.uncond)

    for a, b in zip(first.uncond, second.uncond, strict=True):
        assert torch.equal(a, b)  # grey image: independent of the subject
    for a, b in zip(second.cond, reused.cond, strict=True):
        assert torch.equal(a, b)
    assert all(a is b for a, b in zip(reused.uncond, first.uncond, strict=True))
    assert not torch.equal(first.cond[0], second.cond[0])
