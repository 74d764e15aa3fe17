"""Evaluation throughput on this machine: video frames scored per second, per recogniser and combined.

    PYTHONPATH=. python benchmarks/eval.py [--models-dir DIR] [--frames 81] [--repeats 3]

A clip of the full model's shape (81 frames, 832x480, 16 fps; scikit-image's astronaut panned
and zoomed by ffmpeg, so every frame shows a face) is scored against a mirrored reference photo
by each recogniser alone and by all of them together (one detection pass), at stride 1 and 4,
all in one run, taking turns. SFace and all three run again with onnxruntime's threads spinning
(its default, turned off in lynx) for comparison. Recognisers: the demo pack's SFace (ONNX),
IR-SE50 in torch (random weights: the speed does not depend on them; the real file is not
available here), and the same IR-SE50 exported to ONNX as a stand-in for insightface's ResNet-50
recognisers (w600k_r50 is an IResNet-50 of the same size class). Prints a Markdown table for
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import cv2
import onnxruntime
import skimage.data
import torch
from faces import Timing  # benchmarks/faces.py: median (fastest) of several runs

from lynx.evaluation import evaluate_video, load_evaluation_models, reference_embeddings
from lynx.faces import ensure_demo_pack, runtime
from lynx.faces.irse50 import IRSE50
from lynx.faces.similarity import iter_video_frames
from lynx.settings import LynxSettings
from tests.eval.clips import pan_and_zoom


def make_clip(folder: Path, frames: int) -> tuple[Path, Path]:
    photo, reference = folder / "astronaut.png", folder / "reference.jpg"
    astronaut = skimage.data.astronaut()[..., ::-1]
    cv2.imwrite(str(photo), astronaut)
    cv2.imwrite(str(reference), cv2.flip(astronaut, 1), [cv2.IMWRITE_JPEG_QUALITY, 80])
    video = pan_and_zoom(
        photo,
        folder / "clip.mp4",
        frames=frames,
        fps=16,
        size=(832, 480),
        zoom_per_frame=0.003,
        pan_per_frame=2,
    )
    return video, reference


def write_irse50(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    module = IRSE50().eval()
    weights, onnx_file = folder / "irse50.pth", folder / "irse50_r50.onnx"
    torch.save(module.state_dict(), weights)
    torch.onnx.export(
        module,
        torch.zeros(1, 3, 112, 112),
        str(onnx_file),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )
    return weights, onnx_file


@contextmanager
def onnxruntime_spinning() -> Iterator[None]:
    """Models loaded inside get onnxruntime's default busy-waiting threads (what lynx turned off),
    so the benchmark can show what that choice is worth on this machine."""
    import lynx.faces.analyzer
    import lynx.faces.embedders
    import lynx.faces.yunet

    modules = [lynx.faces.analyzer, lynx.faces.embedders, lynx.faces.yunet]

    def spinning():
        options = onnxruntime.SessionOptions()  # defaults: threads spin
        options.log_severity_level = 3
        return options

    for module in modules:
        module.session_options = spinning
    try:
        yield
    finally:
        for module in modules:
            module.session_options = runtime.session_options


def round_robin(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Time every action ``repeats`` times, taking turns (after one warm-up each), so that load from
    other processes falls on all of them alike; median (fastest) per action."""
    for action in actions.values():
        action()
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=None, help="LYNX_MODELS_DIR holding the demo pack")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lynx-eval-bench-") as scratch:  # clip, weights, demo pack
        run(args, Path(scratch))


def run(args: argparse.Namespace, folder: Path) -> None:
    base = LynxSettings(
        _env_file=None,
        home=folder / "home",
        face_device="cpu",
        **({"models_dir": args.models_dir} if args.models_dir else {}),
    )
    ensure_demo_pack(base)
    video, reference = make_clip(folder, args.frames)
    weights, onnx_file = write_irse50(folder)
    onnx_spec = {
        "path": str(onnx_file),
        "name": "irse50-onnx (r50 stand-in)",
        "preprocessing": {"mean": 127.5, "std": 127.5},
    }
    configurations = {
        "SFace (demo pack, ONNX)": ["pack"],
        "IR-SE50 (torch)": ["arcface_ir_se50"],
        "IR-SE50 exported to ONNX": [onnx_spec],
        "all three together": ["pack", "arcface_ir_se50", onnx_spec],
    }

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads; clip {args.frames} frames 832x480; "
        f"median (fastest) of {args.repeats} runs"
    )
    actions: dict[tuple[str, int], Callable[[], object]] = {}
    for stride in (1, 4):
        actions["decode only (PyAV, RGB)", stride] = partial(
            lambda s: sum(1 for _ in iter_video_frames(video, s)), stride
        )
    spinning = {
        f"{label}, onnxruntime threads spinning": specs
        for label, specs in configurations.items()
        if label.startswith(("SFace", "all"))
    }
    for label, specs in {**configurations, **spinning}.items():
        settings = base.model_copy(update={"eval_recognizers": specs, "arcface_weights_path": weights})
        with onnxruntime_spinning() if label in spinning else nullcontext():
            models = load_evaluation_models(settings)
        references = reference_embeddings(reference, models, settings)
        for stride in (1, 4):
            actions[label, stride] = partial(evaluate_video, video, references, models, stride=stride)
    timings = round_robin(actions, args.repeats)

    print("\n| recognisers | stride | frames scored | seconds | scored frames/s | video frames/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (label, stride), action in actions.items():
        result = action()
        if isinstance(result, int):  # decoding only
            print(row(label, stride, result, "", timings[label, stride], args.frames))
            continue
        means = ", ".join(f"{r.mean:.2f}" for r in result.by_recognizer.values() if r.mean is not None)
        note = f" ({result.frames_with_face} with a face; mean {means})"
        print(row(label, stride, result.frames_sampled, note, timings[label, stride], args.frames))
    print(f"\nload average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


def row(label: str, stride: int, scored: int, note: str, took: Timing, frames: int) -> str:
    """Seconds and rates as median (best): the best run is the one least disturbed by other load."""
    rates = [(count / took.median, count / took.fastest) for count in (scored, frames)]
    return (
        f"| {label} | {stride} | {scored}{note} | {took:.2f} | "
        + " | ".join(f"{median:.1f} ({best:.1f})" for median, best in rates)
        + " |"
    )


if __name__ == "__main__":
    main()
