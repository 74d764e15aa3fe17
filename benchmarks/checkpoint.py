"""What a sampling checkpoint costs next to a denoising step, measured side by side in one run.

    PYTHONPATH=. python benchmarks/checkpoint.py [--steps 6] [--repeats 5] [--no-s3]

1. Generations of the medium CPU config (4 blocks x 512 wide, Lynx full adapters, three passes per
   step, 33 frames at 256x256 = 2,304 tokens, fp32) without checkpoints and with a checkpoint after
   every step, stored by the sample stage's own background writer (``tasks.sample.CheckpointWriter``:
   SQLite tracking database, local artifact folder): time per step, and the ratio.
2. The parts of one checkpoint, at that size and at the 14B shape (81 frames at 480x832: latents
   1x16x21x60x104 fp32 plus UniPC's two model outputs and last sample, synthetic values): the CPU
   copies the loop makes (the only part the loop waits for), writing the file, its sha256, and
   storing it (``lynx.ledger.store_checkpoint``) in a local folder and in S3 (SeaweedFS ``weed mini``
   on loopback, ``deployments/seaweedfs.py``).

The arithmetic for the 14B model on a GPU is in docs/PERFORMANCE.md, "Sampling checkpoints".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments.seaweedfs import SeaweedServer  # noqa: E402
from lynx import ledger  # noqa: E402
from lynx.db.tracking import Tracker  # noqa: E402
from lynx.settings import LynxSettings  # noqa: E402
from lynx.store import open_store  # noqa: E402
from lynx_model.sampling import SamplingCheckpoint, SolverState  # noqa: E402

MB = 1000 * 1000
SHAPE_14B = (1, 16, 21, 60, 104)
MEDIUM = dict(
    num_layers=4,
    num_heads=4,
    head_dim=128,
    ffn_dim=1376,
    text_dim=64,
    face_dim=512,
    resampler_dim=256,
    num_queries=16,
    full_identity_dim=512,
    num_registers=16,
)
MEDIUM_CALL = dict(num_frames=33, height=256, width=256)  # 9 x 16 x 16 = 2,304 tokens


def synthetic_checkpoint(shape: tuple[int, ...], steps: int = 50) -> SamplingCheckpoint:
    generator = torch.Generator().manual_seed(0)

    def tensor() -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    solver = SolverState([tensor(), tensor()], [999, 980], 2, 2, tensor())
    timesteps = torch.linspace(999, 0, steps).long()
    return SamplingCheckpoint(tensor(), 10, timesteps, torch.linspace(1, 0, steps + 1), 42, solver, {})


def best(times: list[float]) -> str:
    return f"{1000 * statistics.median(times):.1f} ms (best {1000 * min(times):.1f})"


def checkpoint_parts(checkpoint: SamplingCheckpoint, worlds: dict, repeats: int, scratch: Path) -> dict:
    """Median times of the parts of one checkpoint; ``worlds``: name -> (tracker, store, job id)."""
    copies, writes, hashes = [], [], []
    stores: dict[str, list[float]] = {name: [] for name in worlds}
    path = scratch / "checkpoint.safetensors"
    for step in range(repeats):
        started = time.perf_counter()
        copy = SamplingCheckpoint(
            checkpoint.latents.clone(),
            checkpoint.steps_done,
            checkpoint.timesteps.clone(),
            checkpoint.sigmas.clone(),
            checkpoint.seed,
            SolverState(
                [t.clone() for t in checkpoint.solver.model_outputs],
                list(checkpoint.solver.timestep_list),
                checkpoint.solver.lower_order_nums,
                checkpoint.solver.this_order,
                checkpoint.solver.last_sample.clone(),
            ),
        )
        copies.append(time.perf_counter() - started)
        started = time.perf_counter()
        copy.save(path)
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        from lynx.media.provenance import sha256_file

        sha256_file(path)
        hashes.append(time.perf_counter() - started)
        for name, (tracker, store, job_id) in worlds.items():
            started = time.perf_counter()
            ledger.store_checkpoint(tracker, store, job_id, path, step + 1)
            stores[name].append(time.perf_counter() - started)
    size = path.stat().st_size
    return {"size": size, "copy": copies, "write": writes, "sha256": hashes, **stores}


def medium_generations(paths, steps: int, repeats: int, world, scratch: Path) -> dict[str, list[float]]:
    """Per-step times of generations without and with a checkpoint after every step (interleaved)."""
    from lynx_model import LynxPipeline
    from lynx_model.testing import tiny_face_embedding, tiny_reference_image
    from tasks.sample import CheckpointWriter
    from tasks.services import Services

    pipe = LynxPipeline.from_pretrained(paths.base, torch_dtype=torch.float32)
    pipe.load_lynx_adapter(paths.full)
    pipe.set_progress_bar_config(disable=True)
    identity = pipe.encode_identity(tiny_face_embedding(dim=512))
    reference = pipe.encode_reference(tiny_reference_image(size=256), seed=42)
    prompts = pipe.encode_prompt("a woman walking in the park")
    settings, tracker, store, job_id = world
    times: dict[str, list[float]] = {"plain": [], "checkpointed": []}
    for repeat in range(repeats):
        order = ("plain", "checkpointed") if repeat % 2 == 0 else ("checkpointed", "plain")
        for mode in order:
            stamps = [time.perf_counter()]
            options = {}
            writer = None
            if mode == "checkpointed":
                writer = CheckpointWriter(Services(settings, tracker, store), job_id, scratch)
                options = {"checkpoint_callback": writer, "checkpoint_steps": 1}
            pipe(
                prompt_embeds=prompts[0],
                negative_prompt_embeds=prompts[1],
                identity=identity,
                reference=reference,
                num_inference_steps=steps,
                seed=42,
                output_type="latent",
                progress_callback=lambda i, n, t, seen=stamps: seen.append(time.perf_counter()),
                **MEDIUM_CALL,
                **options,
            )
            if writer is not None:
                writer.close()
                assert len(writer.stored) >= 1 and not writer.failed
            step_times = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=False)]  # first step apart
            times[mode] += step_times
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per medium generation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true", help="leave out the S3 (SeaweedFS) store")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seaweed = None if args.no_s3 else SeaweedServer(root / "seaweedfs").start()
        try:
            worlds = {}
            for name in ["local"] + (["s3"] if seaweed else []):
                values = {"home": root / f"home-{name}"}
                if name == "s3":
                    values.update(
                        store_backend="s3",
                        s3_endpoint=seaweed.endpoint,
                        s3_secure=False,
                        s3_access_key=seaweed.access_key,
                        s3_secret_key=seaweed.secret_key,
                        s3_bucket="bench",
                    )
                settings = LynxSettings(_env_file=None, **values)
                tracker = Tracker.from_settings(settings)
                subject = tracker.create_subject("bench", consent_reference="benchmark")
                job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="p")
                worlds[name] = (settings, tracker, open_store(settings), job.id)
            stores = {name: world[1:] for name, world in worlds.items()}
            scratch = root / "scratch"
            scratch.mkdir()

            from lynx_model.testing import TinyModelSpec, write_tiny_models

            paths = write_tiny_models(root / "medium", variant="full", spec=TinyModelSpec(**MEDIUM))
            steps = medium_generations(paths, args.steps, args.repeats, worlds["local"], scratch)
            plain, checkpointed = statistics.median(steps["plain"]), statistics.median(steps["checkpointed"])
            print("\n## Medium config (4 x 512, full, 3 passes, 2,304 tokens, fp32): time per denoising step")
            print("| | per step, median (best) | steps timed |")
            print("| --- | ---: | ---: |")
            print(f"| no checkpoints | {best(steps['plain'])} | {len(steps['plain'])} |")
            print(
                f"| a checkpoint after every step (background writer, local store) | "
                f"{best(steps['checkpointed'])} | {len(steps['checkpointed'])} |"
            )
            ratio_best = min(steps["checkpointed"]) / min(steps["plain"])
            print(f"| ratio | {checkpointed / plain:.3f} (best {ratio_best:.3f}) | |")

            medium_shape = (1, 16, 9, 32, 32)
            rows = [("medium, latents 1x16x9x32x32", synthetic_checkpoint(medium_shape, args.steps))]
            rows.append(("14B, latents 1x16x21x60x104", synthetic_checkpoint(SHAPE_14B)))
            print("\n## One checkpoint, by part (median (best) of", args.repeats, "runs)")
            names = list(stores)
            header = ["checkpoint", "file", "CPU copies (loop waits)", "write file", "sha256"]
            header += [f"store ({name})" for name in names]
            print("| " + " | ".join(header) + " |")
            print("|" + " --- |" + " ---: |" * (len(header) - 1))
            for label, checkpoint in rows:
                parts = checkpoint_parts(checkpoint, stores, args.repeats, scratch)
                cells = [label, f"{parts['size'] / MB:.1f} MB", best(parts["copy"]), best(parts["write"])]
                cells += [best(parts["sha256"])] + [best(parts[name]) for name in names]
                print("| " + " | ".join(cells) + " |")
                if label.startswith("medium"):
                    waits = statistics.median(parts["copy"])
                    work = sum(statistics.median(parts[part]) for part in ("write", "sha256", "local"))
                    print(
                        f"  the loop waits {1000 * waits:.1f} ms per checkpoint = "
                        f"{100 * waits / plain:.2f} % of a medium step; "
                        f"the writer thread works {1000 * work:.0f} ms = "
                        f"{100 * work / plain:.2f} % of one (local store)"
                    )
                for name in names:
                    rate = parts["size"] / statistics.median(parts[name]) / MB
                    print(
                        f"  store ({name}): {rate:.0f} MB/s, with the tracking rows and the older "
                        "checkpoint's delete"
                    )
            print(f"\nmedium step without checkpoints: {1000 * plain:.0f} ms")
        finally:
            if seaweed is not None:
                seaweed.stop()


if __name__ == "__main__":
    main()
