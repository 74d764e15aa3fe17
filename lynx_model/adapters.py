"""Lynx adapter weights: layer sets, what a released folder holds, loading, installing, saving.

A released adapter folder (``lynx_full`` or ``lynx_lite``) is three files with no config:

- ``resampler.safetensors``: the Perceiver resampler (``LynxResampler`` keys);
- ``ip_layers.safetensors``: one identity processor per adapted block, keys ``{k}.to_k_ip.*``,
  ``{k}.to_v_ip.*``, optional ``{k}.registers``; k counts adapted blocks (every block in full,
  blocks 0, 2, 4, ... in lite);
- ``ref_layers.safetensors`` (full only): ``{k}.to_k_ref.*``, ``{k}.to_v_ref.*`` for every block.

``AdapterSpec.from_folder`` infers the variant and every size from tensor shapes (headers only),
so the same code loads the 14B release and the tiny test models.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import save_file

from .attention import AdapterState, LynxIdentityAttnProcessor, LynxReferenceAttnProcessor
from .checkpoint import SafetensorsHeader, check_keys, fingerprint, load_into, read_header
from .errors import WeightsError
from .resampler import LynxResampler

RESAMPLER_FILE = "resampler.safetensors"
IDENTITY_FILE = "ip_layers.safetensors"
REFERENCE_FILE = "ref_layers.safetensors"
RESAMPLER_HEAD_DIM = 64  # the released resampler's head size; the files do not record it

Variant = Literal["full", "lite"]


class LynxIdentityAdapterLayers(ModelMixin, ConfigMixin):
    """The identity processors of one adapter, named ``"0"``, ``"1"``, ... like the released file."""

    @register_to_config
    def __init__(
        self,
        num_layers: int,
        hidden_dim: int,
        identity_dim: int,
        block_stride: int = 1,
        bias: bool = True,
        num_registers: int = 0,
        own_key_norm: bool = False,
    ) -> None:
        super().__init__()
        for k in range(num_layers):
            processor = LynxIdentityAttnProcessor(
                hidden_dim,
                identity_dim,
                bias=bias,
                num_registers=num_registers,
                own_key_norm=own_key_norm,
                block_index=k * block_stride,
            )
            self.add_module(str(k), processor)

    def processors(self) -> list[LynxIdentityAttnProcessor]:
        return list(self.children())


class LynxReferenceAdapterLayers(ModelMixin, ConfigMixin):
    """The reference processors of a full adapter, one per block, named ``"0"``, ``"1"``, ..."""

    @register_to_config
    def __init__(self, num_layers: int, hidden_dim: int) -> None:
        super().__init__()
        for k in range(num_layers):
            self.add_module(str(k), LynxReferenceAttnProcessor(hidden_dim, block_index=k))

    def processors(self) -> list[LynxReferenceAttnProcessor]:
        return list(self.children())


def variant_layout(variant: Variant, num_blocks: int) -> dict[str, Any]:
    """How each variant adapts a DiT of ``num_blocks`` blocks."""
    if variant == "full":
        return {"num_layers": num_blocks, "block_stride": 1, "bias": True, "own_key_norm": False}
    return {"num_layers": math.ceil(num_blocks / 2), "block_stride": 2, "bias": False, "own_key_norm": True}


def _layer_indices(header: SafetensorsHeader) -> list[int]:
    indices = set()
    for key in header.tensors:
        head = key.split(".", 1)[0]
        if not head.isdigit():
            raise WeightsError(
                f"{header.path} has a key that is not per-layer: {key}", path=header.path, role="adapter"
            )
        indices.add(int(head))
    return sorted(indices)


def _require(header: SafetensorsHeader, key: str) -> tuple[int, ...]:
    if key not in header.tensors:
        raise WeightsError(f"{header.path} lacks the tensor {key}", path=header.path, role="adapter")
    return header.shape(key)


@dataclass(frozen=True)
class AdapterSpec:
    """Variant and sizes of an adapter folder, read from tensor shapes alone."""

    folder: Path
    variant: Variant
    resampler_config: dict[str, int]
    identity_config: dict[str, Any]
    reference_config: dict[str, int] | None
    headers: dict[str, SafetensorsHeader] = field(repr=False, compare=False)
    num_blocks: int = 0

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        num_blocks: int,
        hidden_dim: int,
        variant: Literal["auto", "full", "lite"] = "auto",
    ) -> AdapterSpec:
        """Inspect ``folder`` for a DiT with ``num_blocks`` blocks of width ``hidden_dim``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"adapter folder not found: {folder}", path=folder, role="adapter")
        resampler = read_header(folder / RESAMPLER_FILE, role="adapter")
        identity = read_header(folder / IDENTITY_FILE, role="adapter")
        reference_path = folder / REFERENCE_FILE
        reference = read_header(reference_path, role="adapter") if reference_path.exists() else None

        resampler_config = cls._resampler_config(resampler)

        indices = _layer_indices(identity)
        if indices != list(range(len(indices))) or not indices:
            raise WeightsError(
                f"{identity.path}: layer indices are not 0..n-1", path=identity.path, role="adapter"
            )
        out_dim, identity_dim = _require(identity, "0.to_k_ip.weight")
        has_bias = "0.to_k_ip.bias" in identity.tensors
        num_registers = identity.shape("0.registers")[1] if "0.registers" in identity.tensors else 0

        # ip_layers alone tells the variant: a missing or stray ref_layers file is then named as such
        # instead of surfacing as a layer-count mismatch of the other variant
        layouts = {v: variant_layout(v, num_blocks) for v in ("full", "lite")}
        fits = [
            v
            for v, layout in layouts.items()
            if len(indices) == layout["num_layers"] and has_bias == layout["bias"]
        ]
        if not fits:
            detected: Variant = variant if variant != "auto" else "full" if reference is not None else "lite"
            layout = layouts[detected]
            raise WeightsError(
                f"{identity.path} has {len(indices)} layers {'with' if has_bias else 'without'} bias; "
                f"a {detected} "
                f"adapter for a {num_blocks}-block DiT has {layout['num_layers']} layers "
                f"{'with' if layout['bias'] else 'without'} bias (wrong base model or mixed-up files?)",
                path=identity.path,
                role="adapter",
            )
        detected = fits[0]
        layout = layouts[detected]
        if variant not in ("auto", detected):
            raise WeightsError(
                f"{folder} holds a {detected} adapter ({IDENTITY_FILE} has {len(indices)} layers "
                f"{'with' if has_bias else 'without'} bias) but the {variant} variant was asked for",
                path=folder,
                role="variant",
            )
        if detected == "full" and reference is None:
            raise WeightsError(
                f"missing {reference_path}: {IDENTITY_FILE} holds a full adapter, which needs it",
                path=reference_path,
                role="adapter",
            )
        if detected == "lite" and reference is not None:
            raise WeightsError(
                f"{reference_path} does not belong here: {IDENTITY_FILE} holds a lite adapter "
                "(mixed-up files?)",
                path=reference_path,
                role="adapter",
            )
        if out_dim != hidden_dim:
            raise WeightsError(
                f"{identity.path}: to_k_ip projects to {out_dim} channels but the DiT is {hidden_dim} wide "
                "(adapter made for another base model?)",
                path=identity.path,
                role="adapter",
            )
        if identity_dim != resampler_config["output_dim"]:
            raise WeightsError(
                f"{identity.path}: identity layers take {identity_dim}-d tokens but the resampler makes "
                f"{resampler_config['output_dim']}-d tokens",
                path=identity.path,
                role="adapter",
            )
        identity_config = dict(
            layout, hidden_dim=hidden_dim, identity_dim=identity_dim, num_registers=num_registers
        )

        reference_config = None
        headers = {RESAMPLER_FILE: resampler, IDENTITY_FILE: identity}
        if reference is not None:
            reference_config = {"num_layers": num_blocks, "hidden_dim": hidden_dim}
            headers[REFERENCE_FILE] = reference
        return cls(folder, detected, resampler_config, identity_config, reference_config, headers, num_blocks)

    @staticmethod
    def _resampler_config(header: SafetensorsHeader) -> dict[str, int]:
        _, num_queries, dim = _require(header, "latents")
        embedding_dim = _require(header, "proj_in.weight")[1]
        output_dim = _require(header, "proj_out.weight")[0]
        inner_dim = _require(header, "layers.0.0.to_q.weight")[0]
        ff_inner = _require(header, "layers.0.1.1.weight")[0]
        depth = len({int(m.group(1)) for key in header.tensors if (m := re.match(r"layers\.(\d+)\.", key))})
        if inner_dim % RESAMPLER_HEAD_DIM or ff_inner % dim:
            raise WeightsError(
                f"{header.path}: resampler sizes do not fit heads of {RESAMPLER_HEAD_DIM} "
                f"(inner width {inner_dim}, feed-forward {ff_inner})",
                path=header.path,
                role="adapter",
            )
        return {
            "embedding_dim": embedding_dim,
            "dim": dim,
            "depth": depth,
            "heads": inner_dim // RESAMPLER_HEAD_DIM,
            "dim_head": RESAMPLER_HEAD_DIM,
            "num_queries": num_queries,
            "output_dim": output_dim,
            "ff_mult": ff_inner // dim,
        }

    def fingerprint(self) -> str:
        return fingerprint(header.path for header in self.headers.values())


def _check_and_load(model: torch.nn.Module, header: SafetensorsHeader, device, dtype, what: str) -> None:
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    check_keys(header, expected, role="adapter", what=what)
    load_into(model, header, device=device, dtype=dtype, role="adapter")


def _load_checked(model_cls, config: dict, header: SafetensorsHeader, device, dtype, what: str):
    with torch.device("meta"):
        model = model_cls(**config)
    _check_and_load(model, header, device, dtype, what)
    return model.eval().requires_grad_(False)


class LynxAdapter(ModelMixin, ConfigMixin):
    """The branch layers of one Lynx adapter: identity processors, and reference processors (full).

    A pipeline component (``pipe.lynx_adapter``) whose processors are set on the transformer's
    attention modules by ``install`` and become their submodules; ``uninstall`` puts diffusers'
    stock processors back. Saved by ``save_pretrained`` in diffusers' layout (``config.json`` +
    safetensors, keys ``identity.{k}.*`` / ``reference.{k}.*``); the released three-file layout is
    read by ``AdapterSpec`` / ``load_adapters`` and written by ``save_adapters``.

    ``source_fingerprint`` names the adapter files the weights were first read from (see
    ``checkpoint.fingerprint``); it travels with the config so that stored conditioning made with
    the released files is still accepted by a pipeline re-saved from them.
    """

    _exclude_from_cpu_offload = True

    @register_to_config
    def __init__(
        self,
        variant: Variant,
        num_blocks: int,
        hidden_dim: int,
        identity_dim: int,
        num_registers: int = 0,
        source_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        layout = variant_layout(variant, num_blocks)
        self.identity = LynxIdentityAdapterLayers(
            hidden_dim=hidden_dim, identity_dim=identity_dim, num_registers=num_registers, **layout
        )
        self.reference = LynxReferenceAdapterLayers(num_blocks, hidden_dim) if variant == "full" else None

    @property
    def variant(self) -> Variant:
        return self.config.variant

    @property
    def fingerprint(self) -> str | None:
        return self.config.source_fingerprint

    # kept under the names the rest of lynx_model has used for the two layer sets
    @property
    def identity_layers(self) -> LynxIdentityAdapterLayers:
        return self.identity

    @property
    def reference_layers(self) -> LynxReferenceAdapterLayers | None:
        return self.reference

    def processors(self) -> list:
        processors = self.identity.processors()
        if self.reference is not None:
            processors += self.reference.processors()
        return processors

    def forward(self, *args, **kwargs):  # the processors run inside the transformer
        raise TypeError("LynxAdapter is not called directly: its processors run inside the transformer")

    def install(self, transformer: torch.nn.Module) -> None:
        """Set the processors on ``transformer``'s attention modules (they become its submodules)."""
        blocks = transformer.blocks
        if len(blocks) != self.config.num_blocks:
            raise WeightsError(
                f"this Lynx adapter is made for a {self.config.num_blocks}-block DiT, the transformer has "
                f"{len(blocks)} blocks"
            )
        if any(block.attn2.add_k_proj is not None for block in blocks):
            raise WeightsError(
                "Lynx adapters need a text-to-video Wan transformer (this one has image inputs)"
            )
        for processor in self.processors():
            attn = _branch_attention(transformer, processor)
            backend = getattr(attn.processor, "_attention_backend", None)
            attn.set_processor(processor)
            processor._attention_backend = backend or processor._attention_backend

    @staticmethod
    def uninstall(transformer: torch.nn.Module) -> None:
        """Give every attention module of ``transformer`` diffusers' stock processor back."""
        for block in transformer.blocks:
            for attn in (block.attn1, block.attn2):
                if isinstance(attn.processor, (LynxIdentityAttnProcessor, LynxReferenceAttnProcessor)):
                    backend = attn.processor._attention_backend
                    attn.set_processor(WanAttnProcessor())
                    attn.processor._attention_backend = backend

    @contextmanager
    def detached(self, transformer: torch.nn.Module) -> Iterator[None]:
        """Temporarily restore the stock transformer, e.g. to save it as a plain Wan model."""
        self.uninstall(transformer)
        try:
            yield
        finally:
            self.install(transformer)

    @contextmanager
    def activated(
        self, transformer: torch.nn.Module, state: AdapterState | None, dtype: torch.dtype | None = None
    ) -> Iterator[None]:
        """Hand every processor its branch of ``state`` for the transformer calls inside the block.

        ``dtype``: the transformer's compute dtype (keys and values are made in it); default the
        adapter's own.
        """
        if state is None:
            yield
            return
        try:
            for processor in self.processors():
                attn = _branch_attention(transformer, processor)
                if isinstance(processor, LynxIdentityAttnProcessor) and state.identity_on:
                    processor.branch = state.identity_kv(processor, attn, dtype)
                    processor.scale = state.ip_scale
                elif isinstance(processor, LynxReferenceAttnProcessor) and state.reference_on:
                    processor.branch = state.reference_kv(processor, attn, dtype)
                    processor.scale = state.ref_scale
            yield
        finally:
            for processor in self.processors():
                processor.clear()


def _branch_attention(transformer: torch.nn.Module, processor) -> torch.nn.Module:
    block = transformer.blocks[processor.block_index]
    return block.attn2 if isinstance(processor, LynxIdentityAttnProcessor) else block.attn1


def load_adapters(
    spec: AdapterSpec,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    resampler_dtype: torch.dtype = torch.float32,
) -> tuple[LynxResampler, LynxAdapter]:
    """Stream the weights of an inspected adapter folder to ``device`` (checked key by key first)."""
    resampler = _load_checked(
        LynxResampler,
        spec.resampler_config,
        spec.headers[RESAMPLER_FILE],
        device,
        resampler_dtype,
        "resampler",
    )
    config = spec.identity_config
    with torch.device("meta"):
        adapter = LynxAdapter(
            spec.variant,
            num_blocks=spec.num_blocks,
            hidden_dim=config["hidden_dim"],
            identity_dim=config["identity_dim"],
            num_registers=config["num_registers"],
            source_fingerprint=spec.fingerprint(),
        )
    _check_and_load(adapter.identity, spec.headers[IDENTITY_FILE], device, dtype, spec.variant)
    if adapter.reference is not None:
        _check_and_load(adapter.reference, spec.headers[REFERENCE_FILE], device, dtype, "full")
    return resampler, adapter.eval().requires_grad_(False)


def save_adapters(
    folder: str | Path,
    resampler: LynxResampler,
    adapter: LynxAdapter,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``folder`` in the released layout (three safetensors files, no config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def write(module: torch.nn.Module, name: str) -> None:
        tensors = {
            key: (t.to(dtype) if dtype is not None else t).detach().to("cpu").contiguous()
            for key, t in module.state_dict().items()
        }
        save_file(tensors, str(folder / name), metadata={"format": "pt"})

    write(resampler, RESAMPLER_FILE)
    write(adapter.identity, IDENTITY_FILE)
    if adapter.reference is not None:
        write(adapter.reference, REFERENCE_FILE)
    return folder


def read_transformer_size(transformer_folder: str | Path) -> tuple[int, int]:
    """(number of blocks, hidden width) from a Wan transformer's config.json, before loading it."""
    path = Path(transformer_folder) / "config.json"
    try:
        config = json.loads(path.read_text())
        return int(config["num_layers"]), int(config["num_attention_heads"]) * int(
            config["attention_head_dim"]
        )
    except FileNotFoundError:
        raise WeightsError(
            f"missing {path} (is this a Wan2.1 diffusers folder?)", path=path, role="base"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(
            f"{path} is not a Wan transformer config ({err})", path=path, role="base"
        ) from None
