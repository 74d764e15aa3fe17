"""Running ffmpeg: which binary, one-shot runs and a pipe that streams raw RGB frames in.

The default binary is the static build shipped by imageio-ffmpeg (x264, x265, libvpx, libwebp, aac),
so nothing has to be installed system-wide. ``LYNX_FFMPEG_BINARY`` overrides it. Graphs are built
with ffmpeg-python; these helpers only run them and turn a failure into an ``EncodingError`` that
carries ffmpeg's own last words instead of a bare exit code.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import threading
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import ffmpeg
import numpy as np

from lynx.errors import ConfigurationError
from lynx.media.errors import EncodingError

_SETTING = "LYNX_FFMPEG_BINARY"
# Keep ffmpeg quiet but not silent: errors only, so its stderr fits in memory and is all signal.
_QUIET = ("-hide_banner", "-nostdin", "-loglevel", "error")
# Prefect stops a timed-out task by raising in its thread, which only happens between bytecodes: a
# wait blocked in C for a whole encode would not see it, so waits wake up this often.
_WAKE_SECONDS = 0.5


def ffmpeg_exe(override: Path | None = None) -> str:
    """Path of the ffmpeg binary to run: the override if given, else imageio-ffmpeg's static build."""
    if override is not None:
        found = shutil.which(str(override))
        if found is None:
            raise ConfigurationError(
                f"ffmpeg binary {override} does not exist or is not executable", setting=_SETTING
            )
        return found
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as err:
        raise ConfigurationError(f"no ffmpeg binary found ({err})", setting=_SETTING) from err


@lru_cache(maxsize=8)
def ffmpeg_version(exe: str) -> str:
    """First line of ``ffmpeg -version`` (recorded in the manifest)."""
    out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def fps_fraction(fps: float) -> Fraction:
    """A frame rate as the exact fraction ffmpeg expects (23.976 -> 24000/1001, 25 -> 25)."""
    # NTSC rates are written rounded (23.976, 29.97, 59.94); they mean n * 1000/1001.
    ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
    if fps != round(fps) and abs(fps - ntsc) < 1e-3:
        return ntsc
    return Fraction(fps).limit_denominator(1001)


def _last_words(stderr: str, what: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"ffmpeg failed while {what}: {lines[-1] if lines else 'no message'}"


def run_ffmpeg(stream: ffmpeg.nodes.OutputStream, *, exe: str, what: str) -> None:
    """Run a complete ffmpeg-python graph; ``what`` says in the error what we were making.

    Any exception while it runs (a stage timeout or cancellation raised in this thread, Ctrl-C)
    kills ffmpeg: left running it would keep encoding into a staging folder that is being removed.
    """
    process = (
        stream.global_args(*_QUIET).overwrite_output().run_async(cmd=exe, pipe_stdout=True, pipe_stderr=True)
    )
    try:
        while True:
            try:
                _, stderr = process.communicate(timeout=_WAKE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue  # nothing lost; waking lets an exception sent to this thread be raised
    except BaseException:
        process.kill()
        process.wait()
        raise
    if process.returncode != 0:
        raise EncodingError(_last_words(stderr.decode(errors="replace"), what))


class RawVideoPipe:
    """An ffmpeg process fed raw ``rgb24`` frames on stdin, one ``write`` per frame.

    stderr is drained by a thread: a full pipe would otherwise block ffmpeg, and with it our next
    ``write``. Use as a context manager; leaving the block with an exception kills ffmpeg.
    """

    def __init__(self, output: ffmpeg.nodes.OutputStream, *, exe: str, what: str) -> None:
        self._what = what
        self._process = (
            output.global_args(*_QUIET)
            .overwrite_output()
            .run_async(pipe_stdin=True, pipe_stderr=True, cmd=exe)
        )
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    @staticmethod
    def input(width: int, height: int, fps: float) -> ffmpeg.nodes.FilterableStream:
        """The ffmpeg-python input node that reads what this pipe writes."""
        return ffmpeg.input(
            "pipe:",
            format="rawvideo",
            pix_fmt="rgb24",
            s=f"{width}x{height}",
            framerate=str(fps_fraction(fps)),
        )

    def _read_stderr(self) -> None:
        for line in iter(self._process.stderr.readline, b""):
            self._stderr.append(line.decode(errors="replace"))

    def _failure(self) -> EncodingError:
        self._drain.join(timeout=5)
        return EncodingError(_last_words("".join(self._stderr), self._what))

    def write(self, frame: np.ndarray) -> None:
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, ValueError):
            self._process.wait()
            raise self._failure() from None

    def close(self) -> None:
        """Signal the end of the frames and wait for ffmpeg to finish writing."""
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        if self._process.wait() != 0:
            raise self._failure()
        self._drain.join(timeout=5)

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()

    def __enter__(self) -> RawVideoPipe:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()
