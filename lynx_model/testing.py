"""Tiny, randomly initialised Lynx models in exactly the released folder layout.

``write_tiny_models(root)`` writes

- ``root/base``: a real Wan2.1 diffusers folder (model_index.json, transformer/, vae/,
  text_encoder/ = a small ``UMT5EncoderModel``, tokenizer/ = a Unigram tokenizer built offline and
  saved as tokenizer.json, scheduler/ = UniPC with the 480p settings), via ``save_pretrained``;
- ``root/lynx_full`` and ``root/lynx_lite``: the three (two) adapter files with the released
  names and keys, every adapter tensor random and non-zero (zero adapters would hide bugs).

The models load through the same ``LynxPipeline.from_pretrained`` path as real weights. Nothing is
downloaded. Writing is idempotent: a folder written with the same spec and seed is kept.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

MANIFEST = "tiny_models.json"
_FORMAT_VERSION = 1

# Enough word pieces that prompts used in tests and demos tokenize to words, plus single
# characters so that any ASCII text tokenizes at all.
_WORDS = (
    "a an the of in on at with and to is are image face person man woman child portrait smiling walking "
    "running standing sitting talking looking camera beach park city street forest room kitchen office "
    "sunset light night day rain snow red blue green black white bright tones overexposed blurred "
    "background static subtitles style works paintings images overall gray worst quality low jpeg "
    "compression residue ugly incomplete extra fingers poorly drawn hands faces deformed disfigured "
    "misshapen limbs fused still picture messy three legs many people walking backwards"
).split()
_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/"


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny models. Defaults: a 4-block, 32-wide DiT (a 4-step three-pass generation of
    9 frames at 64x64 takes well under a second on one CPU core)."""

    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 64
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    vae_base_dim: int = 8
    face_dim: int = 512
    resampler_dim: int = 64
    resampler_depth: int = 2
    resampler_heads: int = 1
    num_queries: int = 4
    full_identity_dim: int = 32
    lite_identity_dim: int = 24
    num_registers: int = 2
    flow_shift: float = 3.0

    @property
    def hidden_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class TinyModelPaths:
    base: Path
    full: Path | None
    lite: Path | None


def _tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -20.0)]
    vocab += [("\u2581" + word, -1.0 - 0.01 * i) for i, word in enumerate(dict.fromkeys(_WORDS))]
    vocab += [(char, -10.0) for char in _CHARACTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _make_tokenizer_config_portable(tokenizer_dir: Path) -> None:
    # transformers 5 writes fields that transformers 4 chokes on; real Wan folders have neither.
    path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("extra_special_tokens", None)
    config.pop("backend", None)
    config["model_max_length"] = 512
    path.write_text(json.dumps(config, indent=2))


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a random, non-zero value of a sensible scale."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.05 * noise)
            elif param.ndim == 1:  # norm gains
                param.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = param.shape[-1]
                param.copy_(noise / fan_in**0.5)


def _write_base(folder: Path, spec: TinyModelSpec) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=spec.text_dim,
            d_kv=spec.text_dim // spec.text_heads,
            d_ff=2 * spec.text_dim,
            num_layers=spec.text_layers,
            num_heads=spec.text_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=spec.num_heads,
        attention_head_dim=spec.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=spec.text_dim,
        freq_dim=256,
        ffn_dim=spec.ffn_dim,
        num_layers=spec.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=spec.flow_shift,
        num_train_timesteps=1000,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _make_tokenizer_config_portable(folder / "tokenizer")


def _write_adapter(folder: Path, variant: str, spec: TinyModelSpec, generator: torch.Generator) -> None:
    from .adapters import LynxAdapter, save_adapters
    from .resampler import LynxResampler

    identity_dim = spec.full_identity_dim if variant == "full" else spec.lite_identity_dim
    resampler = LynxResampler(
        embedding_dim=spec.face_dim,
        dim=spec.resampler_dim,
        depth=spec.resampler_depth,
        heads=spec.resampler_heads,
        dim_head=64,
        num_queries=spec.num_queries,
        output_dim=identity_dim,
        ff_mult=4,
    )
    adapter = LynxAdapter(
        variant,
        num_blocks=spec.num_layers,
        hidden_dim=spec.hidden_dim,
        identity_dim=identity_dim,
        num_registers=spec.num_registers if variant == "full" else 0,
    )
    for module in (resampler, adapter):
        _randomize(module, generator)
    save_adapters(folder, resampler, adapter)


def _is_complete(root: Path, manifest: dict, variants: list[str]) -> bool:
    from .adapters import AdapterSpec
    from .errors import WeightsError
    from .pipeline import check_base_folder

    path = root / MANIFEST
    if not path.is_file() or json.loads(path.read_text()) != manifest:
        return False
    try:
        check_base_folder(root / "base")
        spec = manifest["spec"]
        for variant in variants:
            AdapterSpec.from_folder(
                root / f"lynx_{variant}",
                num_blocks=spec["num_layers"],
                hidden_dim=spec["num_heads"] * spec["head_dim"],
                variant=variant,
            )
    except WeightsError:
        return False
    return True


def write_tiny_models(
    root: str | Path,
    variant: Literal["full", "lite", "both"] = "both",
    seed: int = 0,
    spec: TinyModelSpec | None = None,
) -> TinyModelPaths:
    """Write (or keep, if already there and valid) tiny models under ``root``; see the module doc."""
    root = Path(root)
    spec = spec or TinyModelSpec()
    variants = ["full", "lite"] if variant == "both" else [variant]
    manifest = {
        "format": _FORMAT_VERSION,
        "seed": seed,
        "variants": variants,
        "spec": dataclasses.asdict(spec),
    }
    paths = TinyModelPaths(
        base=root / "base",
        full=root / "lynx_full" if "full" in variants else None,
        lite=root / "lynx_lite" if "lite" in variants else None,
    )
    if _is_complete(root, manifest, variants):
        return paths

    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".writing-") as scratch:
        scratch = Path(scratch)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # module initialisers draw from the global generator
            _write_base(scratch / "base", spec)
        generator = torch.Generator().manual_seed(seed + 1)
        for name in variants:
            _write_adapter(scratch / f"lynx_{name}", name, spec, generator)
        # move finished folders into place; the manifest goes last so a crash leaves no "valid" root
        for name in ["base"] + [f"lynx_{v}" for v in variants]:
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            (scratch / name).rename(target)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return paths


def ensure_tiny_models(root: str | Path) -> TinyModelPaths:
    """The demo's entry point: both tiny variants under ``root`` with the default spec and seed."""
    return write_tiny_models(root, variant="both")


def tiny_face_embedding(seed: int = 0, dim: int = 512) -> np.ndarray:
    """A random unit-length face embedding (what an ArcFace recogniser returns), float32 ``[dim]``."""
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def tiny_reference_image(seed: int = 0, size: int = 256) -> np.ndarray:
    """A smooth random RGB image ``[size, size, 3]`` uint8, standing in for an aligned face crop."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(8, 8, 3))
    image = np.kron(coarse, np.ones((size // 8, size // 8, 1)))
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


# (original Wan / ComfyUI name, diffusers name) of the linear layers a Wan LoRA adapts in each block
_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_LORA_TARGETS = [
    *((f"self_attn.{o}", f"attn1.{c}") for o, c in _PROJECTIONS.items()),
    *((f"cross_attn.{o}", f"attn2.{c}") for o, c in _PROJECTIONS.items()),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
]


def write_tiny_lora(
    path: str | Path,
    spec: TinyModelSpec | None = None,
    *,
    layout: Literal["diffusers", "wan", "musubi"] = "diffusers",
    rank: int = 4,
    seed: int = 0,
    zero_up: bool = False,
) -> Path:
    """A random LoRA for the tiny transformer, in one of the formats diffusers reads for Wan.

    ``layout``: "diffusers" (``transformer.blocks.{i}.attn1.to_q.lora_A.weight``), "wan" (the
    original Wan / ComfyUI keys, ``diffusion_model.blocks.{i}.self_attn.q.lora_A.weight``) or
    "musubi" (kohya's musubi-tuner, ``lora_unet_blocks_{i}_self_attn_q.lora_down.weight`` with an
    alpha equal to the rank). The same ``seed`` gives the same matrices in every layout.
    ``zero_up``: all B ("up") matrices zero, a LoRA that changes nothing.
    """
    from safetensors.torch import save_file

    spec = spec or TinyModelSpec()
    generator = torch.Generator().manual_seed(seed)
    width, ffn = spec.hidden_dim, spec.ffn_dim
    sizes = {"ffn.0": (width, ffn), "ffn.2": (ffn, width)}
    tensors: dict[str, torch.Tensor] = {}
    for block in range(spec.num_layers):
        for original, converted in _LORA_TARGETS:
            fan_in, fan_out = sizes.get(original, (width, width))
            down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            up = torch.randn(fan_out, rank, generator=generator) * 0.2
            if zero_up:
                up = torch.zeros_like(up)
            if layout == "diffusers":
                stem, a, b = f"transformer.blocks.{block}.{converted}", "lora_A", "lora_B"
            elif layout == "wan":
                stem, a, b = f"diffusion_model.blocks.{block}.{original}", "lora_A", "lora_B"
            else:
                stem, a, b = f"lora_unet_blocks_{block}_{original.replace('.', '_')}", "lora_down", "lora_up"
                tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
            tensors[f"{stem}.{a}.weight"] = down
            tensors[f"{stem}.{b}.weight"] = up
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
