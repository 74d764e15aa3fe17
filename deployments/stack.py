"""A local production-like lynx stack in one command: `make stack-up` / `make stack-down`.

    python -m deployments.stack up   [--state-dir .stack] [--port 4200]
    python -m deployments.stack down [--state-dir .stack]

`up` starts, all on loopback and all kept under the state folder:
  - the tiny RANDOM demo model and the demo face pack (`lynx models demo --dir STATE/models`),
  - a Prefect server on the local PostgreSQL (database `lynx_stack_prefect`, created if missing;
    the PostgreSQL server itself is never started or stopped here),
  - SeaweedFS with fresh credentials as the S3 store (deployments/seaweedfs.py),
  - the work pools and the GPU limit (`start-workers.sh setup`), every deployment of prefect.yaml,
  - one CPU and one GPU worker (`start-workers.sh cpu|gpu`; on a CPU machine the "GPU" worker runs
    the demo model on the CPU), tracking in the database `lynx_stack`,
then prints the UI address, the lines to export and commands to try (also in STATE/env.sh).

Every process started is recorded in STATE/pids.json with its command line; `down` sends SIGTERM
to exactly those (workers first, the server, then SeaweedFS), waits, SIGKILLs what is left, and is a
no-op when nothing recorded is running. A pid is only signalled while its command line is still the
recorded one, so a pid reused by an unrelated process is never touched.

Environment: LYNX_STACK_PG (admin URL of the PostgreSQL server, default
postgresql://postgres@127.0.0.1:5432/postgres), LYNX_STACK_DB_PREFIX (default lynx_stack),
LYNX_STACK_TRACKING_URL (the tracking database's URL, an existing database on any server; default
the database LYNX_STACK_DB_PREFIX on LYNX_STACK_PG, created if missing: the fault benchmark puts it
on a PostgreSQL of its own, to stop it without stopping the Prefect server's), and any LYNX_*
variable, which is passed on to the workers (e.g. LYNX_DELIVER_PRESET=ultrafast).

``respawn(state, name)`` starts a recorded process again the way a supervisor (systemd's
Restart=always) would after it died: the same command and environment (kept in STATE/spawn.json,
mode 0600), recorded in pids.json again; the fault benchmark uses it after its SIGKILLs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PIDS = "pids.json"
SPAWNS = "spawn.json"  # command and environment of each spawned process, for respawn()
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
DEMO_SETTINGS = '{"frames": 17, "height": 128, "width": 128, "steps": 8}'


class StackError(RuntimeError):
    """One line saying what failed and where its log is."""


# --- processes -------------------------------------------------------------------------------------
def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_recorded(entry: dict) -> bool:
    """Whether the recorded process is still running the recorded command (not a reused pid)."""
    return _cmdline(entry["pid"]) == entry["cmdline"]


def _read_pids(state: Path) -> list[dict]:
    try:
        return json.loads((state / PIDS).read_text())
    except (OSError, ValueError):
        return []


def _record(state: Path, name: str, pid: int, expect: str | None = None) -> None:
    """Add ``pid`` to STATE/pids.json; ``expect``: wait until its command line holds this text (a
    process recorded by start-workers.sh may still be its exec shim)."""
    # Right after exec, /proc/PID/cmdline reads empty for a moment: wait for the real one.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        parts = _cmdline(pid) or []
        cmdline = " ".join(parts)
        # start-workers.sh's exec shim (`python -c ... prefect worker start`) holds the text too:
        # wait for the exec, or the recorded command line is the shim's and never matches again
        if cmdline and (expect is None or (expect in cmdline and parts[1:2] != ["-c"])):
            break
        time.sleep(0.02)
    entries = _read_pids(state)
    entries.append({"name": name, "pid": pid, "cmdline": _cmdline(pid) or []})
    (state / PIDS).write_text(json.dumps(entries, indent=2))


def _spawn(state: Path, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``args`` in a session of its own (it outlives this command), logging to STATE/logs."""
    spawns = _read_spawns(state)
    spawns[name] = {"args": args, "env": env}
    (state / SPAWNS).touch(mode=0o600)
    (state / SPAWNS).write_text(json.dumps(spawns))  # the environment holds the S3 secret
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            args,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _record(state, name, process.pid)
    return process


def _read_spawns(state: Path) -> dict[str, dict]:
    try:
        return json.loads((state / SPAWNS).read_text())
    except (OSError, ValueError):
        return {}


def _forget_dead(state: Path, names: set[str]) -> None:
    """Drop the pids.json entries of ``names`` whose process is gone (before a respawn)."""
    entries = [e for e in _read_pids(state) if e["name"] not in names or _is_recorded(e)]
    (state / PIDS).write_text(json.dumps(entries, indent=2))


def respawn(state: Path, name: str, timeout: float = 120) -> int:
    """Start the recorded process ``name`` (prefect-server, workers-cpu, workers-gpu, seaweedfs)
    again after it died, as a supervisor would; returns its pid (for workers-*: the worker's)."""
    if name == "seaweedfs":
        from deployments.seaweedfs import SeaweedServer

        _forget_dead(state, {name})
        server = SeaweedServer.attach(state / "seaweedfs")
        server.kill()  # forgets a dead one; the same ports, folder and credentials again
        server.start(timeout, detached=True)
        _record(state, name, server.pid)
        return server.pid
    spec = _read_spawns(state).get(name)
    if spec is None:
        raise StackError(f"no recorded command for {name!r} in {state / SPAWNS}")
    if name.startswith("workers-"):
        _forget_dead(state, {name, "worker"})
        before = len(_lines(state / "workers.pids"))
        _spawn(state, name, spec["args"], spec["env"])
        return _record_workers(state, before, 1)[-1]
    _forget_dead(state, {name})
    process = _spawn(state, name, spec["args"], spec["env"])
    if name == "prefect-server":
        port = spec["args"][spec["args"].index("--port") + 1]
        _wait_http(f"http://127.0.0.1:{port}/api/health", timeout, process, state / "logs" / f"{name}.log")
    return process.pid


def _record_workers(state: Path, before: int, new: int, timeout: float = 30) -> list[int]:
    """Wait until start-workers.sh has written ``new`` worker pids after the ``before`` already in
    its pid file, record them as ``worker`` entries and return them."""
    deadline = time.monotonic() + timeout
    while len(pids := [int(p) for p in _lines(state / "workers.pids")]) < before + new:
        if time.monotonic() > deadline:
            raise StackError(f"the workers did not start; see {state / 'logs'}")
        time.sleep(0.1)
    for pid in pids[before:]:
        _record(state, "worker", pid, expect="worker start")
    return pids[before:]


def _wait_gone(entries: list[dict], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    left = [entry for entry in entries if _is_recorded(entry)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [entry for entry in left if _is_recorded(entry)]
    return left


def terminate(entries: list[dict], timeout: float = 20, echo=print, group: bool = False) -> None:
    """SIGTERM the recorded processes ``entries``, wait up to ``timeout``, SIGKILL what is left;
    ``group``: signal each one's process group (a process `_spawn` started leads its own)."""
    kill = os.killpg if group else os.kill
    for entry in entries:
        echo(f"lynx stack: SIGTERM -> {entry['name']} (pid {entry['pid']})")
        kill(entry["pid"], signal.SIGTERM)
    for entry in _wait_gone(entries, timeout):
        echo(f"lynx stack: SIGKILL -> {entry['name']} (pid {entry['pid']}), still up after {timeout:.0f} s")
        kill(entry["pid"], signal.SIGKILL)
    _wait_gone(entries, 10)


def down(state: Path, timeout: float = 20, echo=print) -> int:
    """Stop exactly the processes `up` recorded: SIGTERM, wait, then SIGKILL. Idempotent."""
    entries = _read_pids(state)
    running = [entry for entry in entries if _is_recorded(entry)]
    if not running:
        echo(f"lynx stack: nothing running from {state}")
        (state / PIDS).unlink(missing_ok=True)
        return 0
    # Workers first (one SIGTERM each: Prefect turns a second one into SIGKILL), then their
    # start-workers.sh scripts (normally gone with them), the server they talked to, SeaweedFS last.
    order = {"worker": 0, "workers-cpu": 1, "workers-gpu": 1, "prefect-server": 2, "seaweedfs": 3}
    for group in sorted({order.get(entry["name"], 1) for entry in running}):
        batch = [entry for entry in running if order.get(entry["name"], 1) == group and _is_recorded(entry)]
        terminate(batch, timeout, echo)
    (state / PIDS).unlink(missing_ok=True)
    echo("lynx stack: stopped")
    return 0


# --- pieces ----------------------------------------------------------------------------------------
def admin_url() -> str:
    """The PostgreSQL admin URL the stack's databases are made with (LYNX_STACK_PG)."""
    return os.environ.get("LYNX_STACK_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _free_port(preferred: int | None) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred or 0))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_databases(admin_url: str, names: list[str]) -> None:
    import psycopg

    parts = urlsplit(admin_url.replace("+psycopg", ""))
    try:
        with psycopg.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password,
            dbname=parts.path.lstrip("/") or "postgres",
            autocommit=True,
            connect_timeout=5,
        ) as connection:
            for name in names:
                exists = connection.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).fetchone()
                if not exists:
                    connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as err:
        raise StackError(
            f"PostgreSQL at {parts.hostname}:{parts.port or 5432} refused: {err}".strip()
        ) from None


def _db_url(admin_url: str, driver: str, name: str) -> str:
    parts = urlsplit(admin_url)
    auth = parts.username or "postgres"
    if parts.password:
        auth += f":{parts.password}"
    return f"postgresql+{driver}://{auth}@{parts.hostname or '127.0.0.1'}:{parts.port or 5432}/{name}"


def _wait_http(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{url} exited with {process.returncode} before answering; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{url} did not answer within {timeout:.0f} s; see {log}")


def _run(args: list[str], env: dict[str, str], state: Path, name: str) -> str:
    log = state / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    result = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        raise StackError(f"{' '.join(args[:3])} failed ({result.returncode}): {tail[0]}; see {log}")
    return result.stdout


def up(state: Path, port: int | None = 4200, echo=print) -> dict[str, str]:
    """Start the whole stack (see the module's doc); returns the environment a client needs."""
    from deployments.seaweedfs import SeaweedServer

    state.mkdir(parents=True, exist_ok=True)
    if any(_is_recorded(entry) for entry in _read_pids(state)):
        raise StackError(f"a stack from {state} is already running: `make stack-down` first")
    (state / PIDS).unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    try:
        return _up(state, port, base, echo, SeaweedServer)
    except BaseException:
        echo("lynx stack: start failed, stopping what was started")
        down(state, echo=echo)
        raise


def _up(state: Path, port: int | None, base: dict[str, str], echo, SeaweedServer) -> dict[str, str]:
    admin = admin_url()
    prefix = os.environ.get("LYNX_STACK_DB_PREFIX", "lynx_stack")
    given = os.environ.get("LYNX_STACK_TRACKING_URL")
    _ensure_databases(admin, ([] if given else [prefix]) + [f"{prefix}_prefect"])
    tracking = given or _db_url(admin, "psycopg", prefix)
    where = "LYNX_STACK_TRACKING_URL" if given else prefix
    echo(f"lynx stack: databases {where} (tracking) and {prefix}_prefect (Prefect) ready")

    # Prefect server first: it takes the longest to answer, the rest is built meanwhile.
    port = _free_port(port)
    api = f"http://127.0.0.1:{port}/api"
    server_log = state / "logs" / "prefect-server.log"
    server = _spawn(
        state,
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        {
            **base,
            "PREFECT_HOME": str(state / "prefect-server"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": _db_url(admin, "asyncpg", f"{prefix}_prefect"),
            # Slot leases of the GPU limit on disk: in memory (the default) a server restart loses
            # them and a slot held by a running batch is never given back (docs/flows.md)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        },
    )

    models = _run(
        [sys.executable, "-m", "lynx.cli", "models", "demo", "--dir", str(state / "models")],
        {**base, "PYTHONPATH": str(REPO_ROOT)},
        state,
        "models",
    )
    lynx_env = dict(line.split("=", 1) for line in models.splitlines() if line.startswith("LYNX_"))
    echo(f"lynx stack: demo face pack and tiny demo model in {state / 'models'}")

    seaweed = SeaweedServer(state / "seaweedfs").start(detached=True)
    _record(state, "seaweedfs", seaweed.pid)
    echo(f"lynx stack: SeaweedFS S3 on {seaweed.endpoint}")
    lynx_env |= seaweed.env() | {
        "LYNX_S3_BUCKET": "lynx-stack",
        "LYNX_DATABASE_URL": tracking,
        "LYNX_HOME": str(state / "lynx-home"),
    }

    _wait_http(f"{api}/health", 120, server, server_log)
    echo(f"lynx stack: Prefect server on {api}")
    client = {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(state / "prefect-client")}
    tools = {
        **client,
        "PREFECT": str(BIN / "prefect"),
        "PYTHON": sys.executable,
        "LYNX_GPU_WORKERS": "1",
        "LYNX_WORKER_PIDS": str(state / "workers.pids"),
    }
    _run(["bash", str(REPO_ROOT / "deployments" / "start-workers.sh"), "setup"], tools, state, "setup")
    _run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
        {**client, "LYNX_CODE_DIR": str(REPO_ROOT)},
        state,
        "deploy",
    )
    echo("lynx stack: pools lynx-cpu + lynx-gpu and every deployment of prefect.yaml created")

    worker_env = {
        **tools,
        **{k: v for k, v in os.environ.items() if k.startswith("LYNX_") and not k.startswith("LYNX_STACK")},
        **lynx_env,
        # Workers poll every 10 s by default; a local stack answers in seconds.
        "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
        "PREFECT_WORKER_PREFETCH_SECONDS": os.environ.get("PREFECT_WORKER_PREFETCH_SECONDS", "2"),
    }
    script = str(REPO_ROOT / "deployments" / "start-workers.sh")
    for kind in ("cpu", "gpu"):
        _spawn(state, f"workers-{kind}", ["bash", script, kind], worker_env)
    _record_workers(state, 0, 2)

    env = {"PREFECT_API_URL": api, **lynx_env}
    (state / "env.sh").write_text("".join(f"export {k}={_quote(v)}\n" for k, v in env.items()))
    os.chmod(state / "env.sh", 0o600)  # it holds the S3 secret
    _print_summary(state, api, env, echo)
    return env


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().split() if line.strip()]
    except OSError:
        return []


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _print_summary(state: Path, api: str, env: dict[str, str], echo) -> None:
    photo = REPO_ROOT / "lynx" / "assets" / "demo_face.jpg"
    echo("")
    echo(f"lynx stack is up. UI: {api.removesuffix('/api')}")
    echo(f"Export these (or `source {state / 'env.sh'}`):")
    for name, value in env.items():
        echo(f"  export {name}={_quote(value)}")
    echo("Then try:")
    echo(
        f"  prefect deployment run lynx/generate -p image={photo} "
        f"-p prompt='a person smiling at the camera' -p settings='{DEMO_SETTINGS}' --watch"
    )
    echo("  lynx campaign run examples/campaign.yaml --watch")
    echo("  lynx jobs list")
    echo(f"Stop it: make stack-down   (logs in {state / 'logs'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop a local lynx stack.")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=REPO_ROOT / ".stack",
        help="where every file and pid of the stack is kept (default .stack/)",
    )
    parser.add_argument("--port", type=int, default=4200, help="Prefect server port (a free one if taken)")
    args = parser.parse_args(argv)
    state = args.state_dir.resolve()
    try:
        if args.action == "up":
            up(state, args.port)
        else:
            down(state)
    except StackError as err:
        print(f"lynx stack: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
