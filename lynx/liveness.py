"""Which process owns a piece of work, and whether it is still alive.

A stage row records its owner as ``host:pid:start``: the machine, the process id and the process's
start time (clock ticks since boot, from /proc; 0 where /proc is not there). On the same machine a
later run can then tell at once whether that process is gone: no process with that id, or one that
started at another time (the id was reused). Another machine's process cannot be asked; the caller
falls back on the owning flow run's Prefect state.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path


def process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 when /proc cannot tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # the command name (2nd field) may hold spaces and parentheses: count from the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of proc(5), the 20th after the name


@cache
def hostname() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: int

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}"

    @classmethod
    def parse(cls, text: str | None) -> Owner | None:
        if not text:
            return None
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        try:
            return cls(host, int(pid), int(rest))
        except ValueError:
            return None

    @property
    def local(self) -> bool:
        return self.host == hostname()

    def alive(self) -> bool:
        """Whether the process still runs (only answerable on its own machine: ``local``)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            pass
        # a process started at another time holds a reused id
        return not self.start or process_start(self.pid) in (0, self.start)


def this_process() -> Owner:
    pid = os.getpid()
    return Owner(hostname(), pid, process_start(pid))
