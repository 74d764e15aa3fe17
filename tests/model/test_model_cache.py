"""Step caching with diffusers' cache hooks: per-pass contexts, skipped block-forwards counted."""

from __future__ import annotations

import pytest
import torch

from lynx_model import ModelInputError

from .conftest import load

STEPS = 3


@pytest.fixture(scope="module")
def cache_pipe(tiny_models):
    return load(tiny_models.base, tiny_models.full)


@pytest.fixture
def uncached(cache_pipe, face, ref_image):
    cache_pipe.disable_step_cache()
    return cache_pipe(**_args(face, ref_image))


def _args(face, ref_image, **kwargs):
    from .conftest import NEGATIVE, PROMPT, SIZE

    return (
        dict(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            face_embeds=face,
            ref_image=ref_image,
            num_inference_steps=STEPS,
            seed=7,
            output_type="latent",
            **SIZE,
        )
        | kwargs
    )


def test_first_block_cache_skips_whole_blocks_per_pass_and_counts_them(cache_pipe, uncached, face, ref_image):
    blocks, passes = len(cache_pipe.transformer.blocks), 3
    assert uncached.cache_stats is None
    cache_pipe.enable_step_cache("first-block", threshold=0.0)  # never close enough: every block runs
    try:
        exact = cache_pipe(**_args(face, ref_image))
        assert torch.equal(exact.frames, uncached.frames)
        assert exact.cache_stats == {
            "kind": "first-block",
            "options": {"threshold": 0.0},
            "block_forwards": blocks * passes * STEPS,
            "skipped_block_forwards": 0,
        }
        cache_pipe.enable_step_cache("first-block", threshold=1e9)  # always close enough
        cached = cache_pipe(**_args(face, ref_image))
        # each pass has its own cache context: all three compute fully at the first step, and reuse
        # their own residuals after it (shared contexts would skip the second and third passes at once)
        assert cached.cache_stats["skipped_block_forwards"] == (blocks - 1) * passes * (STEPS - 1)
        assert (cached.frames - uncached.frames).abs().max() > 1e-3
        # the cache's state does not leak from one generation into the next
        assert torch.equal(cache_pipe(**_args(face, ref_image)).frames, cached.frames)
        # batched guidance: one context for the stacked passes, counted per pass all the same
        batched = cache_pipe(**_args(face, ref_image, batched_guidance=True))
        assert batched.cache_stats == cached.cache_stats
        torch.testing.assert_close(batched.frames, cached.frames, rtol=0, atol=1e-5)
    finally:
        cache_pipe.disable_step_cache()
    assert not cache_pipe.transformer.is_cache_enabled


def test_taylorseer_skips_the_blocks_between_full_steps(cache_pipe, uncached, face, ref_image):
    cache_pipe.enable_step_cache(
        "taylorseer", cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
    )
    try:
        out = cache_pipe(**_args(face, ref_image, num_inference_steps=4))
    finally:
        cache_pipe.disable_step_cache()
    blocks, passes = len(cache_pipe.transformer.blocks), 3
    assert out.cache_stats["block_forwards"] == blocks * passes * 4
    assert 0 < out.cache_stats["skipped_block_forwards"] < out.cache_stats["block_forwards"]
    assert out.cache_stats["skipped_block_forwards"] % (blocks * passes) == 0  # whole steps of whole passes
    assert torch.isfinite(out.frames).all()


def test_reference_features_are_never_cached(cache_pipe, ref_image):
    plain = cache_pipe.encode_reference(ref_image, seed=3)
    cache_pipe.enable_step_cache("first-block", threshold=1e9)
    try:
        first = cache_pipe.encode_reference(ref_image, seed=3)
        second = cache_pipe.encode_reference(ref_image, seed=3)  # would be a cache hit if it were cached
    finally:
        cache_pipe.disable_step_cache()
    for features in (first, second):
        assert all(
            torch.equal(a, b)
            for a, b in zip(features.cond + features.uncond, plain.cond + plain.uncond, strict=True)
        )


def test_unknown_caches_and_options_are_explained(cache_pipe):
    with pytest.raises(ModelInputError, match="unknown step cache 'teacache'"):
        cache_pipe.enable_step_cache("teacache")
    with pytest.raises(ModelInputError, match="step cache 'first-block'"):
        cache_pipe.enable_step_cache("first-block", interval=3)
    assert cache_pipe.step_cache is None and not cache_pipe.transformer.is_cache_enabled
