"""Turns the model settings into a loaded ``LynxPipeline`` and ``lynx_model`` errors into ``LynxError``s.

``lynx_model`` knows nothing about settings; this is the one place that reads LYNX_BASE_MODEL_PATH,
LYNX_ADAPTER_PATH, LYNX_LORAS and friends, checks them, and names the setting to fix when weights
are missing or do not fit.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from lynx.errors import ConfigurationError, InputError, LynxError, ModelWeightsError
from lynx.settings import LynxSettings, get_settings

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lynx.jobs import Variant
    from lynx_model import LynxPipeline

# which setting points at the files a lynx_model.WeightsError is about
_SETTING_FOR_ROLE = {
    "base": "LYNX_BASE_MODEL_PATH",
    "adapter": "LYNX_ADAPTER_PATH",
    "variant": "LYNX_MODEL_VARIANT",
    "lora": "LYNX_LORAS",
}


def as_lynx_error(err: Exception) -> Exception:
    """The ``LynxError`` to show for an error raised by ``lynx_model`` (other errors are returned as is)."""
    from lynx_model.errors import ModelInputError, WeightsError

    if isinstance(err, WeightsError):
        return ModelWeightsError(str(err), setting=_SETTING_FOR_ROLE.get(err.role or ""))
    if isinstance(err, ModelInputError):
        return InputError(str(err))
    return err


def resolve_device(value: str) -> torch.device:
    import torch

    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"LYNX_DEVICE={value} but no CUDA device is available", setting="LYNX_DEVICE"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"LYNX_DEVICE={value} but only {torch.cuda.device_count()} CUDA device(s) exist",
                setting="LYNX_DEVICE",
            )
    return device


def resolve_dtype(value: str, device: torch.device) -> torch.dtype:
    import torch

    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, value)


def resolve_attention_backend(value: str, device: torch.device, dtype: torch.dtype) -> str:
    """The diffusers attention backend for LYNX_ATTENTION_BACKEND: 'auto' is flash-attn where it can
    run (package importable, CUDA, half precision), else 'native' (PyTorch SDPA)."""
    import importlib.util

    import torch

    if value != "auto":
        return value
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash"
    return "native"


def settings_for_variant(settings: LynxSettings, variant: Variant | None) -> LynxSettings:
    """The settings with LYNX_MODEL_VARIANT replaced by a job's variant (None: the setting's own)."""
    return settings.model_copy(update={"model_variant": variant}) if variant else settings


def check_model_paths(settings: LynxSettings) -> None:
    """Raise ``ModelWeightsError`` naming the setting when a base, adapter or LoRA path is missing."""
    base = settings.resolved_base_model_path
    adapter = settings.resolved_adapter_path
    if not base.is_dir():
        raise ModelWeightsError(
            f"Wan2.1 base model folder not found: {base} (download Wan-AI/Wan2.1-T2V-14B-Diffusers there)",
            setting="LYNX_BASE_MODEL_PATH",
        )
    if not adapter.is_dir():
        raise ModelWeightsError(
            f"Lynx adapter folder not found: {adapter} (lynx_full or lynx_lite from ByteDance/lynx)",
            setting="LYNX_ADAPTER_PATH",
        )
    for path, _ in settings.resolved_loras:
        if not path.is_file():
            raise ModelWeightsError(f"LoRA file not found: {path}", setting="LYNX_LORAS")


def apply_speed_settings(pipe: LynxPipeline, settings: LynxSettings) -> None:
    """LoRAs (fused into the weights), FP8 weights, the step cache, batched guidance and compile,
    in the order they must be applied: each later one works on what the earlier ones left."""
    from lynx_model.lora import load_loras

    if settings.loras:
        load_loras(pipe, settings.resolved_loras)
        # baked into the weights: no LoRA layers to run at every step, nothing for compile or FP8 to trip on
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    if settings.fp8:
        pipe.enable_fp8()
    cache = settings.step_cache_options
    if cache is not None:
        pipe.enable_step_cache(cache[0], **cache[1])
    pipe.batched_guidance = {"auto": "auto", "on": True, "off": False}[settings.batched_guidance]
    if settings.compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)


@contextlib.contextmanager
def _quiet_loading():
    """No diffusers/transformers loading bars: workers and the CLI report in one line of their own."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()


def _current_cuda_device(device: torch.device):
    """'cuda:N' as the current CUDA device while loading (diffusers' device_map names only 'cuda')."""
    import torch

    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def load_lynx_pipeline(settings: LynxSettings | None = None) -> LynxPipeline:
    """Load the pipeline the settings describe, placed and configured for the device.

    Raises ``ModelWeightsError`` / ``ConfigurationError`` naming the LYNX_* setting to fix.
    """
    settings = settings or get_settings()
    check_model_paths(settings)
    base = settings.resolved_base_model_path
    adapter = settings.resolved_adapter_path
    device = resolve_device(settings.device)
    if settings.cpu_offload and device.type != "cuda":
        raise ConfigurationError(
            "LYNX_CPU_OFFLOAD needs a CUDA device (LYNX_DEVICE)", setting="LYNX_CPU_OFFLOAD"
        )
    dtype = resolve_dtype(settings.model_dtype, device)
    if settings.step_cache != "off" and settings.compile:
        raise ConfigurationError(
            "LYNX_STEP_CACHE cannot be combined with LYNX_COMPILE: the cache hooks decide per step in "
            "Python, which a full-graph compile refuses; choose one",
            setting="LYNX_STEP_CACHE",
        )
    if settings.fp8 and device.type != "cuda":
        raise ConfigurationError(
            f"LYNX_FP8 needs a CUDA device (float8 weights are a GPU feature); the model runs on {device}",
            setting="LYNX_FP8",
        )

    from lynx_model import LynxModelError, LynxPipeline

    # On an accelerator each component is loaded straight onto it from the memory-mapped shards
    # (diffusers' device_map): the 14B DiT never needs a full copy in host RAM.
    placement = {"device_map": "cuda"} if device.type == "cuda" and not settings.cpu_offload else {}
    try:
        with _current_cuda_device(device), _quiet_loading():
            pipe = LynxPipeline.from_pretrained(base, torch_dtype=dtype, **placement)
            pipe.load_lynx_adapter(adapter, variant=settings.model_variant)
    except LynxModelError as err:
        raise as_lynx_error(err) from err

    try:
        apply_speed_settings(pipe, settings)
    except LynxModelError as err:
        raise as_lynx_error(err) from err

    if settings.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    backend = resolve_attention_backend(settings.attention_backend, device, dtype)
    if backend != "native":
        try:
            pipe.transformer.set_attention_backend(backend)
        except (ValueError, RuntimeError, ImportError) as err:
            chosen = " (chosen by auto)" if settings.attention_backend == "auto" else ""
            raise ConfigurationError(
                f"attention backend {backend!r}{chosen} unusable here: {str(err).splitlines()[0]}",
                setting="LYNX_ATTENTION_BACKEND",
            ) from err
    return pipe


__all__ = [
    "LynxError",
    "apply_speed_settings",
    "as_lynx_error",
    "load_lynx_pipeline",
    "resolve_attention_backend",
    "resolve_device",
    "resolve_dtype",
    "settings_for_variant",
]
