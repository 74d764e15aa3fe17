"""Several videos in one call: a list of seeds (best-of-N candidates) and num_videos_per_prompt."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lynx_model import ModelInputError
from lynx_model.memory import activation_bytes, dit_tokens, videos_that_fit

from .conftest import SIZE, generate, load


def test_each_video_of_a_seed_list_is_the_one_video_call_with_its_seed(full_pipe, face, ref_image):
    seeds = [5, 11, 5]
    batch = generate(full_pipe, face, ref_image, seed=seeds, num_inference_steps=2)
    assert batch.shape[0] == 3
    for i, seed in enumerate(seeds):
        single = generate(full_pipe, face, ref_image, seed=seed, num_inference_steps=2)
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-5)
    # the seeds really differ, and the repeated seed repeats its video
    assert (batch[0] - batch[1]).abs().max() > 1e-3
    torch.testing.assert_close(batch[0], batch[2], rtol=0, atol=1e-5)


def test_initial_noise_and_reference_of_a_seed_list_are_exactly_the_single_seed_ones(full_pipe, ref_image):
    noise = full_pipe.prepare_latents(2, SIZE["height"], SIZE["width"], SIZE["num_frames"], [3, 8])
    for i, seed in enumerate([3, 8]):
        single = full_pipe.prepare_latents(1, SIZE["height"], SIZE["width"], SIZE["num_frames"], seed)
        assert torch.equal(noise[i : i + 1], single)
    references = full_pipe._references_for_seeds(ref_image, [3, 8])
    for reference, seed in zip(references, [3, 8], strict=True):
        alone = full_pipe.encode_reference(ref_image, seed)
        assert all(
            torch.equal(a, b)
            for a, b in zip(reference.cond + reference.uncond, alone.cond + alone.uncond, strict=True)
        )


def test_seed_list_with_a_lite_adapter_and_with_stored_references(full_pipe, lite_pipe, face, ref_image):
    batch = generate(lite_pipe, face, seed=[1, 2], num_inference_steps=2)
    torch.testing.assert_close(
        batch[1:], generate(lite_pipe, face, seed=2, num_inference_steps=2), rtol=0, atol=1e-5
    )
    # a stored reference per video, or one shared by all
    references = [full_pipe.encode_reference(ref_image, seed) for seed in (4, 6)]
    per_video = generate(full_pipe, face, reference=references, seed=[4, 6], num_inference_steps=2)
    torch.testing.assert_close(
        per_video, generate(full_pipe, face, ref_image, seed=[4, 6], num_inference_steps=2), rtol=0, atol=1e-5
    )
    shared = generate(full_pipe, face, reference=references[0], seed=[4, 6], num_inference_steps=2)
    single = generate(full_pipe, face, reference=references[0], seed=6, num_inference_steps=2)
    torch.testing.assert_close(shared[1:], single, rtol=0, atol=1e-5)


def test_num_videos_per_prompt(full_pipe, face):
    out = full_pipe(
        prompt=["a man", "a woman"],
        face_embeds=face,
        seed=[1, 2, 3, 4],
        num_inference_steps=1,
        output_type="latent",
        **SIZE,
    )
    assert out.frames.shape[0] == 4 and out.seed == [1, 2, 3, 4]
    # prompt-major order: videos 0, 1 are the first prompt's
    first = full_pipe(
        prompt="a man", face_embeds=face, seed=2, num_inference_steps=1, output_type="latent", **SIZE
    ).frames
    torch.testing.assert_close(out.frames[1:2], first, rtol=0, atol=1e-5)
    # with one int seed, one generator draws the whole batch
    three = generate(full_pipe, face, seed=7, num_videos_per_prompt=3, num_inference_steps=1)
    assert three.shape[0] == 3 and (three[0] - three[1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": [1, 2, 3], "num_videos_per_prompt": 2}, r"3 seeds do not fit 1 prompt\(s\) x 2"),
        ({"seed": []}, r"non-empty list of ints"),
        ({"seed": [1, "2"]}, r"non-empty list of ints"),
        ({"seed": [1, 2], "generator": torch.Generator()}, r"list of seeds or a generator"),
        ({"num_videos_per_prompt": 0}, r"positive int"),
    ],
)
def test_bad_seed_lists_are_explained(full_pipe, face, kwargs, message):
    with pytest.raises(ModelInputError, match=message):
        generate(full_pipe, face, num_inference_steps=1, **kwargs)


def test_a_reference_list_must_have_one_item_per_video(full_pipe, face, ref_image):
    reference = full_pipe.encode_reference(ref_image, 1)
    with pytest.raises(ModelInputError, match="list of 3 \\(one per video\\), got 2"):
        generate(full_pipe, face, reference=[reference, reference], seed=[1, 2, 3], num_inference_steps=1)


def test_activation_estimate_for_the_released_shapes(full_pipe):
    # the released Wan2.1-14B transformer config
    released = SimpleNamespace(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, patch_size=(1, 2, 2)
    )
    tokens = dit_tokens(released, 480, 832, 81)
    assert tokens == 32760  # 21 x 30 x 52
    per_video = activation_bytes(released, tokens)
    # the float32 residual update dominates: (4 x 4 + 2 x 2) bytes x 5120 per token, plus text
    assert per_video == 32760 * 20 * 5120 + 3 * 512 * 5120 * 2
    assert 3.3e9 < per_video < 3.5e9
    batched = activation_bytes(released, tokens, passes_per_forward=3)
    assert batched == 3 * per_video
    with_reference = activation_bytes(released, tokens, reference_tokens=256)
    assert with_reference - per_video == 256 * 5120 * 2 * 6 * 40  # ~629 MB of features and keys/values
    assert videos_that_fit(40 * 2**30, per_video) == 11  # 90 % of 40 GiB
    assert videos_that_fit(1, per_video) == 1
    # the pipeline's view of its own (tiny) model grows with the video and the batched passes
    small = full_pipe.activation_bytes_per_video(32, 48, 5)
    assert full_pipe.activation_bytes_per_video(64, 96, 5) > small
    assert full_pipe.activation_bytes_per_video(32, 48, 5, guidance_passes=3) == 3 * small
    assert full_pipe.activation_bytes_per_video(32, 48, 5, per_video_reference=True) > small


def _transformer_calls(pipe, run):
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        return run(), calls
    finally:
        hook.remove()


@pytest.mark.parametrize("variant", ["full", "lite", "plain"])
def test_batched_guidance_equals_the_passes_one_after_another(
    variant, full_pipe, lite_pipe, tiny_models, face, ref_image
):
    pipe = {"full": full_pipe, "lite": lite_pipe}.get(variant) or load(tiny_models.base)
    identity = pipe.encode_identity(face) if variant != "plain" else None
    reference = [pipe.encode_reference(ref_image, s) for s in (3, 4)] if variant == "full" else None
    args = {"identity": identity, "reference": reference, "seed": [3, 4], "num_inference_steps": 3}
    sequential, calls = _transformer_calls(pipe, lambda: generate(pipe, batched_guidance=False, **args))
    passes = {"full": 3, "lite": 2, "plain": 2}[variant]
    assert calls == [2] * (3 * passes)  # two videos, each pass its own forward
    batched, calls = _transformer_calls(pipe, lambda: generate(pipe, batched_guidance=True, **args))
    assert calls == [2 * passes] * 3  # one forward per step
    torch.testing.assert_close(batched, sequential, rtol=0, atol=1e-5)
    assert (sequential[0] - sequential[1]).abs().max() > 1e-3


def test_batched_guidance_follows_the_pipeline_setting(full_pipe, face):
    assert full_pipe.batched_guidance == "auto"
    _, calls = _transformer_calls(full_pipe, lambda: generate(full_pipe, face, num_inference_steps=1))
    assert calls == [1, 1, 1]  # auto: off on the CPU
    full_pipe.batched_guidance = True
    try:
        _, calls = _transformer_calls(full_pipe, lambda: generate(full_pipe, face, num_inference_steps=1))
    finally:
        full_pipe.batched_guidance = "auto"
    assert calls == [3]
