"""Checks that each output is what was asked for, before anything is published.

A mismatch raises ``VerificationError`` listing every problem found in that file, so one run tells
the operator all that is wrong.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lynx.media.errors import VerificationError
from lynx.media.probe import MediaProbe, probe_image, probe_video

# AAC and Opus frames (~21 ms) plus encoder priming leave the audio a little longer than the video.
AUDIO_TOLERANCE_SECONDS = 0.1


class VideoExpectation(BaseModel):
    model_config = ConfigDict(frozen=True)

    codec: str
    width: int
    height: int
    frames: int
    fps: float
    pix_fmt: str = "yuv420p"
    audio_codec: str | None = None
    faststart: bool = False
    tags: dict[str, str] = {}


def _raise_if(problems: list[str], path: Path) -> None:
    if problems:
        raise VerificationError(f"{path.name} failed verification: {'; '.join(problems)}")


def verify_video(path: Path, expected: VideoExpectation) -> MediaProbe:
    """Probe a video and compare it with ``expected``; returns the probe when everything matches."""
    probe = probe_video(path)
    problems: list[str] = []
    for field in ("codec", "pix_fmt", "width", "height", "frames"):
        if getattr(probe, field) != getattr(expected, field):
            problems.append(f"{field} is {getattr(probe, field)!r}, expected {getattr(expected, field)!r}")
    if probe.fps is None or abs(probe.fps - expected.fps) > 1e-3:
        problems.append(f"frame rate is {probe.fps}, expected {expected.fps:g}")
    want_duration = expected.frames / expected.fps
    if probe.duration is None or abs(probe.duration - want_duration) > 1.0 / expected.fps:
        problems.append(f"duration is {probe.duration}, expected {want_duration:.3f} s")
    if expected.audio_codec is None and probe.audio_codec is not None:
        problems.append(f"has an unexpected {probe.audio_codec} audio stream")
    elif expected.audio_codec is not None:
        if probe.audio_codec != expected.audio_codec:
            problems.append(f"audio codec is {probe.audio_codec!r}, expected {expected.audio_codec!r}")
        elif (
            probe.audio_duration is None
            or abs(probe.audio_duration - want_duration) > AUDIO_TOLERANCE_SECONDS
        ):
            problems.append(f"audio lasts {probe.audio_duration} s, the video {want_duration:.3f} s")
    if expected.faststart and not probe.faststart:
        problems.append("moov box is not before mdat (no faststart)")
    for key, value in expected.tags.items():
        if probe.tags.get(key.lower()) != value:
            problems.append(f"metadata {key} is {probe.tags.get(key.lower())!r}, expected {value!r}")
    _raise_if(problems, path)
    return probe


def _image_problems(probe: MediaProbe, codec: str, width: int, height: int) -> list[str]:
    return [
        f"{field} is {getattr(probe, field)!r}, expected {want!r}"
        for field, want in (("codec", codec), ("width", width), ("height", height))
        if getattr(probe, field) != want
    ]


def verify_image(path: Path, *, codec: str, width: int, height: int) -> MediaProbe:
    """Probe a still image and compare format, size and frame count (one)."""
    probe = probe_image(path)
    problems = _image_problems(probe, codec, width, height)
    if probe.frames != 1:
        problems.append(f"has {probe.frames} frames, expected a still image")
    _raise_if(problems, path)
    return probe


def verify_animation(
    path: Path, *, codec: str, width: int, height: int, frames: int, fps: float
) -> MediaProbe:
    """Probe an animated image: format, size, at most ``frames`` frames lasting ``frames / fps``.

    WebP encoders merge identical consecutive frames into one longer frame, so the frame count
    can be lower than what was encoded; the total display time cannot.
    """
    probe = probe_image(path)
    problems = _image_problems(probe, codec, width, height)
    if not 1 <= probe.frames <= frames:
        problems.append(f"has {probe.frames} frames, expected 1..{frames}")
    elif probe.frames > 1 and abs(probe.duration - frames / fps) > 1.0 / fps:
        problems.append(f"plays for {probe.duration} s, expected {frames / fps:.3f} s")
    _raise_if(problems, path)
    return probe
