"""The Perceiver resampler that turns one face embedding into identity tokens.

A fixed set of learned latent queries attends, layer after layer, to the projected face embedding
(and to themselves); the result is projected to the width the DiT's identity branch expects. The
module and parameter names follow the released ``resampler.safetensors`` so that file loads as is.

Kept rather than diffusers' ``IPAdapterPlusImageProjection`` (the same Perceiver): that is a plain
``nn.Module`` a pipeline cannot save or load as a component, and its key conversion lives in the
UNet loader, while the released file must load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class LatentCrossAttention(nn.Module):
    """Latents attend to the concatenation of the inputs and themselves (no biases)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # for the inputs
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, inputs: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        inputs = self.norm1(inputs)
        latents = self.norm2(latents)
        query = self.to_q(latents)
        key, value = self.to_kv(torch.cat([inputs, latents], dim=1)).chunk(2, dim=-1)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split_heads(query), split_heads(key), split_heads(value))
        return self.to_out(out.transpose(1, 2).flatten(2))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # indices 0, 1, 3 carry weights: the checkpoint keys are layers.{i}.1.{0,1,3}.*
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class LynxResampler(ModelMixin, ConfigMixin):
    """Maps face embeddings ``[B, n, embedding_dim]`` to identity tokens ``[B, num_queries, output_dim]``.

    Released sizes: embedding_dim 512 (ArcFace), dim 1280, depth 4, 20 heads of 64, 16 queries,
    output_dim 5120 (full) or 2048 (lite).
    """

    @register_to_config
    def __init__(
        self,
        embedding_dim: int = 512,
        dim: int = 1280,
        depth: int = 4,
        heads: int = 20,
        dim_head: int = 64,
        num_queries: int = 16,
        output_dim: int = 5120,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([LatentCrossAttention(dim, heads, dim_head), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        inputs = self.proj_in(embeds)
        latents = self.latents.expand(embeds.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(inputs, latents)
            latents = latents + feed_forward(latents)
        return self.norm_out(self.proj_out(latents))
