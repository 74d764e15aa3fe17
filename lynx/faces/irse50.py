"""The ArcFace IR-SE50 recogniser the official Lynx adapters were trained with.

Architecture facts from facexlib's ``arcface`` model (itself the TreB1eN InsightFace_Pytorch
"ir_se" backbone): a 3x3 stem, 24 improved-residual units with squeeze-and-excitation in four
stages (3, 4, 14, 3 units; 64, 128, 256, 512 channels; each stage starts with stride 2), then
BN -> dropout -> flatten -> Linear(512*7*7, 512) -> BN1d and an L2 normalisation. Module names
and positions reproduce facexlib's state-dict keys, so ``recognition_arcface_ir_se50.pth``
loads with ``strict=True``. Input: 112x112 BGR scaled to [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = ((64, 3), (128, 4), (256, 14), (512, 3))  # (channels, units)
SE_REDUCTION = 16


class SqueezeExcite(nn.Module):
    """Channel attention: global average -> bottleneck 1x1 convs -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class ImprovedResidualSE(nn.Module):
    """BN-Conv-PReLU-Conv-BN-SE residual unit; the shortcut subsamples (or projects) the input."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        if in_channels == channels:
            # A 1x1 max-pool with a stride is plain subsampling (and holds no weights).
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            SqueezeExcite(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """IR-SE50 face recogniser: ``(N, 3, 112, 112)`` in [-1, 1] -> ``(N, 512)`` unit vectors."""

    def __init__(self, embedding_dim: int = 512, dropout: float = 0.6) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        # Registered before `body`, as facexlib does, so a saved state dict has the same key order.
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, embedding_dim),
            nn.BatchNorm1d(embedding_dim),
        )
        units: list[nn.Module] = []
        in_channels = 64
        for channels, count in STAGES:
            for index in range(count):
                units.append(ImprovedResidualSE(in_channels, channels, stride=2 if index == 0 else 1))
                in_channels = channels
        self.body = nn.Sequential(*units)

    @property
    def embedding_dim(self) -> int:
        return self.output_layer[3].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.output_layer(self.body(self.input_layer(x)))
        return nn.functional.normalize(features, dim=1)
