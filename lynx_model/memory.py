"""How much accelerator memory the activations of a generation take, per video in the batch.

A caller that wants N videos of one job in one batch (best-of-N candidates: ``seed=[s, s+1, ...]``)
asks ``activation_bytes_per_video`` how much each extra video adds and compares it with the free
memory left once the weights are resident. The estimate counts the tensors alive at the peak of a
no-grad DiT block forward, from the transformer's config alone:

- the residual update after the feed-forward holds the block input and output in the compute
  dtype and four float32 copies of the stream (Wan adds the gated update in float32), which is the
  peak for Wan2.1's shapes (~102 KB per video token for the 14B DiT in bf16);
- the feed-forward holds two ``ffn_dim``-wide tensors (projection and GELU), attention about nine
  ``dim``-wide ones (q, k, v, their normalised and rotated forms, the output);
- per video, the text states and their cross-attention keys and values, and (when each video has
  its own reference, as with a list of seeds) the reference features and their keys and values in
  every block.

Guidance passes run one after another reuse the same activations; batched guidance (all passes in
one forward) multiplies them by the number of passes. ``benchmarks/gpu_check.py`` prints the
estimate beside the measured peak per extra video.
"""

from __future__ import annotations

from typing import Any

import torch

FLOAT32_BYTES = 4


def dit_tokens(
    config: Any, height: int, width: int, num_frames: int, temporal: int = 4, spatial: int = 8
) -> int:
    """Video tokens the DiT sees for a ``num_frames`` x ``height`` x ``width`` video."""
    patch_t, patch_h, patch_w = config.patch_size
    latent_frames = (num_frames - 1) // temporal + 1
    return (latent_frames // patch_t) * (height // spatial // patch_h) * (width // spatial // patch_w)


def activation_bytes(
    config: Any,
    video_tokens: int,
    *,
    text_tokens: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    passes_per_forward: int = 1,
    reference_tokens: int = 0,
) -> int:
    """Peak activation bytes one video adds to a DiT forward (weights and the model's own state excluded).

    ``passes_per_forward``: guidance passes batched into one forward (1 when they run one after
    another). ``reference_tokens``: tokens of a per-video reference (256 for a 256x256 crop; 0 when
    the reference is shared by the batch, or absent).
    """
    element = torch.finfo(dtype).bits // 8
    dim = config.num_attention_heads * config.attention_head_dim
    ffn = config.ffn_dim
    stream_peak = max(
        4 * dim * FLOAT32_BYTES + 2 * dim * element,  # gated residual update in float32
        2 * ffn * element + 2 * dim * element,  # feed-forward
        9 * dim * element,  # attention
    )
    per_pass = video_tokens * stream_peak + 3 * text_tokens * dim * element
    # per block: reference features (cond, uncond) and their keys and values, kept for the whole run
    reference = reference_tokens * dim * element * 6 * config.num_layers
    return passes_per_forward * per_pass + reference


def videos_that_fit(free_bytes: int, bytes_per_video: int, *, headroom: float = 0.9) -> int:
    """How many videos' activations fit in ``free_bytes`` (at least 1: one video is always tried)."""
    if bytes_per_video <= 0:
        raise ValueError("bytes_per_video must be positive")
    return max(1, int(free_bytes * headroom) // bytes_per_video)
