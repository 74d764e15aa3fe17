"""Short real-face video clips made with ffmpeg: used by the evaluation tests and benchmarks/eval.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg


def pan_and_zoom(
    photo: Path,
    video: Path,
    *,
    frames: int = 16,
    fps: int = 8,
    size: tuple[int, int] = (320, 320),
    zoom_per_frame: float = 0.01,
    pan_per_frame: int = 3,
) -> Path:
    """An H.264 clip of ``size`` (width, height) that slowly zooms into ``photo`` while panning right.

    The photo is first cut to the clip's aspect ratio, keeping its top (where a portrait's face is):
    ffmpeg's zoompan would otherwise stretch it, and a stretched face is a worse match.
    """
    width, height = size
    graph = (
        f"crop=w='min(iw,ih*{width}/{height})':h='min(ih,iw*{height}/{width})':x='(iw-ow)/2':y=0,"
        f"scale={2 * width}:{2 * height},"
        f"zoompan=z='1+{zoom_per_frame}*on':x='iw/2-(iw/zoom/2)+on*{pan_per_frame}':y='ih/2-(ih/zoom/2)'"
        f":d=1:s={width}x{height}:fps={fps}"
    )
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-loop", "1", "-i", str(photo),
        "-vf", graph, "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18",
        "-pix_fmt", "yuv420p", str(video),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return video
