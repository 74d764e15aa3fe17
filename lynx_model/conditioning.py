"""Conditioning computed once and reused: prompt embeddings, identity tokens, reference features.

Each is a small dataclass that saves to and loads from one safetensors file (tensors plus a few
string metadata fields), so a batch flow can compute it in one stage, store it as an artifact and
feed it to the sampler in another process. Metadata records which weights produced it; the
pipeline refuses conditioning made with other weights instead of generating garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelInputError


def _save(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    save_file(tensors, str(path), metadata={"lynx_kind": kind, "lynx_meta": json.dumps(meta)})
    return path


def _load(path: str | Path, kind: str, device, dtype) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"{kind} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:
        raise ModelInputError(f"{path} is not a readable {kind} file: {err}") from err
    if metadata.get("lynx_kind") != kind:
        raise ModelInputError(f"{path} holds {metadata.get('lynx_kind') or 'unknown data'}, not {kind}")
    tensors = {
        key: t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)
        for key, t in tensors.items()
    }
    return tensors, json.loads(metadata.get("lynx_meta", "{}"))


@dataclass
class PromptEmbeddings:
    """UMT5 embeddings ``[B, 512, text_dim]`` of a prompt and, when guidance is on, its negative."""

    KIND: ClassVar[str] = "prompt_embeddings"
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None

    def save(self, path: str | Path) -> Path:
        tensors = {"prompt_embeds": self.prompt_embeds}
        if self.negative_prompt_embeds is not None:
            tensors["negative_prompt_embeds"] = self.negative_prompt_embeds
        return _save(path, tensors, self.KIND, {})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        tensors, _ = _load(path, cls.KIND, device, dtype)
        return cls(tensors["prompt_embeds"], tensors.get("negative_prompt_embeds"))


@dataclass
class IdentityTokens:
    """Resampler output for one face (``cond``) and for the all-zero embedding (``uncond``), ``[1, Q, C]``."""

    KIND: ClassVar[str] = "identity_tokens"
    cond: torch.Tensor
    uncond: torch.Tensor
    variant: str
    adapter_fingerprint: str | None = None

    @property
    def token_dim(self) -> int:
        return int(self.cond.shape[-1])

    def to(self, device=None, dtype=None) -> IdentityTokens:
        return IdentityTokens(
            self.cond.to(device=device, dtype=dtype),
            self.uncond.to(device=device, dtype=dtype),
            self.variant,
            self.adapter_fingerprint,
        )

    def save(self, path: str | Path) -> Path:
        meta = {"variant": self.variant, "adapter_fingerprint": self.adapter_fingerprint}
        return _save(path, {"cond": self.cond, "uncond": self.uncond}, self.KIND, meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        tensors, meta = _load(path, cls.KIND, device, dtype)
        return cls(tensors["cond"], tensors["uncond"], meta["variant"], meta.get("adapter_fingerprint"))


@dataclass
class ReferenceFeatures:
    """Per-block attn1 inputs of the frozen DiT on the reference face (``cond``) and on grey (``uncond``).

    Each list holds one ``[1, S_ref, D]`` tensor per block (S_ref = 256 for a 256x256 crop).
    """

    KIND: ClassVar[str] = "reference_features"
    cond: list[torch.Tensor]
    uncond: list[torch.Tensor]
    seed: int
    base_fingerprint: str | None = None
    adapter_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.cond)

    @property
    def hidden_dim(self) -> int:
        return int(self.cond[0].shape[-1])

    def save(self, path: str | Path) -> Path:
        tensors = {f"cond.{i}": t for i, t in enumerate(self.cond)}
        tensors.update({f"uncond.{i}": t for i, t in enumerate(self.uncond)})
        meta = {
            "seed": self.seed,
            "base_fingerprint": self.base_fingerprint,
            "adapter_fingerprint": self.adapter_fingerprint,
            "num_layers": self.num_layers,
            **self.extra,
        }
        return _save(path, tensors, self.KIND, meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        tensors, meta = _load(path, cls.KIND, device, dtype)
        n = int(meta.pop("num_layers"))
        try:
            cond = [tensors[f"cond.{i}"] for i in range(n)]
            uncond = [tensors[f"uncond.{i}"] for i in range(n)]
        except KeyError as err:
            raise ModelInputError(f"{path} is incomplete: missing {err.args[0]}") from None
        return cls(
            cond,
            uncond,
            int(meta.pop("seed")),
            meta.pop("base_fingerprint", None),
            meta.pop("adapter_fingerprint", None),
            meta,
        )
