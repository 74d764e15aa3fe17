"""Foundation timings, measured side by side in one run.

    PYTHONPATH=. python benchmarks/foundation_io.py [--mb 200]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth); starts its own SeaweedFS S3 server
(deployments/seaweedfs.py, with credentials, in a temporary folder).
Prints: artifact store upload/download throughput and Python peak memory (local folder vs S3),
job transitions per second (SQLite vs PostgreSQL), schema check cost (cold vs warm), and how long
an unreachable server takes to be reported.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import tempfile
import time
import tracemalloc
from pathlib import Path

import psycopg

from deployments.seaweedfs import SeaweedServer
from lynx.db import migrate
from lynx.db.models import JobStatus
from lynx.db.tracking import Tracker
from lynx.errors import ServiceUnavailableError
from lynx.settings import LynxSettings
from lynx.store import open_store

MB = 1000 * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_io(settings: LynxSettings, source: Path, workdir: Path) -> tuple[float, float, float, float]:
    store = open_store(settings)
    store.check()
    tracemalloc.start()
    started = time.perf_counter()
    stored = store.put_file(source)
    put_s = time.perf_counter() - started
    put_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    store.get_file(stored.key, workdir / f"back-{settings.store_backend}")
    get_s = time.perf_counter() - started
    get_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return put_s, get_s, put_peak, get_peak


def transitions_per_second(settings: LynxSettings, rounds: int) -> float:
    tracker = Tracker.from_settings(settings)
    subject = tracker.create_subject("bench")
    job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="bench")
    started = time.perf_counter()
    for _ in range(rounds):
        tracker.transition_job(job.id, JobStatus.RUNNING)
        tracker.transition_job(job.id, JobStatus.FAILED)
        tracker.transition_job(job.id, JobStatus.PENDING)
    elapsed = time.perf_counter() - started
    tracker.close()
    return 3 * rounds / elapsed


def schema_check(settings: LynxSettings) -> tuple[float, float]:
    started = time.perf_counter()
    migrate.upgrade_if_behind(settings)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    migrate.upgrade_if_behind(settings)
    return cold, time.perf_counter() - started


def time_to_error(action) -> float:
    started = time.perf_counter()
    try:
        action()
    except ServiceUnavailableError:
        return time.perf_counter() - started
    raise AssertionError("expected ServiceUnavailableError")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the file moved through the stores")
    parser.add_argument("--rounds", type=int, default=200, help="retry cycles (3 transitions each)")
    args = parser.parse_args()

    seaweed = SeaweedServer(tempfile.mkdtemp(prefix="lynx-bench-s3-")).start()
    pg_name = f"lynx_bench_{secrets.token_hex(4)}"
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{pg_name}"')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            source = workdir / "clip.bin"
            with open(source, "wb") as out:
                for _ in range(args.mb):
                    out.write(os.urandom(MB))
            base = {"home": workdir / "home"}
            local = LynxSettings(_env_file=None, **base)
            s3 = LynxSettings(
                _env_file=None,
                **base,
                store_backend="s3",
                s3_endpoint=seaweed.endpoint,
                s3_secure=False,
                s3_access_key=seaweed.access_key,
                s3_secret_key=seaweed.secret_key,
                s3_bucket="lynx-bench",
            )
            postgres = LynxSettings(
                _env_file=None, **base, database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_name}"
            )

            print(f"artifact store, {args.mb} MB file (part size {s3.s3_part_size // 2**20} MiB for S3)")
            for name, settings in (("local", local), ("s3 (SeaweedFS)", s3)):
                put_s, get_s, put_peak, get_peak = store_io(settings, source, workdir)
                print(
                    f"  {name:20s} put {args.mb / put_s:7.1f} MB/s ({put_s:5.2f} s)  "
                    f"get+verify {args.mb / get_s:7.1f} MB/s ({get_s:5.2f} s)  "
                    f"python peak put {put_peak / MB:5.1f} MB, get {get_peak / MB:5.1f} MB"
                )

            print(
                "schema check (upgrade_if_behind): cold = migrate an empty database, warm = already at head"
            )
            for name, settings in (("sqlite", local), ("postgres", postgres)):
                cold, warm = schema_check(settings)
                print(f"  {name:9s} cold {cold * 1000:7.1f} ms  warm {warm * 1000:6.1f} ms")

            print(f"job status transitions (compare-and-swap, one connection, {3 * args.rounds} transitions)")
            rates = {
                name: transitions_per_second(s, args.rounds)
                for name, s in (("sqlite", local), ("postgres", postgres))
            }
            for name, rate in rates.items():
                print(f"  {name:9s} {rate:7.0f} transitions/s")
            print(f"  ratio postgres/sqlite: {rates['postgres'] / rates['sqlite']:.2f}")

            print("time until an unreachable server is reported")
            dead_port = free_port()
            dead_s3 = s3.model_copy(update={"s3_endpoint": f"127.0.0.1:{dead_port}"})
            dead_db = LynxSettings(
                _env_file=None, **base, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{dead_port}/x"
            )
            s3_s = time_to_error(lambda: open_store(dead_s3).check())
            db_s = time_to_error(lambda: Tracker.from_settings(dead_db))
            print(f"  S3 (LYNX_S3_RETRIES={s3.s3_retries}):        {s3_s:5.2f} s")
            print(f"  database (connection refused): {db_s:5.2f} s")
    finally:
        seaweed.stop()
        shutil.rmtree(seaweed.folder, ignore_errors=True)
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
