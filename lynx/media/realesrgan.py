"""Real-ESRGAN generators, written for lynx, that load the official weight files unchanged.

Two architectures cover the released models:
- ``RRDBNet`` (ESRGAN's residual-in-residual dense blocks): RealESRGAN_x4plus, RealESRNet_x4plus,
  RealESRGAN_x4plus_anime_6B (6 blocks) and RealESRGAN_x2plus. For scale 2 and 1 the input is
  pixel-unshuffled first (x2 -> 4x channels, x1 -> 16x) and the trunk always upsamples by 4.
- ``SRVGGNetCompact`` (a plain conv stack, upsampling by pixel shuffle in the last layer, plus the
  nearest-upsampled input): realesr-general-x4v3 (32 convs), realesr-animevideov3 (16 convs).

Parameter names follow the official state dicts (``conv_first``, ``body.N.rdbM.convK``,
``conv_body``, ``conv_up1``/``conv_up2``, ``conv_hr``, ``conv_last``; SRVGG: ``body.N`` with PReLU
slopes at the odd indices), so ``load_state_dict(strict=True)`` takes the files as released. The
files wrap the dict in ``params_ema`` (GAN models) or ``params``. Values are RGB in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lynx.caching import cached_per_configuration
from lynx.errors import ModelWeightsError
from lynx.media.deliver import asset_entry
from lynx.media.resize import resize_frame

if TYPE_CHECKING:
    from lynx.media.spec import DeliverySpec

_SETTING = "LYNX_DELIVER_REALESRGAN_WEIGHTS"
# ESRGAN scales every residual branch down before adding it back; it keeps the deep trunk stable.
_RESIDUAL_SCALE = 0.2


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five convolutions, each seeing the block input plus every earlier output (dense links)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        for k in range(1, 5):
            setattr(self, f"conv{k}", _conv3x3(num_feat + (k - 1) * num_grow_ch, num_grow_ch))
        self.conv5 = _conv3x3(num_feat + 4 * num_grow_ch, num_feat)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for k in range(1, 5):
            conv = getattr(self, f"conv{k}")
            features.append(self.lrelu(conv(torch.cat(features, dim=1))))
        return x + _RESIDUAL_SCALE * self.conv5(torch.cat(features, dim=1))


class RRDB(nn.Module):
    """Three dense blocks in a row, wrapped in one more scaled residual connection."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _RESIDUAL_SCALE * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN generator: conv, ``num_block`` RRDBs, two nearest-x2 upsampling convs, two output convs."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        scale: int = 4,
    ) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        self.scale = scale
        # The trunk always enlarges 4x; smaller scales fold pixels into channels first.
        self.unshuffle = 4 // scale
        self.conv_first = _conv3x3(num_in_ch * self.unshuffle**2, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv3x3(num_feat, num_feat)
        self.conv_up1 = _conv3x3(num_feat, num_feat)
        self.conv_up2 = _conv3x3(num_feat, num_feat)
        self.conv_hr = _conv3x3(num_feat, num_feat)
        self.conv_last = _conv3x3(num_feat, num_out_ch)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (the pixel-unshuffle factor)."""
        return self.unshuffle

    @property
    def out_channels(self) -> int:
        return self.conv_last.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv_up in (self.conv_up1, self.conv_up2):
            feat = self.lrelu(conv_up(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def _activation(act_type: str, num_feat: int) -> nn.Module:
    if act_type == "prelu":
        return nn.PReLU(num_parameters=num_feat)
    if act_type == "relu":
        return nn.ReLU(inplace=True)
    if act_type == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.1, inplace=True)
    raise ValueError(f"unknown activation {act_type!r}; use 'prelu', 'relu' or 'leakyrelu'")


class SRVGGNetCompact(nn.Module):
    """Compact VGG-style generator: convs at input size, pixel shuffle, plus a nearest-upsampled skip."""

    size_multiple = 1

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        act_type: str = "prelu",
    ) -> None:
        super().__init__()
        self.scale = upscale
        layers: list[nn.Module] = [_conv3x3(num_in_ch, num_feat), _activation(act_type, num_feat)]
        for _ in range(num_conv):
            layers += [_conv3x3(num_feat, num_feat), _activation(act_type, num_feat)]
        layers.append(_conv3x3(num_feat, num_out_ch * upscale * upscale))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)
        self.out_channels = num_out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        # The network only learns the residual over a nearest-neighbour enlargement.
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelWeightsError(f"Real-ESRGAN weights {path} do not exist", setting=_SETTING)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path))
        else:
            # weights_only: an official .pth is a dict of tensors; anything needing code is refused.
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors each raise their own types
        raise ModelWeightsError(f"{path} is not a readable weight file: {err}", setting=_SETTING) from None
    if isinstance(loaded, dict):
        for wrapper in ("params_ema", "params"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelWeightsError(
            f"{path} holds no state dict (expected tensors, optionally under 'params_ema' or 'params')",
            setting=_SETTING,
        )
    return loaded


def _rrdbnet_for(state: dict[str, torch.Tensor]) -> RRDBNet:
    in_channels = state["conv_first.weight"].shape[1]
    scale = {3: 4, 12: 2, 48: 1}.get(in_channels)
    if scale is None:
        raise ModelWeightsError(
            f"RRDBNet with {in_channels} input channels matches no scale (3, 12, 48)", setting=_SETTING
        )
    blocks = {key.split(".")[1] for key in state if key.startswith("body.")}
    return RRDBNet(
        num_in_ch=in_channels // (4 // scale) ** 2,
        num_out_ch=state["conv_last.weight"].shape[0],
        num_feat=state["conv_first.weight"].shape[0],
        num_block=len(blocks),
        num_grow_ch=state["body.0.rdb1.conv1.weight"].shape[0],
        scale=scale,
    )


def _srvgg_for(state: dict[str, torch.Tensor], act_type: str | None) -> SRVGGNetCompact:
    conv_indices = sorted(
        int(key.split(".")[1]) for key in state if key.endswith(".weight") and state[key].ndim == 4
    )
    first, last = state[f"body.{conv_indices[0]}.weight"], state[f"body.{conv_indices[-1]}.weight"]
    num_in = first.shape[1]
    upscale = math.isqrt(last.shape[0] // num_in)
    if upscale * upscale * num_in != last.shape[0]:
        raise ModelWeightsError(
            f"SRVGG last conv has {last.shape[0]} channels: no integer scale", setting=_SETTING
        )
    if act_type is None:
        # Only PReLU has parameters; the other activations leave no trace in the file.
        if "body.1.weight" not in state:
            raise ModelWeightsError(
                "SRVGG weights without PReLU slopes: pass act_type ('relu' or 'leakyrelu')", setting=_SETTING
            )
        act_type = "prelu"
    return SRVGGNetCompact(
        num_in_ch=num_in,
        num_out_ch=num_in,
        num_feat=first.shape[0],
        num_conv=len(conv_indices) - 2,
        upscale=upscale,
        act_type=act_type,
    )


def load_realesrgan(path: Path, *, act_type: str | None = None) -> RRDBNet | SRVGGNetCompact:
    """Build the generator a weight file describes (architecture and scale from its keys and shapes).

    Loads strictly: any missing or unexpected key, or a wrong shape, is a ``ModelWeightsError``
    naming the file.
    """
    path = Path(path)
    state = _read_state_dict(path)
    try:
        if "conv_first.weight" in state:
            model: RRDBNet | SRVGGNetCompact = _rrdbnet_for(state)
        elif "body.0.weight" in state:
            model = _srvgg_for(state, act_type)
        else:
            raise ModelWeightsError(
                f"{path} is neither an RRDBNet nor an SRVGGNetCompact state dict "
                f"(first keys: {', '.join(list(state)[:3])})",
                setting=_SETTING,
            )
        # Strict in effect, but the key lists make a better one-line message than torch's.
        outcome = model.load_state_dict(state, strict=False)
    except (KeyError, IndexError, RuntimeError) as err:  # wrong shapes, or keys the inference relies on
        reason = " ".join(line.strip() for line in str(err).splitlines()[1:3]) or str(err)
        raise ModelWeightsError(
            f"{path} does not match the Real-ESRGAN layout: {reason[:300]}", setting=_SETTING
        ) from None
    if outcome.missing_keys or outcome.unexpected_keys:
        raise ModelWeightsError(
            f"{path} does not match the Real-ESRGAN layout: missing {outcome.missing_keys[:3]}, "
            f"unexpected {outcome.unexpected_keys[:3]}",
            setting=_SETTING,
        )
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def tiled_forward(model: nn.Module, image: torch.Tensor, *, tile: int, overlap: int) -> torch.Tensor:
    """Run ``model`` on ``image`` [1, C, H, W] tile by tile; memory follows the tile, not the frame.

    Each tile is cut with ``overlap`` pixels of context on every side and only its centre is kept,
    so seams vanish once the overlap covers the network's receptive field. ``tile=0`` runs the
    whole frame at once.
    """
    scale, multiple = model.scale, model.size_multiple
    height, width = image.shape[-2:]
    # Pixel-unshuffle needs sizes divisible by its factor: pad the frame, crop the result.
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
    padded_h, padded_w = image.shape[-2:]
    if not tile or (tile >= padded_h and tile >= padded_w):
        return model(image)[..., : height * scale, : width * scale]

    tile = math.ceil(tile / multiple) * multiple
    overlap = math.ceil(overlap / multiple) * multiple
    out = image.new_empty((image.shape[0], model.out_channels, padded_h * scale, padded_w * scale))
    for top in range(0, padded_h, tile):
        for left in range(0, padded_w, tile):
            bottom, right = min(top + tile, padded_h), min(left + tile, padded_w)
            ctop, cleft = max(top - overlap, 0), max(left - overlap, 0)
            cbottom, cright = min(bottom + overlap, padded_h), min(right + overlap, padded_w)
            result = model(image[..., ctop:cbottom, cleft:cright])
            y0, x0 = (top - ctop) * scale, (left - cleft) * scale
            out[..., top * scale : bottom * scale, left * scale : right * scale] = result[
                ..., y0 : y0 + (bottom - top) * scale, x0 : x0 + (right - left) * scale
            ]
    return out[..., : height * scale, : width * scale]


class RealEsrganUpscaler:
    """Enlarges uint8 RGB frames with a generator, then resizes them to the exact target size.

    On CUDA it runs in float16 (the official default; bfloat16 may be asked for), on CPU in float32.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tile: int = 256,
        overlap: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = (
            torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype)
        self.tile, self.overlap = tile, overlap

    @classmethod
    def from_file(cls, path: Path, *, tile: int = 256, overlap: int = 16) -> RealEsrganUpscaler:
        return cls(load_realesrgan(path), tile=tile, overlap=overlap)

    @property
    def scale(self) -> int:
        return self.model.scale

    @torch.inference_mode()
    def enlarge(self, frame: np.ndarray) -> np.ndarray:
        """One frame through the generator: ``[H, W, 3]`` uint8 -> ``[H*s, W*s, 3]`` uint8."""
        image = torch.from_numpy(frame).to(self.device).permute(2, 0, 1)[None].to(self.dtype) / 255.0
        result = tiled_forward(self.model, image, tile=self.tile, overlap=self.overlap)
        return (
            (result[0].float().clamp_(0, 1) * 255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        )

    def upscale_frames(self, frames: Iterable[np.ndarray], size: tuple[int, int]) -> Iterator[np.ndarray]:
        """Enlarge every frame and resize it to ``size`` (width, height), one frame at a time."""
        for frame in frames:
            yield resize_frame(self.enlarge(frame), size)


def _upscaler_configuration(spec: DeliverySpec) -> Hashable:
    path = Path(spec.realesrgan_weights)
    try:
        stat = path.stat()
    except OSError:  # missing: loading says so clearly, and a failed load is not cached
        return str(path), None, None, spec.upscale_tile, spec.upscale_tile_overlap
    # The file's size and mtime: weights replaced in place are loaded again.
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size, spec.upscale_tile, spec.upscale_tile_overlap


@cached_per_configuration(_upscaler_configuration)
def cached_upscaler(spec: DeliverySpec) -> RealEsrganUpscaler:
    """The spec's upscaler, loaded once per process and weights file: a worker delivers many jobs."""
    return RealEsrganUpscaler.from_file(
        spec.realesrgan_weights, tile=spec.upscale_tile, overlap=spec.upscale_tile_overlap
    )


@cached_per_configuration(_upscaler_configuration)
def cached_weights_entry(spec: DeliverySpec) -> dict[str, Any]:
    """The manifest's entry for the spec's weights file: hashed once per version of it, like the model."""
    return asset_entry("upscaler_weights", Path(spec.realesrgan_weights)) or {}
