"""Loading: the released layout loads unchanged, broken weights fail with a clear message."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from safetensors.torch import load_file, save_file

from lynx_model import (
    AdapterSpec,
    LynxIdentityAttnProcessor,
    LynxReferenceAttnProcessor,
    LynxResampler,
    WeightsError,
    load_adapters,
)
from lynx_model.testing import TinyModelSpec, write_tiny_models

from .conftest import generate, load

# LYNX_SPEC section 6: keys of the released files
RESAMPLER_KEY = re.compile(
    r"latents|proj_(in|out)\.(weight|bias)|norm_out\.(weight|bias)"
    r"|layers\.\d+\.0\.(norm1|norm2)\.(weight|bias)|layers\.\d+\.0\.(to_q|to_kv|to_out)\.weight"
    r"|layers\.\d+\.1\.0\.(weight|bias)|layers\.\d+\.1\.[13]\.weight"
)
IP_KEY = re.compile(r"\d+\.(to_k_ip|to_v_ip)\.(weight|bias)|\d+\.registers")
REF_KEY = re.compile(r"\d+\.(to_k_ref|to_v_ref)\.(weight|bias)")


def test_tiny_adapters_use_the_released_file_names_and_keys(tiny_models):
    full, lite = tiny_models.full, tiny_models.lite
    assert sorted(p.name for p in full.iterdir()) == [
        "ip_layers.safetensors",
        "ref_layers.safetensors",
        "resampler.safetensors",
    ]
    assert sorted(p.name for p in lite.iterdir()) == ["ip_layers.safetensors", "resampler.safetensors"]
    for folder in (full, lite):
        assert all(RESAMPLER_KEY.fullmatch(k) for k in load_file(str(folder / "resampler.safetensors")))
        assert all(IP_KEY.fullmatch(k) for k in load_file(str(folder / "ip_layers.safetensors")))
    assert all(REF_KEY.fullmatch(k) for k in load_file(str(full / "ref_layers.safetensors")))
    # full: every block, biases, registers; lite: every second block, no bias
    spec = TinyModelSpec()
    full_ip = load_file(str(full / "ip_layers.safetensors"))
    lite_ip = load_file(str(lite / "ip_layers.safetensors"))
    assert {k.split(".")[0] for k in full_ip} == {str(i) for i in range(spec.num_layers)}
    assert "0.to_k_ip.bias" in full_ip and "0.registers" in full_ip
    assert {k.split(".")[0] for k in lite_ip} == {str(i) for i in range(spec.num_layers // 2)}
    assert not any(k.endswith("bias") for k in lite_ip)


def test_tiny_adapter_weights_are_all_non_zero(tiny_models):
    for folder in (tiny_models.full, tiny_models.lite):
        for path in folder.iterdir():
            for key, tensor in load_file(str(path)).items():
                assert (tensor != 0).all(), f"{path.name}:{key} has zeros"


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_released_layout_loads_with_no_missing_or_unexpected_keys(variant, full_pipe, lite_pipe, tiny_models):
    pipe = full_pipe if variant == "full" else lite_pipe
    folder = tiny_models.full if variant == "full" else tiny_models.lite
    assert pipe.variant == variant
    pairs = [
        (pipe.resampler, "resampler.safetensors"),
        (pipe.lynx_adapter.identity, "ip_layers.safetensors"),
    ]
    if variant == "full":
        pairs.append((pipe.lynx_adapter.reference, "ref_layers.safetensors"))
    for module, name in pairs:
        on_disk = load_file(str(folder / name))
        loaded = module.state_dict()
        assert set(loaded) == set(on_disk)
        for key, tensor in on_disk.items():
            assert torch.equal(loaded[key], tensor), key
        assert not any(p.is_meta for p in module.parameters())

    # processors sit where the variant says: full on every block, lite on blocks 0, 2, ...
    blocks = pipe.transformer.blocks
    for index, block in enumerate(blocks):
        has_identity = isinstance(block.attn2.processor, LynxIdentityAttnProcessor)
        assert has_identity == (variant == "full" or index % 2 == 0)
        if not has_identity:
            assert isinstance(block.attn2.processor, WanAttnProcessor)
        assert isinstance(block.attn1.processor, LynxReferenceAttnProcessor) == (variant == "full")


def test_variant_and_sizes_are_inferred_from_the_files(tiny_models):
    spec = TinyModelSpec()
    full = AdapterSpec.from_folder(tiny_models.full, num_blocks=spec.num_layers, hidden_dim=spec.hidden_dim)
    lite = AdapterSpec.from_folder(tiny_models.lite, num_blocks=spec.num_layers, hidden_dim=spec.hidden_dim)
    assert full.variant == "full" and lite.variant == "lite"
    assert full.resampler_config == {
        "embedding_dim": 512,
        "dim": spec.resampler_dim,
        "depth": spec.resampler_depth,
        "heads": spec.resampler_heads,
        "dim_head": 64,
        "num_queries": spec.num_queries,
        "output_dim": spec.full_identity_dim,
        "ff_mult": 4,
    }
    assert full.identity_config["num_registers"] == spec.num_registers
    assert full.identity_config["block_stride"] == 1 and lite.identity_config["block_stride"] == 2
    assert lite.identity_config["own_key_norm"] and not lite.identity_config["bias"]
    assert lite.reference_config is None


def test_resampler_heads_are_inferred_as_inner_width_over_64(tmp_path):
    # the released resampler has 20 heads of 64; the files record only the inner width (1280)
    spec = TinyModelSpec(num_layers=2, resampler_dim=128, resampler_heads=2)
    paths = write_tiny_models(tmp_path, variant="lite", spec=spec)
    adapter = AdapterSpec.from_folder(paths.lite, num_blocks=2, hidden_dim=spec.hidden_dim)
    assert (adapter.resampler_config["heads"], adapter.resampler_config["dim_head"]) == (2, 64)

    resampler, _ = load_adapters(adapter)
    stated = LynxResampler(**{**adapter.resampler_config, "heads": 2, "dim_head": 64})
    stated.load_state_dict(load_file(str(paths.lite / "resampler.safetensors")))
    one_head = LynxResampler(**{**adapter.resampler_config, "heads": 1, "dim_head": 128})
    one_head.load_state_dict(load_file(str(paths.lite / "resampler.safetensors")))
    embeds = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(resampler(embeds), stated(embeds))
        # same weights split into other heads compute something else, so the count matters
        assert (one_head(embeds) - stated(embeds)).abs().max() > 1e-3


def test_asking_for_the_other_variant_is_an_error(tiny_models):
    with pytest.raises(WeightsError, match="holds a lite adapter.*full variant") as info:
        load(tiny_models.base, tiny_models.lite, variant="full")
    assert info.value.role == "variant"


def _copy(folder, tmp_path, name="adapter"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rename_key(path):
    tensors = load_file(str(path))
    tensors["0.to_k_ip_typo.weight"] = tensors.pop("0.to_k_ip.weight")
    save_file(tensors, str(path))


def _drop_layer(path):
    tensors = load_file(str(path))
    last = max(int(k.split(".")[0]) for k in tensors)
    save_file({k: t for k, t in tensors.items() if not k.startswith(f"{last}.")}, str(path))


def _wrong_width(path):
    tensors = load_file(str(path))
    save_file(
        {k: t[:, :-1].contiguous() if k.endswith("to_kv.weight") else t for k, t in tensors.items()},
        str(path),
    )


ADAPTER_DAMAGE = {
    "missing file": (
        lambda d: (d / "ip_layers.safetensors").unlink(),
        r"not found: .*ip_layers\.safetensors",
    ),
    "missing reference file": (
        lambda d: (d / "ref_layers.safetensors").unlink(),
        r"^missing .*/ref_layers\.safetensors: ip_layers\.safetensors holds a full adapter",
    ),
    "truncated": (lambda d: _truncate(d / "ref_layers.safetensors"), r"ref_layers\.safetensors is truncated"),
    "not safetensors": (
        lambda d: (d / "resampler.safetensors").write_bytes(b"\x10\x00" * 64),
        r"resampler\.safetensors is (truncated|corrupt)",
    ),
    "renamed key": (
        lambda d: _rename_key(d / "ip_layers.safetensors"),
        r"ip_layers\.safetensors lacks the tensor",
    ),
    "missing layer": (
        lambda d: _drop_layer(d / "ref_layers.safetensors"),
        r"ref_layers\.safetensors does not match.*missing \d+ keys, e\.g\. 3\.to_k_ref",
    ),
    "wrong shape": (
        lambda d: _wrong_width(d / "resampler.safetensors"),
        r"resampler\.safetensors has the wrong shape for layers\.0\.0\.to_kv\.weight",
    ),
}


@pytest.mark.parametrize("damage", sorted(ADAPTER_DAMAGE))
def test_broken_adapter_folder_gives_a_clear_error_naming_the_file(damage, tiny_models, tmp_path):
    folder = _copy(tiny_models.full, tmp_path)
    spoil, message = ADAPTER_DAMAGE[damage]
    spoil(folder)
    with pytest.raises(WeightsError, match=message) as info:
        load(tiny_models.base, folder)
    assert info.value.role == "adapter"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variant", ["auto", "full"])
def test_full_adapter_without_its_reference_file_names_that_file(variant, tiny_models, tmp_path):
    folder = _copy(tiny_models.full, tmp_path)
    (folder / "ref_layers.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing .*ref_layers") as info:
        load(tiny_models.base, folder, variant=variant)
    assert info.value.role == "adapter" and info.value.path == folder / "ref_layers.safetensors"
    # asking for lite does not make a full adapter lite
    with pytest.raises(WeightsError, match="holds a full adapter.*lite variant") as info:
        load(tiny_models.base, folder, variant="lite")
    assert info.value.role == "variant"


def test_reference_file_next_to_lite_identity_layers_is_refused(tiny_models, tmp_path):
    folder = _copy(tiny_models.lite, tmp_path)
    shutil.copy(tiny_models.full / "ref_layers.safetensors", folder)
    with pytest.raises(WeightsError, match=r"ref_layers\.safetensors does not belong here.*lite") as info:
        load(tiny_models.base, folder)
    assert info.value.role == "adapter"


def test_adapter_for_another_base_model_is_rejected(tiny_models, tmp_path):
    other = write_tiny_models(tmp_path / "wide", variant="full", spec=TinyModelSpec(num_heads=4))
    with pytest.raises(WeightsError, match="projects to 64 channels but the DiT is 32 wide"):
        load(tiny_models.base, other.full)


def test_missing_adapter_folder(tiny_models, tmp_path):
    with pytest.raises(WeightsError, match="adapter folder not found"):
        load(tiny_models.base, tmp_path / "nowhere")


BASE_DAMAGE = {
    "missing folder": (lambda d: shutil.rmtree(d), r"base model folder not found"),
    "missing component": (
        lambda d: shutil.rmtree(d / "vae"),
        r"not a Wan2\.1 diffusers folder: missing vae/",
    ),
    "truncated weights": (
        lambda d: _truncate(d / "transformer" / "diffusion_pytorch_model.safetensors"),
        r"transformer/diffusion_pytorch_model\.safetensors is truncated",
    ),
    "missing weights": (
        lambda d: (d / "text_encoder" / "model.safetensors").unlink(),
        r"no \*\.safetensors weights in .*text_encoder",
    ),
    "bad config": (
        lambda d: (d / "transformer" / "config.json").write_text("{"),
        r"could not read .*transformer/config\.json: .*not a valid JSON file",
    ),
    # diffusers and transformers only warn about these and leave parameters random or on meta
    "another component's weights": (
        lambda d: shutil.copy(
            d / "vae" / "diffusion_pytorch_model.safetensors",
            d / "transformer" / "diffusion_pytorch_model.safetensors",
        ),
        r"transformer/diffusion_pytorch_model\.safetensors is not a matching transformer checkpoint: "
        r"missing \d+ of \d+ transformer weights.*unknown ones",
    ),
    "renamed key": (
        lambda d: _edit_tensors(
            d / "transformer" / "diffusion_pytorch_model.safetensors",
            lambda t: t.update({"blocks.3.attn1.to_q.wieght": t.pop("blocks.3.attn1.to_q.weight")}),
        ),
        r"missing 1 of \d+ transformer weights, e\.g\. blocks\.3\.attn1\.to_q\.weight",
    ),
    "text encoder of another size": (
        lambda d: _edit_tensors(
            d / "text_encoder" / "model.safetensors",
            lambda t: t.update({"shared.weight": t["shared.weight"][:-1].contiguous()}),
        ),
        r"text_encoder/model\.safetensors has the wrong shape for shared\.weight",
    ),
}


def _edit_tensors(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("damage", sorted(BASE_DAMAGE))
def test_broken_base_folder_gives_a_clear_error_naming_the_file(damage, tiny_models, tmp_path):
    base = _copy(tiny_models.base, tmp_path, "base")
    spoil, message = BASE_DAMAGE[damage]
    spoil(base)
    with pytest.raises(WeightsError, match=message) as info:
        load(base, tiny_models.full)
    assert info.value.role == "base"


def test_missing_shard_of_an_index_is_named(tiny_models, tmp_path):
    base = _copy(tiny_models.base, tmp_path, "base")
    index = base / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    with pytest.raises(WeightsError, match=r"missing weights shard .*00002-of-00002"):
        load(base, tiny_models.full)


def test_bfloat16_keeps_precision_sensitive_parts_in_float32(tiny_models, face):
    pipe = load(tiny_models.base, tiny_models.full, dtype=torch.bfloat16)
    transformer = pipe.transformer
    assert transformer.dtype == torch.bfloat16
    assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert transformer.blocks[0].attn2.processor.to_k_ip.weight.dtype == torch.bfloat16
    assert transformer.blocks[0].attn1.processor.to_k_ref.weight.dtype == torch.bfloat16
    for name in (
        "condition_embedder.time_embedder.linear_1.weight",
        "scale_shift_table",
        "blocks.0.scale_shift_table",
        "blocks.0.norm2.weight",
    ):
        assert transformer.get_parameter(name).dtype == torch.float32, name
    assert pipe.vae.dtype == torch.float32
    assert pipe.resampler.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.bfloat16
    latents = generate(pipe, face, num_inference_steps=1)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


def test_tiny_models_are_written_once(tmp_path):
    first = write_tiny_models(tmp_path, variant="lite")
    marker = first.lite / "ip_layers.safetensors"
    stamp = marker.stat().st_mtime_ns
    second = write_tiny_models(tmp_path, variant="lite")
    assert second == first and marker.stat().st_mtime_ns == stamp
    # a damaged folder is rewritten
    _truncate(marker)
    write_tiny_models(tmp_path, variant="lite")
    assert AdapterSpec.from_folder(first.lite, num_blocks=4, hidden_dim=32).variant == "lite"
