"""Step caching with diffusers' cache hooks, and a count of the DiT block-forwards it skipped.

diffusers 0.42 ships cache hooks that reuse work across denoising steps (``transformer.enable_cache``).
Two of them skip whole Wan blocks, which is what the pipeline counts:

- ``first-block``: First Block Cache. Block 0 always runs; when its residual changed by less
  than ``threshold`` (relative mean absolute difference) since the last full step, the other
  blocks are skipped and their cached residual is reused.
- ``taylorseer``: TaylorSeer in its lite mode. Every ``cache_interval`` steps a full forward
  refreshes Taylor factors of the output projection; the steps between skip every block and
  predict the output.

Each guidance pass runs in its own cache context (the pipeline names them cond / uncond /
identity, or "guidance" for a batched forward), so one pass never reuses another's residuals.
A block-forward counts as skipped when the block's feed-forward did not run; a batched forward of
P passes counts P block-forwards per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import ModelInputError

STEP_CACHES = ("first-block", "taylorseer")


def cache_config(kind: str, options: dict[str, Any]):
    """diffusers' config object for ``kind``; a bad kind or option is a ``ModelInputError``."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if kind == "first-block":
        config_cls, defaults = FirstBlockCacheConfig, {}
    elif kind == "taylorseer":
        config_cls, defaults = TaylorSeerCacheConfig, {"use_lite_mode": True}
    else:
        raise ModelInputError(f"unknown step cache {kind!r}: choose one of {', '.join(STEP_CACHES)}")
    try:
        return config_cls(**(defaults | options))
    except TypeError as err:
        raise ModelInputError(f"step cache {kind!r}: {err}") from None


class StepCache:
    """One cache technique on one transformer, with the counters of the current generation."""

    def __init__(self, kind: str, options: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.options = dict(options or {})
        self.config = cache_config(kind, self.options)
        self._hooks: list = []
        self._blocks = 0
        self._feed_forwards = 0
        self.block_forwards = 0
        self.computed = 0

    def enable(self, transformer: torch.nn.Module) -> None:
        transformer.enable_cache(self.config)
        self._blocks = len(transformer.blocks)
        self._hooks = [block.ffn.register_forward_pre_hook(self._count) for block in transformer.blocks]

    def disable(self, transformer: torch.nn.Module) -> None:
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _count(self, module, args) -> None:
        self._feed_forwards += 1

    def start(self) -> None:
        """Zero the counters (the cache's own state is reset by the pipeline after each call)."""
        self.block_forwards = self.computed = 0

    @contextmanager
    def counting(self, passes: int = 1) -> Iterator[None]:
        """Count one transformer call of ``passes`` guidance passes."""
        before = self._feed_forwards
        yield
        self.block_forwards += self._blocks * passes
        self.computed += (self._feed_forwards - before) * passes

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "options": {k: v for k, v in self.options.items() if isinstance(v, (int, float, str, bool))},
            "block_forwards": self.block_forwards,
            "skipped_block_forwards": self.block_forwards - self.computed,
        }
