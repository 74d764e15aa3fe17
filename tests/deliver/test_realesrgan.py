"""Real-ESRGAN: official weight files load strictly; tiling changes nothing; sizes come out exact.

The state dicts are written here from the published layout of the official files (names and
shapes), not from our modules, so a renamed layer in our code fails these tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lynx.errors import ModelWeightsError
from lynx.media.realesrgan import (
    RealEsrganUpscaler,
    RRDBNet,
    SRVGGNetCompact,
    cached_upscaler,
    load_realesrgan,
    tiled_forward,
)
from lynx.media.spec import DeliverySpec

from .conftest import synthetic_frames


def official_rrdbnet_state(*, feat: int, blocks: int, grow: int, in_ch: int = 3, out_ch: int = 3) -> dict:
    """Random tensors named and shaped like RealESRGAN_x4plus.pth (x2plus: in_ch 12; x1: 48)."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int) -> None:
        state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.01

    conv("conv_first", in_ch, feat)
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{k}", feat + (k - 1) * grow, grow if k < 5 else feat)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, feat, feat)
    conv("conv_last", feat, out_ch)
    return state


def official_srvgg_state(*, feat: int, convs: int, upscale: int = 4) -> dict:
    """Random tensors named like realesr-general-x4v3.pth: body.{even} convs, body.{odd} PReLU slopes."""
    g = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {}
    channels = [3] + [feat] * (convs + 1) + [3 * upscale * upscale]
    for i in range(convs + 2):
        state[f"body.{2 * i}.weight"] = torch.randn(channels[i + 1], channels[i], 3, 3, generator=g) * 0.05
        state[f"body.{2 * i}.bias"] = torch.randn(channels[i + 1], generator=g) * 0.01
        if i < convs + 1:
            state[f"body.{2 * i + 1}.weight"] = torch.full((feat,), 0.25)
    return state


@pytest.mark.parametrize(("in_ch", "scale"), [(3, 4), (12, 2), (48, 1)], ids=["x4plus", "x2plus", "x1"])
def test_rrdbnet_loads_official_params_ema_file_strictly(tmp_path: Path, in_ch: int, scale: int) -> None:
    state = official_rrdbnet_state(feat=8, blocks=2, grow=4, in_ch=in_ch)
    path = tmp_path / "RealESRGAN.pth"
    torch.save({"params_ema": state}, path)

    model = load_realesrgan(path)

    assert isinstance(model, RRDBNet) and model.scale == scale
    assert len(model.body) == 2
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    out = model(torch.rand(1, 3, 16, 20))
    assert out.shape == (1, 3, 16 * scale, 20 * scale)


def test_srvgg_loads_official_params_file_and_safetensors(tmp_path: Path) -> None:
    state = official_srvgg_state(feat=8, convs=4)
    torch.save({"params": state}, tmp_path / "realesr-general-x4v3.pth")
    save_file(state, tmp_path / "realesr-general-x4v3.safetensors")
    for name in ("realesr-general-x4v3.pth", "realesr-general-x4v3.safetensors"):
        model = load_realesrgan(tmp_path / name)
        assert isinstance(model, SRVGGNetCompact) and model.scale == 4
        assert model.state_dict().keys() == state.keys()
        assert model(torch.rand(1, 3, 10, 12)).shape == (1, 3, 40, 48)


def test_full_size_architectures_match_the_published_parameter_counts() -> None:
    assert sum(p.numel() for p in RRDBNet().parameters()) == 16_697_987  # RealESRGAN_x4plus
    assert sum(p.numel() for p in SRVGGNetCompact(num_conv=32).parameters()) == 1_213_296  # general-x4v3


def test_bad_weight_files_are_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ModelWeightsError, match="not a readable weight file") as caught:
        load_realesrgan(garbage)
    assert caught.value.setting == "LYNX_DELIVER_REALESRGAN_WEIGHTS"

    missing_layer = official_rrdbnet_state(feat=8, blocks=1, grow=4)
    del missing_layer["conv_hr.weight"]
    torch.save({"params_ema": missing_layer}, tmp_path / "truncated.pth")
    with pytest.raises(ModelWeightsError, match="conv_hr.weight"):
        load_realesrgan(tmp_path / "truncated.pth")

    torch.save({"params": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ModelWeightsError, match="neither an RRDBNet nor an SRVGGNetCompact"):
        load_realesrgan(tmp_path / "other.pth")

    with pytest.raises(ModelWeightsError, match="do not exist"):
        load_realesrgan(tmp_path / "absent.pth")


@pytest.mark.parametrize(
    ("scale", "tile", "overlap", "size"),
    [(4, 48, 20, (70, 100)), (2, 96, 40, (130, 200)), (1, 192, 80, (260, 400))],
)
def test_tiled_equals_untiled_rrdbnet(scale: int, tile: int, overlap: int, size: tuple[int, int]) -> None:
    # One RRDB block sees ~19 trunk pixels around each output; the overlap covers 20 trunk pixels,
    # which are 4 // scale input pixels each after the pixel-unshuffle.
    torch.manual_seed(0)
    model = RRDBNet(num_feat=8, num_block=1, num_grow_ch=4, scale=scale).eval()
    image = torch.rand(1, 3, size[0] + 2, size[1] + 1)  # not a multiple of the tile, nor of the unshuffle
    whole = tiled_forward(model, image, tile=0, overlap=0)
    tiled = tiled_forward(model, image, tile=tile, overlap=overlap)
    assert whole.shape == tiled.shape == (1, 3, (size[0] + 2) * scale, (size[1] + 1) * scale)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_tiled_equals_untiled_srvgg() -> None:
    torch.manual_seed(0)
    model = SRVGGNetCompact(num_feat=8, num_conv=6).eval()
    image = torch.rand(1, 3, 45, 67)
    torch.testing.assert_close(
        tiled_forward(model, image, tile=32, overlap=8),
        tiled_forward(model, image, tile=0, overlap=0),
        atol=1e-5,
        rtol=0,
    )


def test_upscaler_output_is_exactly_the_target_size(tmp_path: Path) -> None:
    torch.save({"params": official_srvgg_state(feat=8, convs=2)}, tmp_path / "x4.pth")
    upscaler = RealEsrganUpscaler.from_file(tmp_path / "x4.pth", tile=32, overlap=8)
    assert upscaler.device.type == "cpu" and upscaler.dtype == torch.float32
    out = list(upscaler.upscale_frames(synthetic_frames(3, 48, 80), (126, 76)))
    assert [f.shape for f in out] == [(76, 126, 3)] * 3
    assert all(f.dtype == np.uint8 for f in out)


def test_the_upscaler_is_loaded_once_per_process_and_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "x4.pth"
    torch.save({"params": official_srvgg_state(feat=8, convs=2)}, weights)
    spec = DeliverySpec(
        upscaler="realesrgan", realesrgan_weights=weights, upscale_tile=32, upscale_tile_overlap=4
    )
    first = cached_upscaler(spec)
    assert cached_upscaler(DeliverySpec(**spec.model_dump())) is first
    assert cached_upscaler(spec.model_copy(update={"upscale_tile": 64})).tile == 64

    # weights replaced in place are new weights
    replaced = {name: value + 1 for name, value in official_srvgg_state(feat=8, convs=2).items()}
    torch.save({"params": replaced}, weights)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = cached_upscaler(spec)
    assert second is not first
    assert torch.equal(second.model.body[0].bias, replaced["body.0.bias"])
