"""Frames in: uint8 conversion and the lossless hand-over file between decode and delivery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lynx.media.errors import DeliveryInputError
from lynx.media.frames import to_uint8_frames
from lynx.media.intermediate import iter_frames, lossless_info, write_lossless

from .conftest import synthetic_frames


def test_float_video_becomes_rounded_uint8_frame_by_frame() -> None:
    video = np.array([[[[0.0, 0.5, 1.0]]], [[[-0.2, 1.7, 0.999]]]], np.float32)  # [2, 1, 1, 3]
    frames = list(to_uint8_frames(video))
    assert [f.dtype for f in frames] == [np.uint8, np.uint8]
    assert frames[0].tolist() == [[[0, 128, 255]]]
    assert frames[1].tolist() == [[[0, 255, 255]]]  # clipped, rounded


def test_conversion_is_lazy_and_checks_every_frame() -> None:
    def source():
        yield np.zeros((4, 6, 3), np.uint8)
        yield np.zeros((4, 8, 3), np.uint8)

    stream = to_uint8_frames(source())
    assert next(stream).shape == (4, 6, 3)  # nothing beyond the first frame was touched yet
    with pytest.raises(DeliveryInputError, match="frame 1 is 8x4 but the video started at 6x4"):
        next(stream)


@pytest.mark.parametrize(
    ("video", "message"),
    [
        (np.zeros((2, 3, 4, 4), np.float32), r"shape \(3, 4, 4\)"),  # channels-first
        (np.zeros((4, 4, 3), np.uint8), "expected \\[frames, height, width, 3\\]"),
        (np.zeros((1, 4, 4, 3), np.int32), "dtype int32"),
    ],
)
def test_unusable_frames_are_refused_with_the_reason(video: np.ndarray, message: str) -> None:
    with pytest.raises(DeliveryInputError, match=message):
        list(to_uint8_frames(video))


@pytest.mark.parametrize(("height", "width"), [(64, 96), (65, 97)])  # odd sizes too: FFV1 RGB has no chroma
def test_lossless_round_trip_is_bit_exact(tmp_path: Path, height: int, width: int) -> None:
    frames = list(synthetic_frames(17, height, width))
    noisy = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    frames.append(noisy)  # incompressible content must survive too
    written = write_lossless(iter(frames), tmp_path / "decoded.mkv", fps=16)

    assert (written.frames, written.width, written.height, written.fps) == (18, width, height, 16)
    back = list(iter_frames(written.path))
    assert len(back) == len(frames)
    assert all(np.array_equal(a, b) for a, b in zip(frames, back, strict=True))
    info = lossless_info(written.path)
    assert (info.frames, info.width, info.height, info.fps) == (18, width, height, 16.0)


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    def broken():
        yield from synthetic_frames(3, 32, 48)
        raise RuntimeError("decode stage died")

    with pytest.raises(RuntimeError, match="decode stage died"):
        write_lossless(broken(), tmp_path / "decoded.mkv", fps=16)
    assert list(tmp_path.iterdir()) == []


def test_empty_video_and_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DeliveryInputError, match="empty"):
        write_lossless(iter(()), tmp_path / "x.mkv", fps=16)
    with pytest.raises(DeliveryInputError, match="does not exist"):
        list(iter_frames(tmp_path / "missing.mkv"))
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(DeliveryInputError, match="unreadable"):
        lossless_info(junk)
