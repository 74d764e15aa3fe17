"""Orchestration overhead per job of a small campaign: wall time minus model time.

    PYTHONPATH=. python benchmarks/orchestration.py [--subjects 2] [--prompts 3] [--batch-sizes 1,6]
                                                   [--postgres URL]

Runs the `lynx-campaign` flow in-process (embedded Prefect, GPU stages as in-process subflows) on
the tiny random demo model with the demo face pack (both built under LYNX_MODELS_DIR if missing,
as `lynx demo` does), once per GPU batch size, side by side in one process, each on a fresh
tracking database and artifact store (SQLite + local folder, or PostgreSQL with --postgres).

Model time is read from the run records: model loading, identity/reference/text encoding that was
really computed, sampling and the VAE decode (the decode stage records them as `model_seconds`;
encoding and storing the frames count as orchestration). Everything else
is what the pipeline adds around the model: Prefect task and flow runs, tracking rows, artifact
uploads and downloads, face analysis, delivery (ffmpeg encoding and verification), reports.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

PROMPTS = [
    "a person walking on a beach at sunset",
    "a person reading in a park",
    "a person smiling at the camera",
    "a person running in the city at night",
    "a person talking in a kitchen",
]
# Model work recorded as compute events (computed, not reused); sampling and decoding are on the
# decode stage's row. Model loading happens outside any job's stages.
MODEL_EVENTS = ("identity_tokens", "reference_features", "prompt_embeds", "negative_prompt_embeds")


def subject_photos(folder: Path, count: int) -> list[Path]:
    """Distinct real face photos (astronaut, Tom Hanks, and their mirror images)."""
    import cv2
    import insightface

    from lynx.assets import demo_face_path

    hanks = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png"))
    hanks = cv2.copyMakeBorder(hanks, 100, 100, 100, 100, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    bases = [cv2.imread(str(demo_face_path())), hanks]
    paths = []
    for index in range(count):
        image = bases[index % 2]
        if (index // 2) % 2:
            image = image[:, ::-1]
        path = folder / f"subject-{index}.jpg"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def write_campaign(folder: Path, subjects: int, prompts: int) -> Path:
    import yaml

    spec = {
        "name": f"bench-{subjects}x{prompts}",
        "settings": {"frames": 9, "height": 64, "width": 64, "steps": 4},
        "subjects": [
            {"id": f"subject-{i}", "photo": str(photo)}
            for i, photo in enumerate(subject_photos(folder, subjects))
        ],
        "prompts": PROMPTS[:prompts],
    }
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_once(campaign: Path, batch_size: int, workdir: Path, postgres: str | None) -> dict[str, float]:
    from flows.campaign import lynx_campaign
    from lynx.settings import get_settings
    from tasks.cache import memory
    from tasks.model import _loaded
    from tasks.services import reset_services, services

    home = workdir / f"batch-{batch_size}"
    os.environ["LYNX_HOME"] = str(home)
    os.environ["LYNX_GPU_BATCH_SIZE"] = str(batch_size)
    if postgres:
        os.environ["LYNX_DATABASE_URL"] = postgres
    reset_services()
    memory.clear()
    _loaded.clear()  # every run loads the model, as a fresh worker process would
    get_settings.cache_clear()

    started = time.perf_counter()
    outcomes = lynx_campaign(str(campaign))
    wall = time.perf_counter() - started
    assert all(o.status == "completed" for o in outcomes), [o.error_text for o in outcomes]

    tracker = services().tracker
    jobs = [o.job_id for o in outcomes]
    stage_seconds: dict[str, float] = {}
    model = 0.0
    for job_id in jobs:
        for run in tracker.stage_runs(job_id):
            stage_seconds[run.stage] = stage_seconds.get(run.stage, 0.0) + (run.duration_s or 0.0)
            if run.stage == "decode":
                model += run.metrics["model_seconds"]
    from sqlalchemy import select

    from lynx.db.models import ComputeEvent

    with tracker.transaction() as session:
        events = session.execute(
            select(ComputeEvent.kind, ComputeEvent.duration_s).where(
                ComputeEvent.kind.in_((*MODEL_EVENTS, "model_load")), ComputeEvent.reused.is_(False)
            )
        ).all()
    load = sum(duration or 0.0 for kind, duration in events if kind == "model_load")
    model += sum(duration or 0.0 for kind, duration in events if kind != "model_load")
    in_stages = sum(stage_seconds.values())
    return {
        "jobs": len(jobs),
        "wall": wall,
        "load": load,
        "model": model,
        "deliver": stage_seconds.get("deliver", 0.0),
        "face": stage_seconds.get("face", 0.0),
        "in_stages": in_stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,6", help="GPU batch sizes to compare, comma-separated")
    parser.add_argument("--postgres", help="postgresql+psycopg:// URL of an EMPTY database (default: SQLite)")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from lynx.demo import ensure_demo_setup
    from lynx.settings import LynxSettings

    settings = LynxSettings()
    model_dir = ensure_demo_setup(settings)
    os.environ.update(
        LYNX_MODELS_DIR=str(settings.resolved_models_dir),
        LYNX_BASE_MODEL_PATH=str(model_dir / "base"),
        LYNX_ADAPTER_PATH=str(model_dir / "lynx_full"),
        LYNX_DELIVER_PRESET="ultrafast",
    )
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as scratch, prefect_test_harness(server_startup_timeout=120):
        campaign = write_campaign(Path(scratch), args.subjects, args.prompts)
        results = {}
        for size in sizes:
            if args.postgres and size != sizes[0]:
                raise SystemExit("--postgres takes one batch size (the database must start empty)")
            results[size] = run_once(campaign, size, Path(scratch), args.postgres)

    backend = "PostgreSQL" if args.postgres else "SQLite + local folder"
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {backend}; "
        f"{args.subjects} subjects x {args.prompts} prompts, tiny model, 9 frames 64x64, 4 steps"
    )
    print()
    print(
        "| GPU batch size | jobs | wall s | model load s | model compute s | delivery s | face s "
        "| other stage work s | outside stages s | overhead per job s: (wall - model - load) / jobs |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, r in results.items():
        other = r["in_stages"] - r["model"] - r["deliver"] - r["face"]
        outside = r["wall"] - r["in_stages"] - r["load"]
        per_job = (r["wall"] - r["model"] - r["load"]) / r["jobs"]
        print(
            f"| {size} | {r['jobs']} | {r['wall']:.1f} | {r['load']:.2f} | {r['model']:.1f} | "
            f"{r['deliver']:.1f} | {r['face']:.1f} | {other:.1f} | {outside:.1f} | {per_job:.2f} |"
        )


if __name__ == "__main__":
    main()
