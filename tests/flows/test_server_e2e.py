"""The production path for real: a `prefect server` on PostgreSQL, both work pools with process
workers, `prefect deploy --all` from prefect.yaml and `prefect deployment run lynx/generate`.

It checks that the run completes, that the GPU stages ran as a run of the `lynx-gpu/gpu-stages`
deployment picked up from the `lynx-gpu` pool, that the deliverable is in the S3 server, and that
cancelling a run leaves its job cancelled; and that a GPU worker SIGKILLed with its flow-run process
mid-sampling heals without an operator: the heartbeat automation marks the run Crashed, the
waiting run re-submits the job, which resumes from its checkpoint and completes. Everything is
torn down even when an assertion fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import REPO_ROOT, S3_ACCESS_KEY, S3_SECRET_KEY, free_port
from tests.flows.conftest import TINY_SETTINGS

pytestmark = [pytest.mark.server, pytest.mark.slow]

PREFECT = str(Path(sys.executable).with_name("prefect"))


class Processes:
    """Background processes of the test, stopped (SIGINT, then SIGKILL) whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.running.append((name, process))
        return process

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            path = self.logs / f"{name}-test.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        for _, process in reversed(self.running):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for _, process in reversed(self.running):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until(what: str, condition: Callable[[], object], timeout: float, interval: float = 1.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def stack(tmp_path, make_pg_database, s3_server, face_models_dir, tiny_model_dir) -> Iterator[dict]:
    """Prefect server (PostgreSQL), pools + limit, deployments and one worker per pool."""
    processes = Processes(tmp_path)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LYNX_", "PREFECT_"))}
    prefect_env = {
        **base,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    tracking_url = make_pg_database()
    lynx_env = {
        "LYNX_HOME": str(tmp_path / "lynx-home"),
        "LYNX_DATABASE_URL": tracking_url,
        "LYNX_STORE_BACKEND": "s3",
        "LYNX_S3_ENDPOINT": s3_server,
        "LYNX_S3_SECURE": "false",
        "LYNX_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "LYNX_S3_SECRET_KEY": S3_SECRET_KEY,
        "LYNX_S3_BUCKET": "lynx-e2e",
        "LYNX_MODELS_DIR": str(face_models_dir),
        "LYNX_BASE_MODEL_PATH": str(tiny_model_dir / "base"),
        "LYNX_ADAPTER_PATH": str(tiny_model_dir / "lynx_full"),
        "LYNX_DELIVER_PRESET": "ultrafast",
        "LYNX_GPU_POLL_SECONDS": "2",
        "HF_HUB_OFFLINE": "1",
    }
    server_db = make_pg_database().replace("postgresql+psycopg://", "postgresql+asyncpg://")
    try:
        processes.start(
            "server",
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            {
                **prefect_env,
                "PREFECT_HOME": str(tmp_path / "prefect-server"),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": server_db,
            },
        )
        wait_until("the Prefect server", lambda: healthy(f"{api}/health"), timeout=90, interval=0.5)

        def cli(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
            result = subprocess.run(
                args,
                env={**prefect_env, **extra},
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            return result

        cli("bash", "deployments/start-workers.sh", "setup", PREFECT=PREFECT, LYNX_GPU_WORKERS="1")
        cli(PREFECT, "--no-prompt", "deploy", "--all", LYNX_CODE_DIR=str(REPO_ROOT))
        worker_env = {
            **prefect_env,
            **lynx_env,
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        }

        def start_worker(pool: str, name: str) -> subprocess.Popen:
            args = [PREFECT, "worker", "start", "--pool", pool, "--name", name, "--limit", "2"]
            return processes.start(name, [*args, "--install-policy", "never"], worker_env)

        for pool in ("lynx-cpu", "lynx-gpu"):
            start_worker(pool, f"{pool}-test")
        yield {
            "start_worker": start_worker,
            "cli": cli,
            "api": api,
            "env": prefect_env,
            "lynx_env": lynx_env,
            "processes": processes,
            "tracking_url": tracking_url,
        }
    finally:
        processes.stop_all()


def flow_runs_of(api: str, deployment_name: str):
    """Flow runs of a deployment, asked of the test's server (not the session's test harness)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
        )


def job_status(tracking_url: str, job_id: int) -> str:
    engine = create_engine(tracking_url)
    try:
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
    finally:
        engine.dispose()


def test_deployed_generate_runs_on_both_pools_and_publishes_to_s3(stack, photos, monkeypatch):
    settings = TINY_SETTINGS.model_dump_json(exclude_none=True)
    run = stack["cli"](
        PREFECT,
        "deployment",
        "run",
        "lynx/generate",
        "--param",
        f"image={photos['astronaut']}",
        "--param",
        "prompt=a woman smiling at the camera",
        "--param",
        f"settings={settings}",
        "--watch",
        "--watch-interval",
        "2",
        "--watch-timeout",
        "240",
        timeout=300,
    )
    assert "Completed" in run.stdout, run.stdout[-2000:] + stack["processes"].tail("lynx-cpu")

    [generate] = flow_runs_of(stack["api"], "generate")
    [gpu] = flow_runs_of(stack["api"], "gpu-stages")
    assert generate.state.is_completed() and gpu.state.is_completed()
    assert gpu.work_pool_name == "lynx-gpu" and generate.work_pool_name == "lynx-cpu"
    assert gpu.parent_task_run_id is not None  # started by the generate run, as its subflow

    def span(run) -> str:
        waited = (run.end_time - run.expected_start_time).total_seconds()
        return f"{run.total_run_time.total_seconds():.1f} s running, {waited:.1f} s from scheduling"

    # for docs/PERFORMANCE.md (pytest -s): where one deployed job's time goes
    print(f"\ndeployed job: generate run {span(generate)}; GPU run {span(gpu)}")

    # the deliverable is in the S3 server: read the job's outcome from the tracking database
    for name, value in stack["lynx_env"].items():
        monkeypatch.setenv(name, value)
    from tests.flows.conftest import reset_process_state

    reset_process_state()
    from tasks.services import services

    svc = services()
    [job] = svc.tracker.list_jobs()
    assert job.status.value == "completed"
    assert svc.store.exists(f"deliverables/adhoc/{job.id}/master.mp4")
    decode = [r for r in svc.tracker.stage_runs(job.id) if r.stage == "decode"][0]
    assert decode.flow_run_id == str(gpu.id)

    # cancelling a run while it samples leaves its job cancelled
    slow = TINY_SETTINGS.model_copy(update={"steps": 1000, "frames": 17}).model_dump_json(exclude_none=True)
    stack["cli"](
        PREFECT,
        "deployment",
        "run",
        "lynx/generate",
        "--param",
        f"image={photos['hanks']}",
        "--param",
        "prompt=a man waiting",
        "--param",
        f"settings={slow}",
    )
    [second] = [run for run in flow_runs_of(stack["api"], "generate") if run.id != generate.id]
    new_job = wait_until(
        "the second job to start sampling",
        lambda: next(
            (
                j
                for j in svc.tracker.list_jobs()
                if j.id != job.id and any(r.stage == "sample" for r in svc.tracker.stage_runs(j.id))
            ),
            None,
        ),
        timeout=120,
    )
    stack["cli"](PREFECT, "flow-run", "cancel", str(second.id))
    wait_until(
        "the job to be cancelled",
        lambda: job_status(stack["tracking_url"], new_job.id) == "cancelled",
        timeout=90,
    )
    assert not svc.store.exists(f"deliverables/adhoc/{new_job.id}/master.mp4")

    def gpu_run_cancelled() -> bool:  # the cancelled run's GPU run is stopped too, not left sampling
        runs = [run for run in flow_runs_of(stack["api"], "gpu-stages") if run.id != gpu.id]
        return bool(runs) and runs[0].state.is_cancelled()

    wait_until("the GPU run to be cancelled with its parent", gpu_run_cancelled, timeout=60)


def test_a_gpu_worker_killed_mid_sampling_is_marked_crashed_and_its_job_resubmitted(
    stack, photos, monkeypatch
):
    from lynx.liveness import Owner
    from tests.flows.conftest import reset_process_state

    # the automation with a short window (heartbeats stay at Prefect's minimum, 30 s)
    stack["cli"](sys.executable, "-m", "deployments.automations", LYNX_HEARTBEAT_WINDOW_SECONDS="35")
    slow = TINY_SETTINGS.model_copy(update={"steps": 300}).model_dump_json(exclude_none=True)
    stack["cli"](
        PREFECT,
        "deployment",
        "run",
        "lynx/generate",
        "--param",
        f"image={photos['astronaut']}",
        "--param",
        "prompt=a woman waiting",
        "--param",
        f"settings={slow}",
    )
    for name, value in stack["lynx_env"].items():
        monkeypatch.setenv(name, value)
    reset_process_state()
    from tasks.services import services

    svc = services()

    def sampling_with_a_checkpoint():
        for job in svc.tracker.list_jobs():
            rows = [
                r
                for r in svc.tracker.stage_runs(job.id)
                if r.stage == "sample" and r.status.value == "running"
            ]
            if rows and svc.tracker.list_artifacts(job_id=job.id, kind="sampling_checkpoint"):
                return job, rows[0]
        return None

    job, sample = wait_until("sampling with a stored checkpoint", sampling_with_a_checkpoint, 180, 0.3)
    # a lost GPU machine: its worker and the flow-run process die at once, nobody reports it
    [gpu_worker] = [process for name, process in stack["processes"].running if name == "lynx-gpu-test"]
    gpu_worker.kill()
    os.kill(Owner.parse(sample.owner).pid, signal.SIGKILL)
    killed = time.monotonic()
    stack["start_worker"]("lynx-gpu", "lynx-gpu-replacement")

    def crashed():
        return next((run for run in flow_runs_of(stack["api"], "gpu-stages") if run.state.is_crashed()), None)

    dead = wait_until("the automation to mark the GPU run Crashed", crashed, 120)
    marked = time.monotonic() - killed
    [generate] = flow_runs_of(stack["api"], "generate")
    wait_until(
        "the generate run to end",
        lambda: flow_runs_of(stack["api"], "generate")[0].state.is_final(),
        240,
    )
    [generate] = flow_runs_of(stack["api"], "generate")
    healed = time.monotonic() - killed
    logs = stack["processes"].tail("lynx-cpu") + stack["processes"].tail("lynx-gpu-replacement")
    assert generate.state.is_completed(), f"{generate.state.message}\n{logs}"
    runs = {run.name: run for run in flow_runs_of(stack["api"], "gpu-stages")}
    assert runs[f"{dead.name}-resubmit-1"].state.is_completed()
    assert "no heartbeat" in dead.state.message
    assert svc.tracker.get_job(job.id).status.value == "completed"
    rows = svc.tracker.stage_runs(job.id)
    assert "running" not in {row.status.value for row in rows}
    resumed = [r for r in rows if r.stage == "sample" and r.status.value == "completed"][-1]
    assert resumed.metrics["resumed_at"] > 0  # sampling resumed from the checkpoint
    print(f"\nkilled GPU worker: Crashed after {marked:.0f} s, job completed {healed:.0f} s after the kill")
