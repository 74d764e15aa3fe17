"""The lossless hand-over video between the decode stage and delivery.

FFV1 (level 3) in Matroska with the planar RGB pixel format ``gbrp``: the RGB bytes come back
bit-exactly (no YUV conversion, no chroma subsampling), which x264 ``-qp 0`` with yuv444p cannot
promise because RGB->YUV rounds. Smooth generated content compresses about 3x, so 81 frames at
480x832 take ~30 MB instead of 97 MB raw. Delivery also uses it as its own mezzanine file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np
from pydantic import BaseModel, ConfigDict

from lynx.media.errors import DeliveryInputError
from lynx.media.ffmpeg import RawVideoPipe, ffmpeg_exe
from lynx.media.frames import to_uint8_frames


class LosslessVideo(BaseModel):
    """What was written (or found) in a lossless intermediate file."""

    model_config = ConfigDict(frozen=True)

    path: Path
    frames: int
    width: int
    height: int
    fps: float


def write_lossless(
    frames: np.ndarray | Iterable[np.ndarray], path: Path, fps: float, *, ffmpeg_binary: Path | None = None
) -> LosslessVideo:
    """Stream frames through a pipe into an FFV1/MKV file and return what was written.

    The file appears under ``path`` only once ffmpeg has finished, so a crash never leaves a
    truncated file that looks complete.
    """
    stream = to_uint8_frames(frames)
    first = next(stream, None)
    if first is None:
        raise DeliveryInputError("no frames to write: the video is empty")
    height, width = first.shape[:2]
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    source = RawVideoPipe.input(width, height, fps)
    output = source.output(
        str(partial), format="matroska", vcodec="ffv1", pix_fmt="gbrp", level=3, slices=4, g=1
    )
    count = 0
    try:
        with RawVideoPipe(output, exe=ffmpeg_exe(ffmpeg_binary), what=f"writing {path.name}") as pipe:
            for frame in itertools.chain([first], stream):
                pipe.write(frame)
                count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return LosslessVideo(path=path, frames=count, width=width, height=height, fps=fps)


def _open(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise DeliveryInputError(f"intermediate video {path} does not exist") from None
    except av.FFmpegError as err:
        raise DeliveryInputError(f"intermediate video {path} is unreadable: {err}") from None
    if not container.streams.video:
        container.close()
        raise DeliveryInputError(f"intermediate video {path} holds no video stream")
    return container


def lossless_info(path: Path) -> LosslessVideo:
    """Size, rate and exact frame count of an intermediate file (counts packets; decodes nothing)."""
    with _open(Path(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for packet in container.demux(stream) if packet.size)
        return LosslessVideo(
            path=Path(path),
            frames=count,
            width=stream.width,
            height=stream.height,
            fps=float(stream.average_rate or stream.guessed_rate),
        )


def iter_frames(path: Path) -> Iterator[np.ndarray]:
    """Yield the frames of a video file as uint8 RGB ``[H, W, 3]`` arrays, one at a time."""
    with _open(Path(path)) as container:
        try:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as err:
            raise DeliveryInputError(f"intermediate video {path} is corrupt: {err}") from None
