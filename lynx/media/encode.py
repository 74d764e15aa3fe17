"""Encoding the delivered videos from the lossless mezzanine with one ffmpeg graph each.

Per video the graph is: frame-rate conversion -> Lanczos resize -> logo overlay -> BT.709 yuv420p,
plus the audio chain (loop or trim to the video, fade out, resample to 48 kHz stereo) and the
provenance tags. Frame-rate conversion happens before resizing, where motion estimation is
cheapest.

Frame counts are exact by construction: converting N frames at rate r to rate r' keeps the first
and last frame and gives ``floor((N - 1) * r' / r) + 1`` frames (81 at 16 fps -> 121 at 24 fps,
the lite model's native length). The source is padded with two copies of its last frame so
``minterpolate`` has a neighbour for the final frame, and the output is cut at exactly that count.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Literal

import ffmpeg
from pydantic import BaseModel, ConfigDict

from lynx.media.codecs import VideoFormat
from lynx.media.ffmpeg import fps_fraction, run_ffmpeg
from lynx.media.intermediate import LosslessVideo
from lynx.media.resize import even

# Resampling flags: Lanczos, with accurate rounding and full chroma interpolation.
SCALE_FLAGS = "lanczos+accurate_rnd+full_chroma_int"
_TAIL_PADDING = 2


def converted_frame_count(frames: int, source_fps: float, target_fps: float) -> int:
    """Frames after converting ``frames`` from ``source_fps`` to ``target_fps`` (first and last kept)."""
    ratio = fps_fraction(target_fps) / fps_fraction(source_fps)
    return math.floor((frames - 1) * ratio) + 1


def converted_frame_index(index: int, source_fps: float, target_fps: float) -> int:
    """The first converted frame that shows source frame ``index``.

    ffmpeg's ``fps`` filter moves each source frame to the nearest output tick, rounding halves
    up, and repeats it until the next one arrives; ``minterpolate`` puts the exact source frame
    (or its nearest interpolation) on the same tick.
    """
    return math.floor(index * fps_fraction(target_fps) / fps_fraction(source_fps) + Fraction(1, 2))


class Watermark(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    position: Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"] = "bottom-right"
    opacity: float = 0.8
    width_fraction: float = 0.15

    def overlay(
        self, video: ffmpeg.nodes.FilterableStream, width: int, height: int
    ) -> ffmpeg.nodes.FilterableStream:
        """``video`` with the logo blended in at its corner, scaled relative to the frame width."""
        margin = even(0.03 * height)
        logo = (
            ffmpeg.input(str(self.path))
            .video.filter("scale", even(width * self.width_fraction), -2, flags=SCALE_FLAGS)
            .filter("format", "rgba")
            .filter("colorchannelmixer", aa=self.opacity)
        )
        row, _, column = self.position.partition("-")  # "center" leaves both unmatched below
        x = {"left": f"{margin}", "right": f"main_w-overlay_w-{margin}"}.get(column, "(main_w-overlay_w)/2")
        y = {"top": f"{margin}", "bottom": f"main_h-overlay_h-{margin}"}.get(row, "(main_h-overlay_h)/2")
        return ffmpeg.overlay(video, logo, x=x, y=y, eof_action="repeat")


class AudioTrack(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    fade_seconds: float = 1.0
    bitrate: str = "192k"

    def stream(self, duration: float) -> ffmpeg.nodes.FilterableStream:
        """The track looped (``-stream_loop -1``) and trimmed to ``duration``, faded out at the end."""
        audio = ffmpeg.input(str(self.path), stream_loop=-1).audio
        audio = audio.filter("atrim", duration=f"{duration:.6f}").filter("asetpts", "PTS-STARTPTS")
        fade = min(self.fade_seconds, duration)
        if fade > 0:
            audio = audio.filter("afade", t="out", st=f"{duration - fade:.6f}", d=f"{fade:.6f}")
        return audio.filter("aresample", 48000)


class EncodePlan(BaseModel):
    """How the mezzanine becomes a delivered video: size, rate and exact frame count."""

    model_config = ConfigDict(frozen=True)

    source: LosslessVideo
    width: int
    height: int
    fps: float
    fps_mode: Literal["interpolate", "duplicate"] = "interpolate"

    @property
    def frames(self) -> int:
        return converted_frame_count(self.source.frames, self.source.fps, self.fps)

    @property
    def duration(self) -> float:
        return self.frames / self.fps

    @property
    def changes_rate(self) -> bool:
        return fps_fraction(self.fps) != fps_fraction(self.source.fps)

    def video_stream(self, watermark: Watermark | None = None) -> ffmpeg.nodes.FilterableStream:
        video = ffmpeg.input(str(self.source.path)).video
        if self.changes_rate:
            rate = str(fps_fraction(self.fps))
            video = video.filter("tpad", stop_mode="clone", stop=_TAIL_PADDING)
            if self.fps_mode == "interpolate":
                video = video.filter("minterpolate", fps=rate, mi_mode="mci")
            else:
                video = video.filter("fps", fps=rate)
        if (self.width, self.height) != (self.source.width, self.source.height):
            video = video.filter("scale", self.width, self.height, flags=SCALE_FLAGS)
        if watermark is not None:
            video = watermark.overlay(video, self.width, self.height)
        # HD players assume BT.709; convert with that matrix and say so in the stream.
        return video.filter("scale", out_color_matrix="bt709", out_range="tv", flags=SCALE_FLAGS).filter(
            "format", "yuv420p"
        )


def _metadata_options(tags: dict[str, str]) -> dict[str, str]:
    # ffmpeg wants one -metadata per tag; distinct (ignored) specifiers keep the keyword keys unique.
    return {f"metadata:g:{i}": f"{key}={value}" for i, (key, value) in enumerate(tags.items())}


def encode_video(
    plan: EncodePlan,
    fmt: VideoFormat,
    path: Path,
    *,
    crf: int,
    preset: str,
    exe: str,
    audio: AudioTrack | None = None,
    watermark: Watermark | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Encode one delivered video (master or rendition) into ``path``."""
    streams = [plan.video_stream(watermark)]
    options = {
        "vcodec": fmt.encoder,
        **fmt.encoder_options(crf=crf, preset=preset),
        "colorspace": "bt709",
        "color_primaries": "bt709",
        "color_trc": "bt709",
        "frames:v": plan.frames,
        **_metadata_options(tags or {}),
    }
    if audio is not None:
        streams.append(audio.stream(plan.duration))
        options.update({"acodec": fmt.audio_encoder, "audio_bitrate": audio.bitrate, "ac": 2, "ar": 48000})
    run_ffmpeg(ffmpeg.output(*streams, str(path), **options), exe=exe, what=f"encoding {path.name}")
    return path


def encode_animated_preview(
    source: Path, path: Path, *, frames: int, source_fps: float, height: int, fps: float, exe: str
) -> Fraction:
    """A small looping animated WebP of a video; returns its frame rate (never above the source's)."""
    rate = min(fps_fraction(fps), fps_fraction(source_fps))
    video = ffmpeg.input(str(source)).video
    count = frames
    if rate != fps_fraction(source_fps):
        video = video.filter("tpad", stop_mode="clone", stop=_TAIL_PADDING).filter("fps", fps=str(rate))
        count = converted_frame_count(frames, source_fps, float(rate))
    video = video.filter("scale", -2, height, flags=SCALE_FLAGS)
    output = ffmpeg.output(
        video, str(path), vcodec="libwebp_anim", loop=0, quality=75, an=None, **{"frames:v": count}
    )
    run_ffmpeg(output, exe=exe, what=f"encoding {path.name}")
    return rate
