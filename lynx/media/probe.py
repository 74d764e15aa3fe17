"""What a media file really contains, read back from the bytes on disk.

Videos are read with PyAV (its bundled libraries: no ffprobe needed); frames are counted by
demuxing every packet rather than trusting header fields, which WebM does not even carry. MP4 top
level boxes are walked by hand to see whether ``moov`` precedes ``mdat`` (faststart).
"""

from __future__ import annotations

import struct
from pathlib import Path

import av
from PIL import Image
from pydantic import BaseModel, ConfigDict

from lynx.media.errors import VerificationError


class MediaProbe(BaseModel):
    """Facts about one output file (also stored in the manifest)."""

    model_config = ConfigDict(frozen=True)

    container: str
    codec: str
    width: int
    height: int
    frames: int
    pix_fmt: str | None = None
    fps: float | None = None
    duration: float | None = None
    audio_codec: str | None = None
    audio_duration: float | None = None
    audio_channels: int | None = None
    audio_sample_rate: int | None = None
    faststart: bool | None = None
    tags: dict[str, str] = {}


def mp4_top_level_boxes(path: Path) -> list[str]:
    """Types of the top-level ISO-BMFF boxes in file order (``ftyp``, ``moov``, ``mdat`` ...)."""
    boxes: list[str] = []
    with open(path, "rb") as handle:
        size_of_file = handle.seek(0, 2)
        offset = 0
        while offset + 8 <= size_of_file:
            handle.seek(offset)
            size, kind = struct.unpack(">I4s", handle.read(8))
            if size == 1:  # 64-bit size follows the type
                size = struct.unpack(">Q", handle.read(8))[0]
            elif size == 0:  # box runs to the end of the file
                size = size_of_file - offset
            if size < 8:
                raise VerificationError(f"{path.name}: broken MP4 box at byte {offset}")
            boxes.append(kind.decode("latin-1"))
            offset += size
    return boxes


class _StreamSpan:
    """Packet count and time span of one stream, gathered without keeping packets in memory."""

    def __init__(self) -> None:
        self.packets = 0
        self.start: int | None = None
        self.end: int | None = None
        self.time_base = None

    def add(self, packet: av.Packet) -> None:
        self.packets += 1
        if packet.pts is None:
            return
        self.time_base = packet.time_base
        end = packet.pts + (packet.duration or 0)
        self.start = packet.pts if self.start is None else min(self.start, packet.pts)
        self.end = end if self.end is None else max(self.end, end)

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return float((self.end - self.start) * self.time_base)


def probe_video(path: Path) -> MediaProbe:
    """Container, codecs, size, exact frame count, durations, faststart and tags of a video file."""
    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, FileNotFoundError) as err:
        raise VerificationError(f"{path.name} cannot be opened as a video: {err}") from None
    with container:
        if not container.streams.video:
            raise VerificationError(f"{path.name} holds no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        spans = {video.index: _StreamSpan()}
        if audio is not None:
            spans[audio.index] = _StreamSpan()
        try:
            for packet in container.demux(*(s for s in (video, audio) if s is not None)):
                if packet.size:
                    spans[packet.stream.index].add(packet)
        except av.FFmpegError as err:
            raise VerificationError(f"{path.name} is corrupt: {err}") from None
        is_mp4 = "mp4" in container.format.name
        return MediaProbe(
            container="mp4" if is_mp4 else container.format.name.split(",")[0],
            codec=video.codec_context.name,
            pix_fmt=video.codec_context.pix_fmt,
            width=video.width,
            height=video.height,
            frames=spans[video.index].packets,
            fps=float(video.average_rate) if video.average_rate else None,
            duration=spans[video.index].seconds,
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_duration=spans[audio.index].seconds if audio is not None else None,
            audio_channels=audio.codec_context.channels if audio is not None else None,
            audio_sample_rate=audio.codec_context.sample_rate if audio is not None else None,
            faststart=_is_faststart(path) if is_mp4 else None,
            tags={key.lower(): value for key, value in container.metadata.items()},
        )


def _is_faststart(path: Path) -> bool:
    boxes = mp4_top_level_boxes(path)
    return "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat")


def probe_image(path: Path) -> MediaProbe:
    """Format, size, frame count and text tags of a still or animated image."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            tags = {str(k).lower(): str(v) for k, v in getattr(image, "text", {}).items()}
            if "comment" in image.info:
                comment = image.info["comment"]
                tags["comment"] = (
                    comment.decode(errors="replace") if isinstance(comment, bytes) else str(comment)
                )
            frames = getattr(image, "n_frames", 1)
            duration = None
            if frames > 1:  # animated: per-frame display times in milliseconds
                milliseconds = 0
                for index in range(frames):
                    image.seek(index)
                    image.load()  # WebP fills in the frame's duration only when it is decoded
                    milliseconds += image.info.get("duration", 0)
                duration = milliseconds / 1000
            return MediaProbe(
                container=(image.format or "unknown").lower(),
                codec=(image.format or "unknown").lower(),
                width=image.width,
                height=image.height,
                frames=frames,
                duration=duration,
                tags=tags,
            )
    except (OSError, SyntaxError) as err:
        raise VerificationError(f"{path.name} cannot be read as an image: {err}") from None
