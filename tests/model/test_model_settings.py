"""``lynx.model_loading``: settings -> pipeline, lynx_model errors -> LynxError naming the setting."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from lynx.errors import ConfigurationError, InputError, ModelWeightsError
from lynx.model_loading import as_lynx_error, load_lynx_pipeline, resolve_attention_backend, resolve_dtype
from lynx.settings import LynxSettings
from lynx_model import ModelInputError, WeightsError


def settings(tmp_path, **values) -> LynxSettings:
    return LynxSettings(home=tmp_path / "home", device="cpu", _env_file=None, **values)


def test_loads_the_configured_pipeline(tiny_models, tmp_path):
    pipe = load_lynx_pipeline(
        settings(tmp_path, base_model_path=tiny_models.base, adapter_path=tiny_models.lite, vae_tiling=True)
    )
    assert pipe.variant == "lite"
    assert pipe.transformer.dtype == torch.float32  # auto on CPU
    assert pipe.vae.use_tiling and pipe.vae.use_slicing


def test_default_paths_live_in_the_models_dir(tiny_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models.base, models / "Wan2.1-T2V-14B-Diffusers")
    shutil.copytree(tiny_models.lite, models / "lynx_lite")
    config = settings(tmp_path, models_dir=models, model_variant="lite")
    assert config.resolved_adapter_path == models / "lynx_lite"
    assert load_lynx_pipeline(config).variant == "lite"


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"base_model_path": "/nonexistent/wan"}, "LYNX_BASE_MODEL_PATH"),
        ({"adapter_path": "/nonexistent/lynx_full"}, "LYNX_ADAPTER_PATH"),
        ({"model_variant": "full", "adapter": "lite"}, "LYNX_MODEL_VARIANT"),
        ({"adapter": "base"}, "LYNX_ADAPTER_PATH"),
    ],
)
def test_weight_problems_name_the_setting(values, setting, tiny_models, tmp_path):
    values = dict(values)
    adapter = {"lite": tiny_models.lite, "base": tiny_models.base}.get(
        values.pop("adapter", None), tiny_models.full
    )
    values = {"base_model_path": tiny_models.base, "adapter_path": adapter} | values
    with pytest.raises(ModelWeightsError) as info:
        load_lynx_pipeline(settings(tmp_path, **values))
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_device_and_backend_problems_name_the_setting(tiny_models, tmp_path):
    paths = {"base_model_path": tiny_models.base, "adapter_path": tiny_models.full}
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="no CUDA device") as info:
            load_lynx_pipeline(settings(tmp_path, **paths).model_copy(update={"device": "cuda"}))
        assert info.value.setting == "LYNX_DEVICE"
        with pytest.raises(ConfigurationError) as info:
            load_lynx_pipeline(settings(tmp_path, cpu_offload=True, **paths))
        assert info.value.setting == "LYNX_CPU_OFFLOAD"
    with pytest.raises(ConfigurationError) as info:
        load_lynx_pipeline(settings(tmp_path, attention_backend="no-such-backend", **paths))
    assert info.value.setting == "LYNX_ATTENTION_BACKEND"


def test_error_mapping_and_dtypes():
    mapped = as_lynx_error(WeightsError("x is truncated", role="adapter"))
    assert isinstance(mapped, ModelWeightsError) and mapped.setting == "LYNX_ADAPTER_PATH"
    assert isinstance(as_lynx_error(ModelInputError("bad face")), InputError)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_auto_attention_backend_is_flash_only_where_flash_attn_can_run(tiny_models, tmp_path):
    import importlib.util

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert LynxSettings(_env_file=None).attention_backend == "auto"
    assert resolve_attention_backend("auto", cpu, torch.float32) == "native"
    assert resolve_attention_backend("auto", cpu, torch.bfloat16) == "native"
    assert resolve_attention_backend("auto", cuda, torch.float32) == "native"  # flash-attn is half only
    has_flash = importlib.util.find_spec("flash_attn") is not None
    assert resolve_attention_backend("auto", cuda, torch.bfloat16) == ("flash" if has_flash else "native")
    # a named backend is taken as is
    assert resolve_attention_backend("flash", cpu, torch.float32) == "flash"
    assert resolve_attention_backend("_native_math", cuda, torch.bfloat16) == "_native_math"
    # the default loads on the CPU with PyTorch SDPA in every processor
    pipe = load_lynx_pipeline(
        settings(tmp_path, base_model_path=tiny_models.base, adapter_path=tiny_models.full)
    )
    blocks = pipe.transformer.blocks
    assert {b.attn1.processor._attention_backend for b in blocks} | {
        b.attn2.processor._attention_backend for b in blocks
    } == {None}


def test_loras_from_the_settings_are_fused_and_recorded(tiny_models, tmp_path, face, ref_image):
    from lynx_model.lora import load_loras
    from lynx_model.testing import write_tiny_lora

    from .conftest import generate, load

    lora = write_tiny_lora(tmp_path / "models" / "loras" / "style.safetensors", seed=6)
    paths = {"base_model_path": tiny_models.base, "adapter_path": tiny_models.full}
    # a relative path is looked up in LYNX_MODELS_DIR/loras
    config = settings(
        tmp_path, models_dir=tmp_path / "models", loras=[{"path": "style.safetensors", "scale": 0.5}], **paths
    )
    pipe = load_lynx_pipeline(config)
    assert [record.as_record() for record in pipe.loras] == [
        {"file": "style.safetensors", "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(), "scale": 0.5}
    ]
    assert pipe.get_list_adapters() == {}  # fused into the weights: no LoRA layers left to run
    fused = generate(pipe, face, ref_image)
    unfused = load(tiny_models.base, tiny_models.full)
    load_loras(unfused, [(lora, 0.5)])
    torch.testing.assert_close(fused, generate(unfused, face, ref_image), rtol=0, atol=1e-5)
    assert (fused - generate(load(tiny_models.base, tiny_models.full), face, ref_image)).abs().max() > 1e-3


def test_lora_problems_name_the_file_and_the_setting(tiny_models, tmp_path):
    from lynx_model.testing import TinyModelSpec, write_tiny_lora

    paths = {"base_model_path": tiny_models.base, "adapter_path": tiny_models.full}
    with pytest.raises(ModelWeightsError, match=r"LoRA file not found: .*/nowhere\.safetensors") as info:
        load_lynx_pipeline(settings(tmp_path, loras=["/nowhere.safetensors"], **paths))
    assert info.value.setting == "LYNX_LORAS"
    wide = write_tiny_lora(tmp_path / "wide.safetensors", TinyModelSpec(num_heads=4))
    with pytest.raises(ModelWeightsError, match=r"wide\.safetensors does not fit") as info:
        load_lynx_pipeline(settings(tmp_path, loras=[str(wide)], **paths))
    assert info.value.setting == "LYNX_LORAS" and "\n" not in str(info.value)


def test_speed_settings_reach_the_pipeline_and_impossible_ones_name_the_setting(tiny_models, tmp_path):
    paths = {"base_model_path": tiny_models.base, "adapter_path": tiny_models.full}
    pipe = load_lynx_pipeline(settings(tmp_path, batched_guidance="on", step_cache="taylorseer:3", **paths))
    assert pipe.batched_guidance is True
    assert pipe.step_cache.kind == "taylorseer" and pipe.step_cache.config.cache_interval == 3
    assert pipe.transformer.is_cache_enabled
    assert load_lynx_pipeline(settings(tmp_path, **paths)).batched_guidance == "auto"
    with pytest.raises(ConfigurationError, match="cannot be combined with LYNX_COMPILE") as info:
        load_lynx_pipeline(settings(tmp_path, step_cache="first-block", compile=True, **paths))
    assert info.value.setting == "LYNX_STEP_CACHE"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="LYNX_FP8 needs a CUDA device") as info:
            load_lynx_pipeline(settings(tmp_path, fp8=True, **paths))
        assert info.value.setting == "LYNX_FP8"


@pytest.mark.parametrize(
    "value", ["fbc", "first-block:-1", "taylorseer:0", "taylorseer:2.5", "first-block:x"]
)
def test_bad_step_cache_values_are_refused_by_the_settings(value, monkeypatch):
    from lynx.settings import get_settings

    monkeypatch.setenv("LYNX_STEP_CACHE", value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="LYNX_STEP_CACHE") as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert "\n" not in str(info.value)
