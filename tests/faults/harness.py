"""Real processes to hurt, for the fault tests and benchmarks/faults.py.

``PrivatePostgres``: a PostgreSQL server of our own (the package's initdb and pg_ctl, on a spare
loopback port, in a temporary folder), to stop and start at will; the shared server on 5432 is never
touched. As root (initdb refuses root) it runs as the ``postgres`` user, in a folder that user owns.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The folder of the server binaries (pg_config --bindir, else Debian's layout), or None."""
    pg_config = shutil.which("pg_config")
    candidates = []
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    usable = (path for path in candidates if (path / "initdb").exists() and (path / "pg_ctl").exists())
    return next(usable, None)


class PrivatePostgres:
    """``start()``, ``stop()`` (fast shutdown: sessions are cut), ``kill()`` (SIGKILL the postmaster),
    ``url(database)``; ``create_database()`` gives an empty database's postgresql+psycopg URL."""

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or postgres_bindir()
        if found is None:
            raise RuntimeError("PostgreSQL's initdb and pg_ctl are not installed (pg_config --bindir)")
        self.bindir = found
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lynx-private-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")
        user = "postgres"  # the superuser's name, whoever runs the server
        self.user = user if self._as else getpass.getuser()
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self._as, str(self.bindir / tool), *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            reason = done.stderr.strip() or done.stdout.strip()
            raise RuntimeError(f"{tool} failed ({done.returncode}): {reason}")

    def start(self) -> PrivatePostgres:
        # -k: the socket in our folder, not /var/run/postgresql (shared with the real server)
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), 9)

    def running(self) -> bool:
        try:
            psycopg.connect(self.url("postgres", driver=False), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def url(self, database: str, *, driver: bool = True) -> str:
        scheme = "postgresql+psycopg" if driver else "postgresql"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str = "lynx") -> str:
        with psycopg.connect(self.url("postgres", driver=False), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def outage(self, seconds: float) -> None:
        """Stop the server, wait ``seconds``, start it again (blocking)."""
        self.stop()
        time.sleep(seconds)
        self.start()

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
