"""Processor- and module-level numerics against explicit re-statements of the Lynx equations."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from lynx_model import (
    AdapterState,
    LynxIdentityAttnProcessor,
    LynxReferenceAttnProcessor,
    LynxResampler,
)

HEADS, HEAD_DIM = 2, 8
DIM = HEADS * HEAD_DIM


def _randomize(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1])
                + (1.0 if p.ndim == 1 else 0.0)
            )
    return module


def _attention(cross: bool):
    return _randomize(
        WanAttention(
            DIM,
            heads=HEADS,
            dim_head=HEAD_DIM,
            eps=1e-6,
            cross_attention_dim_head=HEAD_DIM if cross else None,
        ),
        seed=1,
    ).eval()


def _rotary(tokens):
    angles = torch.randn(1, tokens, 1, HEAD_DIM // 2, generator=torch.Generator().manual_seed(2))
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _explicit_attention(q, k, v):
    # q, k, v: [B, S, H, D]
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)


def _heads(t):
    return t.unflatten(-1, (HEADS, HEAD_DIM))


@contextmanager
def handed(processor, attn, state):
    """What LynxAdapter.activated does for one processor: hand it its branch of ``state``."""
    if isinstance(processor, LynxIdentityAttnProcessor) and state.identity_on:
        processor.branch, processor.scale = state.identity_kv(processor, attn, None), state.ip_scale
    elif isinstance(processor, LynxReferenceAttnProcessor) and state.reference_on:
        processor.branch, processor.scale = state.reference_kv(processor, attn, None), state.ref_scale
    try:
        yield
    finally:
        processor.clear()


def _rms(t, eps):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("own_key_norm", [False, True])
def test_identity_processor(own_key_norm):
    attn = _attention(cross=True)
    x, text = torch.randn(2, 10, DIM), torch.randn(2, 7, DIM)
    stock = WanAttnProcessor()(attn, x, text)
    processor = _randomize(
        LynxIdentityAttnProcessor(
            DIM, 12, bias=not own_key_norm, num_registers=0 if own_key_norm else 3, own_key_norm=own_key_norm
        ),
        seed=3,
    )
    attn.set_processor(processor)
    # no branch handed over, or scale 0: bit-identical to diffusers' processor
    assert torch.equal(attn(x, text), stock)
    tokens = torch.randn(1, 4, 12)
    with handed(processor, attn, AdapterState(identity=tokens, ip_scale=0.0)):
        assert processor.branch is None
        assert torch.equal(attn(x, text), stock)

    with handed(processor, attn, AdapterState(identity=tokens, ip_scale=0.7)):
        out = attn(x, text)
    assert processor.branch is None  # taken back after the call

    # explicit: q from attn2's normed query; keys normed by attn2's norm_k (full) or parameter-free RMS (lite)
    q = _heads(attn.norm_q(attn.to_q(x)))
    text_out = _explicit_attention(q, _heads(attn.norm_k(attn.to_k(text))), _heads(attn.to_v(text)))
    id_tokens = tokens if processor.registers is None else torch.cat([tokens, processor.registers], 1)
    keys = processor.to_k_ip(id_tokens)
    keys = _rms(keys, 1e-5) if own_key_norm else attn.norm_k(keys)
    id_out = _explicit_attention(
        q, _heads(keys).expand(2, -1, -1, -1), _heads(processor.to_v_ip(id_tokens)).expand(2, -1, -1, -1)
    )
    expected = attn.to_out[0](text_out + 0.7 * id_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)


def test_reference_processor():
    attn = _attention(cross=False)
    x = torch.randn(2, 12, DIM)
    rotary = _rotary(12)
    stock = WanAttnProcessor()(attn, x, None, None, rotary)
    processor = _randomize(LynxReferenceAttnProcessor(DIM, block_index=1), seed=4)
    attn.set_processor(processor)
    assert torch.equal(attn(x, rotary_emb=rotary), stock)

    features = [None, torch.randn(1, 5, DIM)]
    with handed(processor, attn, AdapterState(reference=features, ref_scale=1.3)):
        out = attn(x, rotary_emb=rotary)

    def rotate(t, cos, sin):
        pairs = t.unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        c, s = cos[..., 0::2], sin[..., 0::2]
        return torch.stack([real * c - imag * s, real * s + imag * c], -1).flatten(-2)

    q = _heads(attn.norm_q(attn.to_q(x)))
    k = _heads(attn.norm_k(attn.to_k(x)))
    self_out = _explicit_attention(rotate(q, *rotary), rotate(k, *rotary), _heads(attn.to_v(x)))
    ref_k = _heads(attn.norm_k(processor.to_k_ref(features[1]))).expand(2, -1, -1, -1)
    ref_v = _heads(processor.to_v_ref(features[1])).expand(2, -1, -1, -1)
    ref_out = _explicit_attention(q, ref_k, ref_v)  # the reference branch sees no rotary embedding
    torch.testing.assert_close(out, attn.to_out[0](self_out + 1.3 * ref_out), rtol=0, atol=2e-6)


def test_batched_generation_matches_one_sample_at_a_time():
    attn = _attention(cross=True)
    processor = _randomize(LynxIdentityAttnProcessor(DIM, 12), seed=5)
    attn.set_processor(processor)
    x, text, tokens = torch.randn(3, 6, DIM), torch.randn(3, 4, DIM), torch.randn(1, 4, 12)
    with handed(processor, attn, AdapterState(identity=tokens)):
        batched = attn(x, text)
    singles = []
    for i in range(3):
        with handed(processor, attn, AdapterState(identity=tokens)):
            singles.append(attn(x[i : i + 1], text[i : i + 1]))
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-6)


def test_stacked_states_give_each_part_its_own_branch_inputs():
    """Guidance passes batched into one call: each part of the batch sees its own identity."""
    from lynx_model import StackedAdapterState

    attn = _attention(cross=True)
    processor = _randomize(LynxIdentityAttnProcessor(DIM, 12), seed=5)
    attn.set_processor(processor)
    x, text = torch.randn(2, 6, DIM), torch.randn(2, 4, DIM)
    cond, uncond = AdapterState(identity=torch.randn(1, 4, 12)), AdapterState(identity=torch.randn(1, 4, 12))
    with handed(processor, attn, StackedAdapterState([cond, uncond, cond], videos=2)):
        stacked = attn(x.repeat(3, 1, 1), text.repeat(3, 1, 1))
    expected = []
    for state in (cond, uncond, cond):
        with handed(processor, attn, state):
            expected.append(attn(x, text))
    torch.testing.assert_close(stacked, torch.cat(expected), rtol=0, atol=1e-6)
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    # parts that switch branches differently cannot share one forward
    with pytest.raises(ValueError, match="same branches"):
        StackedAdapterState([cond, AdapterState(identity=None)], videos=2)


def test_resampler_matches_the_perceiver_equations():
    resampler = _randomize(
        LynxResampler(
            embedding_dim=20, dim=64, depth=2, heads=2, dim_head=64, num_queries=3, output_dim=24, ff_mult=2
        ),
        seed=6,
    ).eval()
    embeds = torch.randn(2, 1, 20)

    def layer_norm(t, norm):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], norm.weight, norm.bias)

    x = resampler.proj_in(embeds)
    latents = resampler.latents.repeat(2, 1, 1)
    for attention, ff in resampler.layers:
        xs, ls = layer_norm(x, attention.norm1), layer_norm(latents, attention.norm2)
        q = attention.to_q(ls).unflatten(-1, (2, 64))
        k, v = attention.to_kv(torch.cat([xs, ls], 1)).chunk(2, -1)
        scale = 64**-0.25  # as the reference: both q and k scaled by d^-1/4, softmax in float32
        w = torch.softmax(
            torch.einsum("bqhd,bkhd->bhqk", q * scale, k.unflatten(-1, (2, 64)) * scale).float(), -1
        )
        latents = (
            attention.to_out(torch.einsum("bhqk,bkhd->bqhd", w, v.unflatten(-1, (2, 64))).flatten(2))
            + latents
        )
        latents = ff[3](ff[2](ff[1](layer_norm(latents, ff[0])))) + latents
    expected = layer_norm(resampler.proj_out(latents), resampler.norm_out)
    torch.testing.assert_close(resampler(embeds), expected, rtol=0, atol=1e-5)


class _Reached(Exception):
    pass


class _ParallelConfigProbe:
    """Stands in for diffusers' ParallelConfig: its context-parallel attention reads this first."""

    @property
    def context_parallel_config(self):
        raise _Reached


def test_parallel_config_reaches_self_attention_as_in_the_stock_processor():
    self_attn, cross_attn = _attention(cross=False), _attention(cross=True)
    x, text, rotary = torch.randn(1, 12, DIM), torch.randn(1, 7, DIM), _rotary(12)
    stock_cross = WanAttnProcessor()(cross_attn, x, text)
    stock, reference, identity = (
        WanAttnProcessor(),
        LynxReferenceAttnProcessor(DIM),
        LynxIdentityAttnProcessor(DIM, 12),
    )
    for processor in (stock, reference, identity):
        processor._parallel_config = _ParallelConfigProbe()  # what ModelMixin.enable_parallelism sets
    # attn1: the video self-attention dispatches with the parallel config, in both processors
    for processor in (stock, reference):
        with pytest.raises(_Reached):
            processor(self_attn, x, None, None, rotary)
    # attn2: cross-attention to text does not, in either
    assert torch.equal(stock(cross_attn, x, text), stock_cross)
    assert torch.equal(identity(cross_attn, x, text), stock_cross)
