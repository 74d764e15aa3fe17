"""Time each delivery step on one machine, side by side, for a full-size Lynx video.

    PYTHONPATH=. python benchmarks/deliver.py            # 81 frames, 480x832 (full model default)
    PYTHONPATH=. python benchmarks/deliver.py --frames 17 --height 128 --width 224   # quick look

Prints a markdown table (step, seconds, what it made) for docs/PERFORMANCE.md. Content is
synthetic but video-like: colour gradients, moving discs and a fixed fine texture (encoders find
pure gradients unrealistically easy). Real-ESRGAN runs with random weights at the official sizes:
the cost does not depend on the values. On CPU it is timed on one frame and scaled to the video.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lynx.media.codecs import H264, RENDITIONS
from lynx.media.deliver import build_deliverables
from lynx.media.encode import AudioTrack, EncodePlan, Watermark, encode_animated_preview, encode_video
from lynx.media.ffmpeg import ffmpeg_exe
from lynx.media.intermediate import LosslessVideo, write_lossless
from lynx.media.previews import contact_sheet_indices, grab_frames, write_contact_sheet, write_poster
from lynx.media.probe import probe_video
from lynx.media.provenance import Provenance, sha256_file
from lynx.media.resize import output_size
from lynx.media.spec import DeliverySpec


def video_like_frames(count: int, height: int, width: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(0)
    texture = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.3 * np.sin(x / width * 3 + y / height)], -1) * 255
    for i in range(count):
        frame = base + texture
        for k, colour in enumerate(([250, 220, 60], [60, 200, 250], [240, 90, 120])):
            cx = width * (0.15 + 0.7 * ((i / count + k / 3) % 1))
            cy = height * (0.3 + 0.2 * k + 0.05 * np.sin(i / 6 + k))
            disc = (x - cx) ** 2 + (y - cy) ** 2 < (height / (7 + k)) ** 2
            frame[disc] = colour
        yield np.clip(frame, 0, 255).astype(np.uint8)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def time(self, step: str, what: Callable[[], object], note: str = "") -> object:
        start = time.perf_counter()
        value = what()
        self.rows.append((step, time.perf_counter() - start, note))
        print(f"{step:<58} {self.rows[-1][1]:7.2f} s  {note}", flush=True)
        return value

    def note(self, text: str) -> None:
        """Attach a note to the last row (for facts known only after the step ran)."""
        self.rows[-1] = (*self.rows[-1][:2], text)

    def markdown(self) -> str:
        lines = ["| step | seconds | notes |", "| --- | ---: | --- |"]
        lines += [f"| {step} | {seconds:.2f} | {note} |" for step, seconds, note in self.rows]
        return "\n".join(lines)


def _encode(plan: EncodePlan, path: Path, exe: str, fmt=H264, **kwargs) -> Path:
    crf = {"h264": 18, "h265": 24, "vp9": 32}[fmt.name]
    return encode_video(plan, fmt, path, crf=crf, preset="medium", exe=exe, **kwargs)


def _realesrgan_per_frame(height: int, width: int, tile: int = 256) -> list[tuple[str, float, str]]:
    import torch

    from lynx.media.realesrgan import RealEsrganUpscaler, RRDBNet, SRVGGNetCompact

    frame = next(video_like_frames(1, height, width))
    rows = []
    for name, model in (
        ("realesr-general-x4v3 (SRVGG, 32 convs)", SRVGGNetCompact(num_conv=32)),
        ("RealESRGAN_x4plus (RRDBNet, 23 blocks)", RRDBNet()),
    ):
        upscaler = RealEsrganUpscaler(model.eval(), tile=tile, overlap=16)
        if upscaler.device.type == "cpu" and isinstance(model, RRDBNet):
            # One tile is already ~a minute on 2 cores: time one tile with its overlap context
            # (what each tile of the frame really runs on) and scale by the tile count.
            crop = frame[: tile + 32, : tile + 32]
            start = time.perf_counter()
            upscaler.enlarge(crop)
            tiles = -(-height // tile) * -(-width // tile)
            seconds = (time.perf_counter() - start) * tiles
            rows.append((name, seconds, f"one {tile}+32 px tile x {tiles} tiles, {upscaler.device.type}"))
        else:
            start = time.perf_counter()
            upscaler.enlarge(frame)
            seconds = time.perf_counter() - start
            rows.append((name, seconds, f"one {width}x{height} frame, {upscaler.device.type}"))
        del model, upscaler
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--skip-realesrgan", action="store_true")
    args = parser.parse_args()
    exe = ffmpeg_exe()
    n, h, w = args.frames, args.height, args.width
    print(f"# {n} frames {w}x{h}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    table = Table()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        audio = tmp / "music.m4a"
        subprocess.run(
            [
                exe,
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=220:duration=30",
                "-c:a",
                "aac",
                str(audio),
            ],
            check=True,
        )
        logo = tmp / "logo.png"
        from PIL import Image

        Image.new("RGBA", (200, 80), (255, 255, 255, 200)).save(logo)

        frames = list(video_like_frames(n, h, w))
        mezz: LosslessVideo = table.time(
            "frames -> lossless FFV1 mezzanine (pipe)",
            lambda: write_lossless(iter(frames), tmp / "mezz.mkv", fps=16),
        )
        table.note(f"{mezz.path.stat().st_size / 1e6:.0f} MB")
        native = EncodePlan(source=mezz, width=w, height=h, fps=16)
        table.time("master H.264 crf 18 medium, native 16 fps", lambda: _encode(native, tmp / "m.mp4", exe))
        for target in (720, 1080):
            tw, th = output_size(w, h, target)
            plan = EncodePlan(source=mezz, width=tw, height=th, fps=16)
            table.time(f"master, Lanczos upscale to {tw}x{th}", lambda p=plan: _encode(p, tmp / "u.mp4", exe))
        for fps, mode in ((24, "duplicate"), (24, "interpolate"), (30, "interpolate")):
            plan = EncodePlan(source=mezz, width=w, height=h, fps=fps, fps_mode=mode)
            table.time(
                f"master, 16 -> {fps} fps {mode}",
                lambda p=plan: _encode(p, tmp / "f.mp4", exe),
                f"{plan.frames} frames",
            )
        plan = EncodePlan(source=mezz, width=1248, height=720, fps=24, fps_mode="interpolate")
        table.time("master, 24 fps interpolate + 720p", lambda: _encode(plan, tmp / "fu.mp4", exe))
        table.time(
            "master + AAC audio (looped/trimmed, fade)",
            lambda: _encode(native, tmp / "a.mp4", exe, audio=AudioTrack(path=audio)),
        )
        table.time(
            "master + logo overlay",
            lambda: _encode(native, tmp / "w.mp4", exe, watermark=Watermark(path=logo)),
        )
        for name in ("h265", "vp9"):
            fmt = RENDITIONS[name]
            table.time(
                f"rendition {name} (native)", lambda f=fmt: _encode(native, tmp / f.filename("r"), exe, fmt=f)
            )
        master = tmp / "m.mp4"

        def previews() -> None:
            stills = grab_frames(master, {n // 2, *contact_sheet_indices(n, 12)})
            write_poster(stills[n // 2], tmp / "poster.jpg", height=0, tags={})
            write_contact_sheet(
                {i: stills[i] for i in contact_sheet_indices(n, 12)},
                tmp / "sheet.png",
                columns=4,
                tile_height=144,
                fps=16,
                tags={},
            )
            encode_animated_preview(
                master, tmp / "p.webp", frames=n, source_fps=16, height=240, fps=8, exe=exe
            )

        table.time("previews (poster, contact sheet, animated WebP)", previews)
        table.time("probe + verify one video (PyAV, all packets)", lambda: probe_video(master))
        table.time(
            "sha256 of the master", lambda: sha256_file(master), f"{master.stat().st_size / 1e6:.1f} MB"
        )

        spec = DeliverySpec(height=720, fps=24, renditions=["h265"], audio=audio, watermark=logo)
        result = table.time(
            "build_deliverables end to end (720p, 24 fps interp., audio, logo, +h265)",
            lambda: build_deliverables(
                iter(frames), spec=spec, workdir=tmp, provenance=Provenance(job_id="bench")
            ),
        )
        for step, seconds in result.timings.items():
            table.rows.append((f"  of which: {step}", seconds, ""))

    if not args.skip_realesrgan:
        for name, seconds, note in _realesrgan_per_frame(h, w):
            table.rows.append((f"Real-ESRGAN {name}, per frame", seconds, note))
            table.rows.append((f"Real-ESRGAN {name}, {n} frames (x{n})", seconds * n, "extrapolated"))
            print(f"{name:<58} {seconds:7.2f} s per frame ({note})")
    print()
    print(table.markdown())


if __name__ == "__main__":
    main()
