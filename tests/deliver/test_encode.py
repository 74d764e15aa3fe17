"""Encoding with the real ffmpeg: exact frame counts and sizes, audio fitting, faststart, renditions, logo."""

from __future__ import annotations

import ctypes
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import ffmpeg as ffmpeg_lib
import numpy as np
import psutil
import pytest

from lynx.media.codecs import H264, RENDITIONS
from lynx.media.encode import (
    AudioTrack,
    EncodePlan,
    Watermark,
    converted_frame_count,
    converted_frame_index,
    encode_video,
)
from lynx.media.errors import VerificationError
from lynx.media.ffmpeg import fps_fraction, run_ffmpeg
from lynx.media.intermediate import LosslessVideo, iter_frames, write_lossless
from lynx.media.probe import mp4_top_level_boxes
from lynx.media.resize import output_size
from lynx.media.verify import VideoExpectation, verify_video

from .conftest import flat_frames, synthetic_frames

TAGS = {"title": "spring / job-0001", "comment": "AI-generated", "job_id": "job-0001", "seed": "1234"}


@pytest.fixture(scope="module")
def mezzanine(tmp_path_factory: pytest.TempPathFactory) -> LosslessVideo:
    """33 frames of 96x64 at 16 fps: 2.0625 s."""
    return write_lossless(synthetic_frames(33, 64, 96), tmp_path_factory.mktemp("m") / "m.mkv", fps=16)


def encode(plan: EncodePlan, path: Path, ffmpeg: str, fmt=H264, **kwargs) -> Path:
    return encode_video(plan, fmt, path, crf=23, preset="veryfast", exe=ffmpeg, **kwargs)


def expect(plan: EncodePlan, fmt=H264, **kwargs) -> VideoExpectation:
    return VideoExpectation(
        codec=fmt.codec,
        width=plan.width,
        height=plan.height,
        frames=plan.frames,
        fps=plan.fps,
        faststart=fmt.mp4,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("fps", "mode", "frames"),
    [
        (24, "duplicate", 49),
        (25, "duplicate", 51),
        (30, "duplicate", 61),
        (12, "duplicate", 25),
        (24, "interpolate", 49),
        (30, "interpolate", 61),
    ],
)
def test_frame_rate_conversion_and_upscale_give_exact_counts_and_sizes(
    tmp_path: Path, ffmpeg: str, mezzanine: LosslessVideo, fps: int, mode: str, frames: int
) -> None:
    width, height = output_size(96, 64, 144)
    plan = EncodePlan(source=mezzanine, width=width, height=height, fps=fps, fps_mode=mode)
    assert plan.frames == frames == converted_frame_count(33, 16, fps)

    probe = verify_video(encode(plan, tmp_path / "out.mp4", ffmpeg), expect(plan))

    assert (probe.width, probe.height, probe.frames, probe.fps) == (216, 144, frames, fps)
    assert probe.duration == pytest.approx(frames / fps, abs=1e-3)


def test_native_rate_and_size_pass_through(tmp_path: Path, ffmpeg: str, mezzanine: LosslessVideo) -> None:
    plan = EncodePlan(source=mezzanine, width=96, height=64, fps=16)
    probe = verify_video(encode(plan, tmp_path / "out.mp4", ffmpeg), expect(plan))
    assert (probe.frames, probe.width, probe.height, probe.fps) == (33, 96, 64, 16)


def test_lite_length_maps_onto_full_length(tmp_path: Path) -> None:
    assert converted_frame_count(81, 16, 24) == 121  # full 81 @ 16 fps == lite 121 @ 24 fps
    assert converted_frame_count(121, 24, 16) == 81
    assert converted_frame_count(81, 16, 30) == 151


def _levels(path: Path) -> list[float]:
    return [float(f.mean()) for f in iter_frames(path)]


def test_duplicate_mode_repeats_the_nearest_source_frame(tmp_path: Path, ffmpeg: str) -> None:
    source = write_lossless(flat_frames(9, 32, 48), tmp_path / "flat.mkv", fps=16)
    plan = EncodePlan(source=source, width=48, height=32, fps=24, fps_mode="duplicate")
    levels = _levels(encode(plan, tmp_path / "dup.mp4", ffmpeg))
    # Source frame i arrives at output tick floor(1.5 i + 1/2) and stays until the next one.
    first_ticks = [converted_frame_index(i, 16, 24) for i in range(9)]
    assert first_ticks == [0, 2, 3, 5, 6, 8, 9, 11, 12]
    shown = [max(i for i, tick in enumerate(first_ticks) if tick <= k) for k in range(13)]
    assert len(levels) == 13
    assert np.allclose(levels, [16 + 8 * i for i in shown], atol=2.5)


def test_interpolate_mode_makes_in_between_frames(tmp_path: Path, ffmpeg: str) -> None:
    source = write_lossless(flat_frames(9, 32, 48), tmp_path / "flat.mkv", fps=16)
    plan = EncodePlan(source=source, width=48, height=32, fps=24, fps_mode="interpolate")
    levels = _levels(encode(plan, tmp_path / "mi.mp4", ffmpeg))
    source_levels = np.array([16 + 8 * i for i in range(9)])
    assert len(levels) == 13
    assert levels[0] == pytest.approx(16, abs=2.5) and levels[-1] == pytest.approx(80, abs=2.5)
    between = [lv for lv in levels if np.abs(source_levels - lv).min() > 2.5]
    assert between, f"no interpolated frame among {levels}"
    assert all(a <= b + 1 for a, b in zip(levels, levels[1:], strict=False))  # brightness keeps rising


def _audio_envelope(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        samples = np.concatenate([f.to_ndarray().mean(axis=0) for f in container.decode(audio=0)])
        return samples, container.streams.audio[0].rate


@pytest.mark.parametrize(
    ("seconds", "extension"), [(0.5, "wav"), (5.0, "m4a")], ids=["shorter-looped", "longer-trimmed"]
)
def test_audio_is_fitted_to_the_video_and_faded(
    tmp_path: Path, ffmpeg: str, mezzanine: LosslessVideo, make_audio, seconds: float, extension: str
) -> None:
    plan = EncodePlan(source=mezzanine, width=96, height=64, fps=16)
    track = AudioTrack(path=make_audio(seconds, extension), fade_seconds=0.5)
    path = encode(plan, tmp_path / "with-audio.mp4", ffmpeg, audio=track)

    probe = verify_video(path, expect(plan, audio_codec="aac"))
    assert probe.audio_duration == pytest.approx(plan.duration, abs=0.05)
    assert (probe.audio_sample_rate, probe.audio_channels) == (48000, 2)
    samples, rate = _audio_envelope(path)
    rms = lambda a, b: float(np.sqrt(np.mean(samples[int(a * rate) : int(b * rate)] ** 2)))  # noqa: E731
    assert rms(1.2, 1.4) > 0.05  # ffmpeg's sine is 1/8 full scale (RMS 0.088): past the short tone, looped
    assert rms(plan.duration - 0.06, plan.duration - 0.02) < 0.2 * rms(1.2, 1.4)  # faded out


def test_master_is_faststart_and_verification_catches_a_file_that_is_not(
    tmp_path: Path, ffmpeg: str, mezzanine: LosslessVideo
) -> None:
    plan = EncodePlan(source=mezzanine, width=96, height=64, fps=16)
    boxes = mp4_top_level_boxes(encode(plan, tmp_path / "fast.mp4", ffmpeg))
    assert boxes.index("moov") < boxes.index("mdat")

    slow = tmp_path / "slow.mp4"
    subprocess.run(
        [
            ffmpeg,
            "-loglevel",
            "error",
            "-i",
            str(mezzanine.path),
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            str(slow),
        ],
        check=True,
    )
    assert mp4_top_level_boxes(slow).index("mdat") < mp4_top_level_boxes(slow).index("moov")
    with pytest.raises(VerificationError, match="no faststart"):
        verify_video(slow, expect(plan))


def test_verification_reports_every_mismatch(tmp_path: Path, ffmpeg: str, mezzanine: LosslessVideo) -> None:
    plan = EncodePlan(source=mezzanine, width=96, height=64, fps=16)
    path = encode(plan, tmp_path / "out.mp4", ffmpeg)
    wrong = VideoExpectation(codec="hevc", width=96, height=66, frames=34, fps=16, audio_codec="aac")
    with pytest.raises(VerificationError) as caught:
        verify_video(path, wrong)
    message = str(caught.value)
    for reason in (
        "codec is 'h264', expected 'hevc'",
        "height is 64, expected 66",
        "frames is 33, expected 34",
        "audio codec is None",
    ):
        assert reason in message


@pytest.mark.parametrize("name", ["h265", "vp9"])
def test_renditions_probe_with_their_codecs_and_tags(
    tmp_path: Path, ffmpeg: str, mezzanine: LosslessVideo, make_audio, name: str
) -> None:
    fmt = RENDITIONS[name]
    plan = EncodePlan(source=mezzanine, width=144, height=96, fps=24, fps_mode="duplicate")
    path = encode(
        plan,
        tmp_path / fmt.filename("rendition"),
        ffmpeg,
        fmt=fmt,
        audio=AudioTrack(path=make_audio(1.0)),
        tags=TAGS,
    )
    probe = verify_video(path, expect(plan, fmt, audio_codec=fmt.audio_codec, tags=TAGS))
    assert (probe.codec, probe.pix_fmt, probe.frames) == (fmt.codec, "yuv420p", 49)
    assert probe.container == ("mp4" if name == "h265" else "matroska")


def test_container_metadata_is_written(tmp_path: Path, ffmpeg: str, mezzanine: LosslessVideo) -> None:
    plan = EncodePlan(source=mezzanine, width=96, height=64, fps=16)
    path = encode(plan, tmp_path / "out.mp4", ffmpeg, tags=TAGS)
    with av.open(str(path)) as container:
        assert {k: container.metadata.get(k) for k in TAGS} == TAGS


@pytest.mark.parametrize("position", ["bottom-right", "top-left"])
def test_logo_lands_in_its_corner(tmp_path: Path, ffmpeg: str, logo_png: Path, position: str) -> None:
    source = write_lossless(flat_frames(5, 96, 160), tmp_path / "grey.mkv", fps=16)
    plan = EncodePlan(source=source, width=320, height=192, fps=16)
    watermark = Watermark(path=logo_png, position=position, opacity=1.0, width_fraction=0.25)
    frame = next(iter_frames(encode(plan, tmp_path / "logo.mp4", ffmpeg, watermark=watermark)))
    redness = frame[..., 0].astype(int) - frame[..., 1]
    corners = {"top-left": redness[8:30, 8:70], "bottom-right": redness[-30:-8, -70:-8]}
    assert corners[position].mean() > 150  # logo: red
    other = "top-left" if position == "bottom-right" else "bottom-right"
    assert abs(corners[other].mean()) < 10  # the other corner: untouched grey


def test_ntsc_rates_are_exact_fractions() -> None:
    assert fps_fraction(23.976) == Fraction(24000, 1001) and fps_fraction(29.97) == Fraction(30000, 1001)
    assert fps_fraction(24) == 24 and fps_fraction(16) == 16 and fps_fraction(12.5) == Fraction(25, 2)
    assert converted_frame_count(81, 16, 23.976) == 120  # floor(80 * 24000/1001/16) + 1


def _ffmpeg_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


def _raise_in_thread(thread: threading.Thread, error: type[BaseException]) -> None:
    """Raise ``error`` inside ``thread``, the way Prefect stops a timed-out or cancelled task."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(error))


@pytest.mark.parametrize("error", [KeyboardInterrupt, TimeoutError])
def test_an_encode_interrupted_in_its_thread_leaves_no_ffmpeg_running(
    tmp_path: Path, ffmpeg: str, error: type[BaseException]
) -> None:
    # A ten-minute source read at its native rate (-re): ffmpeg is still encoding when interrupted.
    source = ffmpeg_lib.input("testsrc=size=64x64:rate=10:duration=600", f="lavfi", re=None)
    output = ffmpeg_lib.output(source, str(tmp_path / "long.mp4"), vcodec="libx264", preset="ultrafast")
    raised: list[BaseException] = []

    def encode() -> None:
        try:
            run_ffmpeg(output, exe=ffmpeg, what="encoding long.mp4")
        except BaseException as err:  # the test looks at what came out
            raised.append(err)

    worker = threading.Thread(target=encode, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "long.mp4").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ffmpeg_children(), "ffmpeg did not start encoding"
        _raise_in_thread(worker, error)
        worker.join(timeout=10)

        assert not worker.is_alive()
        assert [type(err) for err in raised] == [error]
        assert not _ffmpeg_children()
    finally:  # never leave a ten-minute encode behind, whatever failed
        for leftover in _ffmpeg_children():
            leftover.kill()
