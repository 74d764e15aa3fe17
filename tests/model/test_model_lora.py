"""Wan LoRAs through diffusers' WanLoraLoaderMixin, with the Lynx processors installed."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lynx_model import WeightsError
from lynx_model.lora import load_loras
from lynx_model.testing import TinyModelSpec, write_tiny_lora

from .conftest import generate, load


@pytest.fixture(scope="module")
def lora_pipe(tiny_models):
    """A full pipeline of its own: LoRAs change the transformer they are loaded into."""
    return load(tiny_models.base, tiny_models.full)


@pytest.fixture
def baseline(lora_pipe, face, ref_image):
    lora_pipe.unload_lora_weights()
    return generate(lora_pipe, face, ref_image)


def test_a_lora_with_zero_up_matrices_changes_nothing_and_a_real_one_does(
    lora_pipe, baseline, face, ref_image, tmp_path
):
    zero = write_tiny_lora(tmp_path / "zero.safetensors", zero_up=True)
    load_loras(lora_pipe, [(zero, 1.0)])
    assert torch.equal(generate(lora_pipe, face, ref_image), baseline)
    lora_pipe.unload_lora_weights()

    real = write_tiny_lora(tmp_path / "real.safetensors", seed=1)
    loaded = load_loras(lora_pipe, [(real, 1.0)])
    changed = generate(lora_pipe, face, ref_image)
    assert (changed - baseline).abs().max() > 1e-3
    assert loaded[0].sha256 == hashlib.sha256(real.read_bytes()).hexdigest() and loaded[0].scale == 1.0
    # the Lynx branches are still there: switching them off changes the video
    assert (generate(lora_pipe, face, ref_image, ip_scale=0.0, ref_scale=0.0) - changed).abs().max() > 1e-3
    # diffusers' own controls: a scale of 0 is the base model again, fusing keeps the video
    lora_pipe.set_adapters([loaded[0].adapter_name], [0.0])
    torch.testing.assert_close(generate(lora_pipe, face, ref_image), baseline, rtol=0, atol=1e-6)
    lora_pipe.set_adapters([loaded[0].adapter_name], [1.0])
    lora_pipe.fuse_lora()
    torch.testing.assert_close(generate(lora_pipe, face, ref_image), changed, rtol=0, atol=1e-5)
    lora_pipe.unfuse_lora()  # W + dW - dW: back to the base weights up to float rounding
    lora_pipe.unload_lora_weights()
    torch.testing.assert_close(generate(lora_pipe, face, ref_image), baseline, rtol=0, atol=1e-5)


def test_the_wan_formats_diffusers_converts_load_to_the_same_video(
    lora_pipe, baseline, face, ref_image, tmp_path
):
    videos = {}
    for layout in ("diffusers", "wan", "musubi"):
        path = write_tiny_lora(tmp_path / f"{layout}.safetensors", layout=layout, seed=2)
        load_loras(lora_pipe, [(path, 0.7)])
        videos[layout] = generate(lora_pipe, face, ref_image)
        lora_pipe.unload_lora_weights()
    assert (videos["diffusers"] - baseline).abs().max() > 1e-3
    torch.testing.assert_close(videos["wan"], videos["diffusers"], rtol=0, atol=1e-6)
    torch.testing.assert_close(videos["musubi"], videos["diffusers"], rtol=0, atol=1e-6)


def test_two_loras_stack_with_their_scales(lora_pipe, baseline, face, ref_image, tmp_path):
    first = write_tiny_lora(tmp_path / "first.safetensors", seed=3)
    second = write_tiny_lora(tmp_path / "second.safetensors", seed=4)
    loaded = load_loras(lora_pipe, [(first, 0.5), (second, 0.8)])
    assert [lora.scale for lora in loaded] == [0.5, 0.8]
    assert lora_pipe.get_active_adapters() == [lora.adapter_name for lora in loaded]
    both = generate(lora_pipe, face, ref_image)
    lora_pipe.set_adapters([loaded[0].adapter_name], [0.5])
    assert (generate(lora_pipe, face, ref_image) - both).abs().max() > 1e-4
    lora_pipe.unload_lora_weights()


def test_missing_or_mismatched_lora_files_are_one_line_errors_naming_them(lora_pipe, baseline, tmp_path):
    with pytest.raises(WeightsError, match=r"LoRA file not found: .*nowhere\.safetensors") as info:
        load_loras(lora_pipe, [(tmp_path / "nowhere.safetensors", 1.0)])
    assert info.value.role == "lora" and "\n" not in str(info.value)
    wide = write_tiny_lora(tmp_path / "wide.safetensors", TinyModelSpec(num_heads=4))
    with pytest.raises(WeightsError, match=r"wide\.safetensors does not fit this Wan transformer") as info:
        load_loras(lora_pipe, [(wide, 1.0)])
    assert "\n" not in str(info.value)
    deep = write_tiny_lora(tmp_path / "deep.safetensors", TinyModelSpec(num_layers=6))
    with pytest.raises(WeightsError, match=r"deep\.safetensors is not a LoRA for this Wan transformer"):
        load_loras(lora_pipe, [(deep, 1.0)])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"garbage\.safetensors is not a readable Wan LoRA"):
        load_loras(lora_pipe, [(garbage, 1.0)])
    # nothing of a refused list is loaded, not even its good files
    good = write_tiny_lora(tmp_path / "good.safetensors")
    with pytest.raises(WeightsError):
        load_loras(lora_pipe, [(good, 1.0), (wide, 1.0)])
    assert lora_pipe.get_active_adapters() == []
