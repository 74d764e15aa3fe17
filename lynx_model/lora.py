"""Wan LoRAs on a Lynx pipeline, through diffusers' ``WanLoraLoaderMixin``.

``LynxPipeline`` is a ``WanLoraLoaderMixin``, so ``pipe.load_lora_weights(...)``,
``pipe.set_adapters(...)`` and ``pipe.fuse_lora()`` work as on ``WanPipeline``; the LoRA layers
wrap the attention's own projections, which the Lynx processors call like diffusers' processor
does. diffusers converts the common Wan formats on load (its own ``transformer.blocks.*``, the
original Wan / ComfyUI ``diffusion_model.blocks.*`` keys, kohya's musubi-tuner ``lora_unet_*``).

``load_loras`` adds what a batch pipeline needs on top: each file checked against the transformer
before anything is loaded (peft would only warn about keys that fit nothing), a one-line error
naming the file, and the sha256 and scale of every file for the provenance manifest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import LynxPipeline


@dataclass(frozen=True)
class LoadedLora:
    """One LoRA file as loaded: where it came from, its sha256, its scale and its peft adapter name."""

    path: Path
    sha256: str
    scale: float
    adapter_name: str

    def as_record(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_lora(path: Path, state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module) -> None:
    """Every LoRA matrix must target a linear layer of ``transformer`` with matching sizes."""
    modules = dict(transformer.named_modules())
    pattern = re.compile(r"^(?:transformer\.)?(.+)\.lora_(A|B)\.(weight|bias)$")
    for key, tensor in state_dict.items():
        match = pattern.match(key)
        if match is None:
            raise WeightsError(f"{path} holds {key}, which is not a LoRA matrix", path=path, role="lora")
        name, side, kind = match.groups()
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)  # a layer another LoRA already wraps
        if not isinstance(layer, torch.nn.Linear):
            raise WeightsError(
                f"{path} is not a LoRA for this Wan transformer: {key} targets {name}, which it lacks",
                path=path,
                role="lora",
            )
        expected = layer.in_features if side == "A" else layer.out_features
        got = tensor.shape[1] if side == "A" and kind == "weight" else tensor.shape[0]
        if got != expected:
            raise WeightsError(
                f"{path} does not fit this Wan transformer: {key} has {got} features where {name} has "
                f"{expected} (a LoRA for another model size?)",
                path=path,
                role="lora",
            )


def load_loras(pipe: LynxPipeline, loras: Sequence[tuple[str | Path, float]]) -> list[LoadedLora]:
    """Load LoRA files with their scales into ``pipe``'s transformer and activate them together.

    Raises ``WeightsError`` naming the file when it is missing, unreadable, or made for another
    transformer; nothing is loaded then.
    """
    prepared = []
    for index, (path, scale) in enumerate(loras):
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"LoRA file not found: {path}", path=path, role="lora")
        try:
            state_dict = pipe.lora_state_dict(str(path))
        except Exception as err:  # safetensors and the format converters raise many kinds
            raise WeightsError(
                f"{path} is not a readable Wan LoRA: {_first_line(err)}", path=path, role="lora"
            ) from err
        if not state_dict:
            raise WeightsError(f"{path} holds no LoRA weights", path=path, role="lora")
        check_lora(path, state_dict, pipe.transformer)
        name = f"lora{index}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
        prepared.append((path, float(scale), name, state_dict))
    loaded = []
    for path, scale, name, state_dict in prepared:
        pipe.load_lora_weights(state_dict, adapter_name=name)
        loaded.append(LoadedLora(path, sha256_of(path), scale, name))
    if loaded:
        pipe.loras = [*getattr(pipe, "loras", []), *loaded]
        # every LoRA still held as a peft adapter (fused and unloaded ones are part of the weights)
        present = set(pipe.get_list_adapters().get("transformer", []))
        active = [lora for lora in pipe.loras if lora.adapter_name in present]
        pipe.set_adapters([lora.adapter_name for lora in active], [lora.scale for lora in active])
    return loaded
