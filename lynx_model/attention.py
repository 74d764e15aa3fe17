"""Attention processors that add Lynx's identity and reference branches to a stock Wan DiT.

They are set on diffusers' ``WanAttention`` modules with ``attn.set_processor(...)`` (the public
extension point); nothing in diffusers is patched or subclassed. ``WanTransformerBlock`` passes no
extra arguments to its attention modules, so the branch inputs of one transformer call are handed
to the processors beforehand: ``LynxAdapter.activated(transformer, state)`` gives every processor
the keys and values of its branch (``branch``) and the branch scale, and takes them back after.

Keys and values depend only on the conditioning (identity tokens, reference features), so an
``AdapterState`` projects them on first use and keeps them: one state per conditioning, reused
for every denoising step, projects them once per generation. What a processor reads during the
forward is plain tensors and one float, so ``torch.compile`` traces the blocks without a graph
break and without recompiling from one guidance pass to the next.

With no branch handed over, or a branch's scale at 0, a processor computes exactly what diffusers'
``WanAttnProcessor`` computes, operation for operation, so adapters that are off leave the base
model bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]


class AdapterState:
    """The conditioning of the adapter branches for one kind of transformer call.

    ``identity``: identity tokens ``[1|B, N, C]`` for the attn2 branch (None: branch off).
    ``reference``: per-block reference features ``[1|B, S_ref, D]`` for the attn1 branch (None: off).
    Batch 1 is shared by every video of the batch; batch B gives each video its own.
    """

    def __init__(
        self,
        identity: torch.Tensor | None = None,
        reference: Sequence[torch.Tensor] | None = None,
        ip_scale: float = 1.0,
        ref_scale: float = 1.0,
    ) -> None:
        self.identity = identity
        self.reference = reference
        self.ip_scale = float(ip_scale)
        self.ref_scale = float(ref_scale)
        self._identity_kv: dict[int, KeyValue] = {}
        self._reference_kv: dict[int, KeyValue] = {}

    @property
    def identity_on(self) -> bool:
        return self.identity is not None and self.ip_scale != 0.0

    @property
    def reference_on(self) -> bool:
        return self.reference is not None and self.ref_scale != 0.0

    def identity_kv(self, processor: LynxIdentityAttnProcessor, attn: nn.Module, dtype) -> KeyValue:
        key = processor.block_index
        if key not in self._identity_kv:
            self._identity_kv[key] = processor.identity_keys_values(attn, self.identity, dtype)
        return self._identity_kv[key]

    def reference_kv(self, processor: LynxReferenceAttnProcessor, attn: nn.Module, dtype) -> KeyValue:
        key = processor.block_index
        if key not in self._reference_kv:
            features = self.reference[processor.block_index]
            self._reference_kv[key] = processor.reference_keys_values(attn, features, dtype)
        return self._reference_kv[key]


class StackedAdapterState(AdapterState):
    """Several states along the batch dimension: guidance passes run as one forward.

    Each part covers ``videos`` samples (its own keys and values broadcast to them when it has
    batch 1), in order; the parts' keys and values are still projected once each, by the parts.
    """

    def __init__(self, parts: Sequence[AdapterState], videos: int) -> None:
        first = parts[0]
        if any(
            (p.identity_on, p.reference_on, p.ip_scale, p.ref_scale)
            != (first.identity_on, first.reference_on, first.ip_scale, first.ref_scale)
            for p in parts
        ):
            raise ValueError("stacked adapter states must switch the same branches on, with the same scales")
        super().__init__(
            first.identity if first.identity_on else None,
            first.reference if first.reference_on else None,
            first.ip_scale,
            first.ref_scale,
        )
        self.parts = list(parts)
        self.videos = videos

    def _stack(self, cache: dict[int, KeyValue], key: int, part_kv: Callable[[AdapterState], KeyValue]):
        if key not in cache:
            pieces = [part_kv(part) for part in self.parts]
            cache[key] = tuple(torch.cat([_batched(kv[i], self.videos) for kv in pieces]) for i in range(2))
        return cache[key]

    def identity_kv(self, processor, attn, dtype) -> KeyValue:
        return self._stack(
            self._identity_kv, processor.block_index, lambda p: p.identity_kv(processor, attn, dtype)
        )

    def reference_kv(self, processor, attn, dtype) -> KeyValue:
        return self._stack(
            self._reference_kv, processor.block_index, lambda p: p.reference_kv(processor, attn, dtype)
        )


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's rotary embedding on interleaved pairs. A copy: diffusers defines it inside
    # WanAttnProcessor.__call__, where it cannot be imported; kept operation for operation equal.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _batched(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    return t if t.shape[0] == batch_size else t.expand(batch_size, *t.shape[1:])


class _LynxProcessor(nn.Module):
    """Shared plumbing: the branch handed over for one call, and attention dispatch that honours
    ``model.set_attention_backend(...)``."""

    # read by diffusers' ModelMixin.set_attention_backend, which sets them on every processor
    _attention_backend = None
    _parallel_config = None

    def __init__(self, block_index: int) -> None:
        super().__init__()
        self.block_index = block_index
        # set by LynxAdapter.activated for the duration of one transformer call
        self.branch: KeyValue | None = None
        self.scale = 1.0

    def clear(self) -> None:
        self.branch = None
        self.scale = 1.0

    @staticmethod
    def _heads(attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None) -> tuple:
        """attn's normalised query and key and its value, split into heads ``[B, S, H, D]``."""
        query, key, value = _get_qkv_projections(attn, hidden_states, context)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))

    def _add_branch(self, hidden_states: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """hidden_states + scale x attention of the block's query over the branch's keys and values."""
        batch_size = query.shape[0]
        key, value = (_batched(t, batch_size) for t in self.branch)
        return torch.add(hidden_states, self._attend(query, key, value), alpha=self.scale)

    def _attend(self, query, key, value, attention_mask=None, parallel_config=None) -> torch.Tensor:
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=parallel_config,
        )
        return out.flatten(2, 3).type_as(query)


class LynxIdentityAttnProcessor(_LynxProcessor):
    """attn2 (text cross-attention) plus attention over the identity tokens.

    The identity branch reuses attn2's normalised query; its keys come from ``to_k_ip`` and are
    normalised with attn2's key norm (full) or with an own parameter-free RMSNorm (lite). Its output
    is added, times ``ip_scale``, to the text attention output before attn2's output projection.
    Optional learned ``registers`` are appended to the identity tokens.
    """

    def __init__(
        self,
        hidden_dim: int,
        identity_dim: int,
        *,
        bias: bool = True,
        num_registers: int = 0,
        own_key_norm: bool = False,
        block_index: int = 0,
    ) -> None:
        super().__init__(block_index)
        self.to_k_ip = nn.Linear(identity_dim, hidden_dim, bias=bias)
        self.to_v_ip = nn.Linear(identity_dim, hidden_dim, bias=bias)
        self.registers = (
            nn.Parameter(torch.zeros(1, num_registers, identity_dim)) if num_registers > 0 else None
        )
        # diffusers' RMSNorm (normalises in fp32), as the released lite adapter was trained with
        self.norm_k_ip = RMSNorm(hidden_dim, eps=1e-5, elementwise_affine=False) if own_key_norm else None

    def identity_keys_values(self, attn: nn.Module, tokens: torch.Tensor, dtype=None) -> KeyValue:
        """Keys and values of the identity branch in ``dtype`` (default: the layer's)."""
        dtype = dtype or self.to_k_ip.weight.dtype
        tokens = tokens.to(device=self.to_k_ip.weight.device, dtype=dtype)
        if self.registers is not None:
            registers = self.registers.to(dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens, registers], dim=1)
        key = self.to_k_ip(tokens)
        value = self.to_v_ip(tokens)
        key = self.norm_k_ip(key) if self.norm_k_ip is not None else attn.norm_k(key)
        return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = self._heads(attn, hidden_states, encoder_hidden_states)
        hidden_states = self._attend(query, key, value, attention_mask)
        if self.branch is not None:
            hidden_states = self._add_branch(hidden_states, query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class LynxReferenceAttnProcessor(_LynxProcessor):
    """attn1 (video self-attention) plus attention over the reference features of this block.

    The reference branch uses attn1's normalised query before the rotary embedding; keys from
    ``to_k_ref`` are normalised with attn1's key norm. Its output is added, times ``ref_scale``,
    before attn1's output projection.
    """

    def __init__(self, hidden_dim: int, *, block_index: int = 0) -> None:
        super().__init__(block_index)
        self.to_k_ref = nn.Linear(hidden_dim, hidden_dim)
        self.to_v_ref = nn.Linear(hidden_dim, hidden_dim)

    def reference_keys_values(self, attn: nn.Module, features: torch.Tensor, dtype=None) -> KeyValue:
        """Keys and values of the reference branch in ``dtype`` (default: the layer's)."""
        dtype = dtype or self.to_k_ref.weight.dtype
        features = features.to(device=self.to_k_ref.weight.device, dtype=dtype)
        key = attn.norm_k(self.to_k_ref(features))
        value = self.to_v_ref(features)
        return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = self._heads(attn, hidden_states, encoder_hidden_states)
        reference_query = query  # the branch sees no rotary embedding
        if rotary_emb is not None:
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *rotary_emb)

        # Context parallelism shards the video tokens: like diffusers' processor, only the
        # self-attention over them takes the parallel config (the branch's keys are not sharded).
        hidden_states = self._attend(
            query,
            key,
            value,
            attention_mask,
            parallel_config=self._parallel_config if encoder_hidden_states is None else None,
        )
        if self.branch is not None:
            hidden_states = self._add_branch(hidden_states, reference_query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
