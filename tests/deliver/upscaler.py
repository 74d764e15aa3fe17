"""A tiny real Real-ESRGAN for the delivery and flow tests, and a count of the frames it enlarges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lynx.media import realesrgan
from lynx.media.realesrgan import SRVGGNetCompact


def tiny_realesrgan_weights(path: Path, *, seed: int = 0) -> Path:
    """Random tensors of a tiny x4 SRVGG net, saved at ``path`` in the official file layout."""
    torch.manual_seed(seed)
    torch.save({"params": SRVGGNetCompact(num_feat=8, num_conv=2).state_dict()}, path)
    return path


def count_enlarged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one per frame through ``RealEsrganUpscaler.enlarge`` (which still runs)."""
    enlarged: list[int] = []
    enlarge = realesrgan.RealEsrganUpscaler.enlarge
    monkeypatch.setattr(
        realesrgan.RealEsrganUpscaler,
        "enlarge",
        lambda self, frame: enlarged.append(1) or enlarge(self, frame),
    )
    return enlarged
