"""What best-of-N candidates cost on the demo model, relative to one video, side by side.

    PYTHONPATH=. python benchmarks/candidates.py [--candidates 1,2,4] [--rounds 2] [--batched]

Runs the `lynx` flow in-process (embedded Prefect, GPU stages as an in-process subflow, SQLite +
local folder, a fresh tracking database and store per run, the model loaded again per run as a
fresh GPU worker would) on the tiny random demo model with the demo face pack and the demo
settings (17 frames 128x128, 8 steps), once per candidate count per round, the counts interleaved
(1, 2, 4, then 4, 2, 1, ...) so that drift of a shared machine hits them alike.

From the run records: sampling (the `sample` stage), decoding and storing the intermediates
(`decode`), delivery (`deliver`: fetching the intermediates, scoring the candidates with the gate's
recogniser, then encoding and publishing the master; `scoring_seconds` is the scoring alone) and
the job's wall time. Ratios are to N = 1. ``--batched`` adds, for each N > 1, a run with the N
candidates in one pipeline call (LYNX_CANDIDATE_BATCH=N; on the CPU they otherwise run one by one).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

COLUMNS = ("sample", "decode", "scoring", "deliver", "wall")


def run_once(candidates: int, workdir: Path, index: int, batch: int = 0) -> dict[str, float]:
    from flows.generate import lynx
    from lynx.assets import demo_face_path
    from lynx.demo import DEMO_PROMPT, DEMO_SETTINGS
    from lynx.settings import get_settings
    from tasks.cache import memory
    from tasks.model import _loaded
    from tasks.services import reset_services, services

    os.environ["LYNX_HOME"] = str(workdir / f"run-{index}-n{candidates}-b{batch}")
    os.environ["LYNX_CANDIDATE_BATCH"] = str(batch)
    reset_services()
    memory.clear()
    _loaded.clear()
    get_settings.cache_clear()

    settings = DEMO_SETTINGS.model_copy(update={"candidates": candidates})
    started = time.perf_counter()
    outcome = lynx(str(demo_face_path()), DEMO_PROMPT, settings=settings)
    wall = time.perf_counter() - started
    assert outcome.status == "completed", outcome.error_text
    rows = {run.stage: run for run in services().tracker.stage_runs(outcome.job_id)}
    return {
        "sample": rows["sample"].duration_s,
        "decode": rows["decode"].duration_s,
        "scoring": rows["deliver"].metrics.get("scoring_seconds", 0.0),
        "deliver": rows["deliver"].duration_s,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="1,2,4", help="candidate counts, comma-separated (1 first)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batched", action="store_true", help="also each N > 1 in one pipeline call")
    args = parser.parse_args()
    counts = [int(n) for n in args.candidates.split(",")]
    if counts[0] != 1:
        raise SystemExit("the first count must be 1: ratios are to one candidate")

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
        LYNX_FACE_DEVICE="cpu",
    )
    cases = [(n, 0) for n in counts] + ([(n, n) for n in counts if n > 1] if args.batched else [])
    results: dict[tuple[int, int], list[dict[str, float]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as scratch, prefect_test_harness(server_startup_timeout=120):
        run_once(1, Path(scratch), -1)  # warm-up: imports, first flow run
        for round_index in range(args.rounds):
            order = cases if round_index % 2 == 0 else cases[::-1]
            for n, batch in order:
                results[(n, batch)].append(run_once(n, Path(scratch), round_index, batch))

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; tiny demo model, 17 frames 128x128, 8 steps; "
        f"median of {args.rounds} rounds"
    )
    print()
    print(
        "| candidates | sample s | decode s | scoring s | deliver s | job wall s "
        "| sample+decode vs N=1 | wall vs N=1 |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {column: statistics.median(r[column] for r in results[(1, 0)]) for column in COLUMNS}
    for n, batch in cases:
        m = {column: statistics.median(r[column] for r in results[(n, batch)]) for column in COLUMNS}
        model = (m["sample"] + m["decode"]) / (base["sample"] + base["decode"])
        label = f"{n} (one batch)" if batch else str(n)
        print(
            f"| {label} | {m['sample']:.2f} | {m['decode']:.2f} | {m['scoring']:.2f} | "
            f"{m['deliver']:.2f} | {m['wall']:.1f} | {model:.2f}x | {m['wall'] / base['wall']:.2f}x |"
        )


if __name__ == "__main__":
    main()
