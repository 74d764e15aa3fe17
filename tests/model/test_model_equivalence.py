"""Numerics: adapters off = base Wan, branches on = different, guidance = the published formula."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from diffusers.utils.torch_utils import randn_tensor

from lynx_model import AdapterState
from lynx_model.pipeline import wan_flow_sigmas
from lynx_model.testing import tiny_reference_image

from .conftest import NEGATIVE, PROMPT, SIZE, generate, load, write_zeroed_adapter


@contextmanager
def scheduler_timesteps(pipe):
    """Let the pipeline use the scheduler's own timesteps, as diffusers' WanPipeline does."""
    pipe.sigma_schedule = "scheduler"
    try:
        yield pipe
    finally:
        pipe.sigma_schedule = "wan"


@pytest.fixture(scope="module")
def wan_latents(tiny_models):
    """Latents of diffusers' own WanPipeline on the tiny base folder."""
    wan = WanPipeline.from_pretrained(tiny_models.base, dtype=torch.float32)
    wan.set_progress_bar_config(disable=True)
    return wan(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=3,
        output_type="latent",
        generator=torch.Generator().manual_seed(7),
        **SIZE,
    ).frames


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_zero_adapter_weights_reproduce_the_base_wan_pipeline_exactly(
    variant, tiny_models, tmp_path, face, ref_image, wan_latents
):
    source = tiny_models.full if variant == "full" else tiny_models.lite
    pipe = load(tiny_models.base, write_zeroed_adapter(source, tmp_path / f"zero_{variant}"))
    with scheduler_timesteps(pipe):
        latents = generate(pipe, face, ref_image if variant == "full" else None)
    assert torch.equal(latents, wan_latents)


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_scales_zero_equal_the_base_model_exactly(
    variant, full_pipe, lite_pipe, face, ref_image, wan_latents
):
    pipe = full_pipe if variant == "full" else lite_pipe
    with scheduler_timesteps(pipe):
        latents = generate(pipe, face, ref_image if variant == "full" else None, ip_scale=0.0, ref_scale=0.0)
    assert torch.equal(latents, wan_latents)


def test_plain_pipeline_without_adapters_is_wan(tiny_models, wan_latents):
    pipe = load(tiny_models.base)
    assert pipe.variant is None
    with scheduler_timesteps(pipe):
        assert torch.equal(generate(pipe), wan_latents)


def test_unloading_the_adapter_restores_plain_wan_exactly(tiny_models, face, ref_image, wan_latents):
    pipe = load(tiny_models.base, tiny_models.full)
    with_adapter = generate(pipe, face, ref_image)
    pipe.unload_lynx_adapter()
    assert pipe.variant is None and pipe.resampler is None and pipe.lynx_adapter is None
    assert not any("processor" in name for name, _ in pipe.transformer.named_parameters())
    with scheduler_timesteps(pipe):
        assert torch.equal(generate(pipe), wan_latents)
    # and loading it again (here: the lite one first) gives the same videos as before
    pipe.load_lynx_adapter(tiny_models.lite)
    assert pipe.variant == "lite"
    pipe.load_lynx_adapter(tiny_models.full)
    assert torch.equal(generate(pipe, face, ref_image), with_adapter)


def test_each_branch_changes_the_output(full_pipe, lite_pipe, face, ref_image):
    off = generate(full_pipe, face, ref_image, ip_scale=0.0, ref_scale=0.0)
    identity_only = generate(full_pipe, face, ref_image, ref_scale=0.0)
    reference_only = generate(full_pipe, face, ref_image, ip_scale=0.0)
    both = generate(full_pipe, face, ref_image)
    outputs = [off, identity_only, reference_only, both]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert (outputs[i] - outputs[j]).abs().max() > 1e-3, (i, j)

    lite_off = generate(lite_pipe, face, ip_scale=0.0)
    lite_on = generate(lite_pipe, face)
    assert (lite_on - lite_off).abs().max() > 1e-3
    # a different face gives a different video
    other_face = torch.randn(512, generator=torch.Generator().manual_seed(11))
    assert (generate(lite_pipe, other_face) - lite_on).abs().max() > 1e-3


def _one_step_by_hand(pipe, combine):
    """One UniPC step computed outside the pipeline from explicit DiT passes."""
    prompt_embeds, negative_embeds = pipe.encode_prompt(PROMPT, NEGATIVE)
    shape = (1, 16, 2, SIZE["height"] // 8, SIZE["width"] // 8)
    x = randn_tensor(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1, sigmas=wan_flow_sigmas(1))
    t = scheduler.timesteps[0]

    def dit(text, identity=None, reference=None):
        with pipe.lynx_adapter.activated(pipe.transformer, AdapterState(identity, reference)):
            return pipe.transformer(
                hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False
            )[0]

    noise = combine(dit, prompt_embeds, negative_embeds)
    return scheduler.step(noise, t, x, return_dict=False)[0]


def test_full_three_pass_guidance_equals_the_formula(full_pipe, face, ref_image):
    identity = full_pipe.encode_identity(face)
    reference = full_pipe.encode_reference(ref_image, seed=7)
    passes = {}

    def three_pass(dit, text, negative):
        passes["c"] = dit(text, identity.cond, reference.cond)
        passes["u"] = dit(negative, identity.uncond, reference.uncond)
        passes["i"] = dit(negative, identity.cond, reference.cond)
        return passes["u"] + 2.0 * (passes["i"] - passes["u"]) + 5.0 * (passes["c"] - passes["i"])

    expected = _one_step_by_hand(full_pipe, three_pass)
    # the three passes really differ, so the check below pins the combination
    assert (passes["c"] - passes["i"]).abs().max() > 1e-3
    assert (passes["i"] - passes["u"]).abs().max() > 1e-3

    latents = generate(
        full_pipe,
        identity=identity,
        reference=reference,
        num_inference_steps=1,
        guidance_scale=5.0,
        guidance_scale_id=2.0,
    )
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)

    two_pass = _one_step_by_hand(
        full_pipe, lambda dit, text, negative: passes["u"] + 5.0 * (passes["c"] - passes["u"])
    )
    assert (two_pass - latents).abs().max() > 1e-3
    classic = generate(
        full_pipe, identity=identity, reference=reference, num_inference_steps=1, guidance_scale_id=None
    )
    torch.testing.assert_close(classic, two_pass, rtol=0, atol=1e-6)


def test_lite_two_pass_guidance_equals_the_formula(lite_pipe, face):
    identity = lite_pipe.encode_identity(face)

    def two_pass(dit, text, negative):
        cond = dit(text, identity.cond)
        uncond = dit(negative, identity.uncond)
        return uncond + 5.0 * (cond - uncond)

    expected = _one_step_by_hand(lite_pipe, two_pass)
    latents = generate(lite_pipe, identity=identity, num_inference_steps=1, guidance_scale=5.0)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)


def test_same_seed_same_latents_and_noise_from_a_cpu_float32_generator(full_pipe, face, ref_image):
    first = generate(full_pipe, face, ref_image, seed=5)
    assert torch.equal(first, generate(full_pipe, face, ref_image, seed=5))
    assert (first - generate(full_pipe, face, ref_image, seed=6)).abs().max() > 1e-3
    # the initial noise is torch.randn from a CPU generator seeded `seed`, in float32
    shape = (1, 16, 2, SIZE["height"] // 8, SIZE["width"] // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(5), dtype=torch.float32)
    reference = full_pipe.encode_reference(ref_image, seed=5)
    assert torch.equal(first, generate(full_pipe, face, reference=reference, latents=noise, seed=123))


def test_reference_features_depend_on_the_seed_through_the_vae_sample(full_pipe):
    ref_image = tiny_reference_image(seed=3)  # the released crop size, 256x256
    a = full_pipe.encode_reference(ref_image, seed=1)
    b = full_pipe.encode_reference(ref_image, seed=1)
    c = full_pipe.encode_reference(ref_image, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.cond + a.uncond, b.cond + b.uncond, strict=True))
    assert (a.cond[0] - c.cond[0]).abs().max() > 0
    assert len(a.cond) == len(full_pipe.transformer.blocks)
    # 256x256 crop -> 32x32 latent -> 16x16 patches
    assert a.cond[0].shape == (
        1,
        256,
        full_pipe.transformer.config.num_attention_heads * full_pipe.transformer.config.attention_head_dim,
    )


# UniPC timesteps and first sigmas for 50 steps with the Wan2.1 480p scheduler config (flow_shift
# 3.0), as produced by the Lynx reference's pinned diffusers 0.33.1. diffusers 0.42 on its own
# starts the schedule at sigma 1.0 and yields different ones; the reference's are what the released
# adapters were run with.
REFERENCE_TIMESTEPS_50 = [
    999, 992, 985, 978, 971, 963, 956, 948, 939, 931, 922, 913, 904, 894, 884, 874, 864, 853, 841, 829,
    817, 805, 792, 778, 764, 749, 734, 718, 701, 684, 666, 647, 627, 606, 585, 562, 538, 512, 486, 458,
    428, 396, 363, 327, 290, 249, 206, 160, 111, 57,
]  # fmt: skip
REFERENCE_FIRST_SIGMAS_50 = [0.9996665, 0.9929075, 0.9859633, 0.9788265, 0.9714886, 0.9639411]


def test_timesteps_follow_the_reference_schedule(full_pipe):
    scheduler = UniPCMultistepScheduler.from_config(full_pipe.scheduler.config)
    scheduler.set_timesteps(50, sigmas=wan_flow_sigmas(50))
    assert scheduler.timesteps.tolist() == REFERENCE_TIMESTEPS_50
    torch.testing.assert_close(
        scheduler.sigmas[:6], torch.tensor(REFERENCE_FIRST_SIGMAS_50), rtol=0, atol=1e-6
    )
    assert scheduler.sigmas[-1] == 0
    # and the pipeline uses exactly these
    seen = []
    generate(
        full_pipe,
        face=torch.ones(512),
        num_inference_steps=50,
        guidance_scale=1.0,
        progress_callback=lambda i, n, t: seen.append(round(t)),
        height=16,
        width=16,
        num_frames=1,
    )
    assert seen == REFERENCE_TIMESTEPS_50


def _attn1_inputs_by_hand(pipe, pixels, seed, text):
    """LYNX_SPEC 4 restated: VAE sample with a generator seeded seed+1, normalised, one DiT pass at
    timestep 0 with `text`; every block's attn1 input read with forward hooks, not the pipeline's
    capture mode."""
    posterior = pipe.vae.encode(pixels).latent_dist
    latents = posterior.sample(generator=torch.Generator("cpu").manual_seed(seed + 1))
    shape = (1, pipe.vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(shape)
    std = torch.tensor(pipe.vae.config.latents_std).view(shape)
    latents = (latents - mean) * (1.0 / std)  # the pipeline's order of operations, for torch.equal
    seen = {}
    hooks = [
        block.attn1.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
        for i, block in enumerate(pipe.transformer.blocks)
    ]
    try:
        pipe.transformer(
            hidden_states=latents,
            timestep=torch.zeros(1, dtype=torch.long),
            encoder_hidden_states=text,
            return_dict=False,
        )
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[i] for i in range(len(pipe.transformer.blocks))]


@torch.no_grad()
def test_reference_features_follow_the_spec_recipe(full_pipe, ref_image):
    seed = 12
    reference = full_pipe.encode_reference(ref_image, seed=seed)
    text, _ = full_pipe.encode_prompt("image of a face", do_classifier_free_guidance=False)
    pixels = (torch.from_numpy(ref_image).float() / 255.0 * 2 - 1).permute(2, 0, 1)[None, :, None]
    cond = _attn1_inputs_by_hand(full_pipe, pixels, seed, text)
    # the unconditional reference: a mid-grey image (all zeros in [-1, 1]), same seed+1 generator
    uncond = _attn1_inputs_by_hand(full_pipe, torch.zeros_like(pixels), seed, text)
    assert len(reference.cond) == len(reference.uncond) == len(full_pipe.transformer.blocks)
    assert all(torch.equal(a, b) for a, b in zip(reference.cond, cond, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(reference.uncond, uncond, strict=True))
    # the recipe's parts each matter here, so the equalities above pin them
    assert (cond[0] - uncond[0]).abs().max() > 1e-3
    other_seed = _attn1_inputs_by_hand(full_pipe, pixels, seed + 1, text)
    assert (other_seed[0] - cond[0]).abs().max() > 1e-3
    other_text, _ = full_pipe.encode_prompt("a face", do_classifier_free_guidance=False)
    assert (_attn1_inputs_by_hand(full_pipe, pixels, seed, other_text)[-1] - cond[-1]).abs().max() > 1e-3


@torch.no_grad()
def test_unconditional_identity_is_the_resampler_of_a_zero_embedding(full_pipe, lite_pipe, face):
    for pipe in (full_pipe, lite_pipe):
        identity = pipe.encode_identity(face)
        assert torch.equal(identity.cond, pipe.resampler(torch.from_numpy(face)[None, None]))
        assert torch.equal(identity.uncond, pipe.resampler(torch.zeros(1, 1, 512)))
        assert (identity.cond - identity.uncond).abs().max() > 1e-3
