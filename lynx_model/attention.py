"""Attention processors that add Lynx's identity and reference branches to a stock Wan DiT.

They are set on diffusers' ``WanAttention`` modules with ``attn.set_processor(...)`` (the public
extension point); nothing in diffusers is patched or subclassed. Because ``WanTransformerBlock``
passes no extra arguments to its attention modules, the per-call inputs of the branches reach the
processors through an ``AdapterRuntime`` they share: the pipeline puts an ``AdapterState`` there
for the duration of one transformer call (``with runtime.use(state): transformer(...)``).

With no state in place, or a branch's scale at 0, a processor computes exactly what diffusers'
``WanAttnProcessor`` computes, operation for operation, so adapters that are off leave the base
model bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import RMSNorm
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]


class AdapterState:
    """What the adapter branches see during one transformer call.

    ``identity``: identity tokens ``[B|1, N, C]`` for the attn2 branch (None: branch off).
    ``reference``: per-block reference features ``[B|1, S_ref, D]`` for the attn1 branch (None: off).
    ``capture``: record every block's attn1 input instead (how reference features are made).

    Keys and values of the branches depend only on these constant inputs, so each processor
    computes them on first use and keeps them here: one state object per conditioning, reused for
    every denoising step, projects them once per generation.
    """

    def __init__(
        self,
        identity: torch.Tensor | None = None,
        reference: Sequence[torch.Tensor] | None = None,
        ip_scale: float = 1.0,
        ref_scale: float = 1.0,
        capture: bool = False,
    ) -> None:
        self.identity = identity
        self.reference = reference
        self.ip_scale = float(ip_scale)
        self.ref_scale = float(ref_scale)
        self.captured: dict[int, torch.Tensor] | None = {} if capture else None
        self._identity_kv: dict[int, KeyValue] = {}
        self._reference_kv: dict[int, KeyValue] = {}

    @property
    def identity_on(self) -> bool:
        return self.identity is not None and self.ip_scale != 0.0

    @property
    def reference_on(self) -> bool:
        return self.reference is not None and self.ref_scale != 0.0

    def identity_kv(self, block_index: int, compute: Callable[[], KeyValue]) -> KeyValue:
        if block_index not in self._identity_kv:
            self._identity_kv[block_index] = compute()
        return self._identity_kv[block_index]

    def reference_kv(self, block_index: int, compute: Callable[[], KeyValue]) -> KeyValue:
        if block_index not in self._reference_kv:
            self._reference_kv[block_index] = compute()
        return self._reference_kv[block_index]


_INACTIVE = AdapterState()


class AdapterRuntime:
    """The slot through which one transformer's Lynx processors receive their ``AdapterState``."""

    def __init__(self) -> None:
        self.current: AdapterState = _INACTIVE

    @contextmanager
    def use(self, state: AdapterState) -> Iterator[AdapterState]:
        previous, self.current = self.current, state
        try:
            yield state
        finally:
            self.current = previous


def _project_qkv(attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None) -> tuple:
    context = hidden_states if context is None else context
    if getattr(attn, "fused_projections", False):
        if attn.is_cross_attention:
            key, value = attn.to_kv(context).chunk(2, dim=-1)
            return attn.to_q(hidden_states), key, value
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's rotary embedding on interleaved pairs, written as diffusers' Wan processor evaluates it
    # so that the base path stays bit-identical to it.
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
    """Shared plumbing: attention dispatch that honours ``model.set_attention_backend(...)``."""

    # read by diffusers' ModelMixin.set_attention_backend, which sets them on every processor
    _attention_backend = None
    _parallel_config = None

    def __init__(self, block_index: int) -> None:
        super().__init__()
        self.block_index = block_index
        self.runtime: AdapterRuntime | None = None

    @property
    def state(self) -> AdapterState:
        return self.runtime.current if self.runtime is not None else _INACTIVE

    @staticmethod
    def _heads(attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None) -> tuple:
        """attn's normalised query and key and its value, split into heads ``[B, S, H, D]``."""
        query, key, value = _project_qkv(attn, hidden_states, context)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))

    def _attend_branch(self, query: torch.Tensor, key_value: KeyValue) -> torch.Tensor:
        """Attention of the block's query over a branch's (batch-1 or per-sample) keys and values."""
        batch_size = query.shape[0]
        return self._attend(query, *(_batched(t, batch_size) for t in key_value))

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

    def identity_keys_values(self, attn: nn.Module, tokens: torch.Tensor) -> KeyValue:
        weight = self.to_k_ip.weight
        tokens = tokens.to(device=weight.device, dtype=weight.dtype)
        if self.registers is not None:
            registers = self.registers.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens, registers], dim=1)
        key = self.to_k_ip(tokens)
        value = self.to_v_ip(tokens)
        key = self.norm_k_ip(key) if self.norm_k_ip is not None else attn.norm_k(key)
        return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = self._heads(attn, hidden_states, encoder_hidden_states)
        hidden_states = self._attend(query, key, value, attention_mask)

        state = self.state
        if state.identity_on:
            key_value = state.identity_kv(
                self.block_index, lambda: self.identity_keys_values(attn, state.identity)
            )
            hidden_states = torch.add(
                hidden_states, self._attend_branch(query, key_value), alpha=state.ip_scale
            )

        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class LynxReferenceAttnProcessor(_LynxProcessor):
    """attn1 (video self-attention) plus attention over the reference features of this block.

    The reference branch uses attn1's normalised query before the rotary embedding; keys from
    ``to_k_ref`` are normalised with attn1's key norm. Its output is added, times ``ref_scale``,
    before attn1's output projection. In capture mode the processor records its input, which is
    the modulated, normalised hidden state the block feeds to attn1.
    """

    def __init__(self, hidden_dim: int, *, block_index: int = 0) -> None:
        super().__init__(block_index)
        self.to_k_ref = nn.Linear(hidden_dim, hidden_dim)
        self.to_v_ref = nn.Linear(hidden_dim, hidden_dim)

    def reference_keys_values(self, attn: nn.Module, features: torch.Tensor) -> KeyValue:
        weight = self.to_k_ref.weight
        features = features.to(device=weight.device, dtype=weight.dtype)
        key = attn.norm_k(self.to_k_ref(features))
        value = self.to_v_ref(features)
        return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.state
        if state.captured is not None:
            state.captured[self.block_index] = hidden_states

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

        if state.reference_on:
            features = state.reference[self.block_index]
            key_value = state.reference_kv(
                self.block_index, lambda: self.reference_keys_values(attn, features)
            )
            reference_out = self._attend_branch(reference_query, key_value)
            hidden_states = torch.add(hidden_states, reference_out, alpha=state.ref_scale)

        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
