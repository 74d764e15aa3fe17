"""Riding out short outages of the tracking database and the artifact store.

A database or S3 restart takes seconds to tens of seconds; a batch job that fails at the first
refused connection turns every such restart into failed jobs. Calls wrapped in ``ride_out`` are
repeated with exponential backoff while they fail on a *transient* ``ServiceUnavailableError``
(connection refused or dropped, S3 5xx), for at most ``LYNX_OUTAGE_TOLERANCE_SECONDS``. Logical
errors (a missing row, an illegal transition, bad credentials, a 4xx) are never repeated. When the
tolerance runs out the error is re-raised as one line naming the setting.

The wrapped call must be safe to repeat whole: one short transaction, or one store call. A commit
whose acknowledgement is lost in the outage is the one case a repeat cannot tell apart; tracker
writes that matter are compare-and-swap updates, which a repeat re-validates.
"""

from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential,
)

from lynx.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

SETTING = "LYNX_OUTAGE_TOLERANCE_SECONDS"
T = TypeVar("T")

# Set while a call is being ridden out: a wrapped call made inside another one (a tracker method
# calling another) runs once, so the outer call alone bounds the total wait by the tolerance.
_riding = contextvars.ContextVar("lynx_riding_out", default=False)


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is an outage worth waiting out (not a logical or configuration error)."""
    return isinstance(err, ServiceUnavailableError) and err.transient


def ride_out(call: Callable[[], T], *, tolerance: float, what: str) -> T:
    """``call()``, repeated with backoff (0.25 s doubling to 5 s) while it fails transiently, for at
    most ``tolerance`` seconds. ``what`` names the call in logs."""
    if tolerance <= 0 or _riding.get():
        return call()
    started = time.monotonic()

    def before_sleep(state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: %s; retrying in %.1f s (%.0f of %g s allowed by %s)",
            what, err, state.upcoming_sleep, time.monotonic() - started, tolerance, SETTING,
        )

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        # stop_before_delay: no attempt starts that the next backoff would push past the tolerance
        stop=stop_before_delay(tolerance),
        wait=wait_exponential(multiplier=0.25, max=5.0),
        before_sleep=before_sleep,
        reraise=True,
    )
    token = _riding.set(True)
    try:
        return retrying(call)
    except ServiceUnavailableError as err:
        if not err.transient:
            raise
        if retrying.statistics.get("attempt_number", 1) <= 1:  # tolerance too short to retry
            raise
        waited = time.monotonic() - started
        raise ServiceUnavailableError(
            f"{err.message}; still failing after {waited:.0f} s of retries "
            f"({SETTING}={tolerance:g})",
            setting=err.setting,
        ) from None
    finally:
        _riding.reset(token)


class Spool:
    """Writes that record how something ended, kept on local disk while the database is out of
    reach for longer than the tolerance, and replayed once it answers again (JSON lines).

    Several processes of one machine may share a spool: replay holds an exclusive lock on it, and
    every spooled write is guarded by the row's state when replayed, so a second replay is a no-op.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as spool:
            fcntl.flock(spool, fcntl.LOCK_EX)
            spool.write(json.dumps(record, default=str) + "\n")
            spool.flush()
            os.fsync(spool.fileno())

    def pending(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def replay(self, apply: Callable[[dict[str, Any]], bool | None]) -> int:
        """``apply`` each record in order; records whose apply fails on a transient error stay
        spooled (the rest are done or, on a logical error, dropped with a warning). Returns how many
        were applied."""
        if not self.pending():
            return 0
        applied = 0
        with open(self.path, "r+", encoding="utf-8") as spool:
            fcntl.flock(spool, fcntl.LOCK_EX)
            records = [json.loads(line) for line in spool if line.strip()]
            kept: list[dict[str, Any]] = []
            for record in records:
                if kept:  # keep the order: nothing jumps a record still waiting
                    kept.append(record)
                    continue
                try:
                    if apply(record) is not False:  # False: overtaken by a later write, nothing done
                        applied += 1
                except ServiceUnavailableError as err:
                    if not err.transient:
                        raise
                    kept.append(record)
                except Exception as err:  # noqa: BLE001 -- overtaken by a later write: nothing to do
                    log.warning("dropped spooled tracking write %s: %s", record, err)
            # truncated, never unlinked: a writer waiting for the lock holds the same file open
            spool.seek(0)
            spool.truncate()
            spool.write("".join(json.dumps(r, default=str) + "\n" for r in kept))
            spool.flush()
            os.fsync(spool.fileno())
        return applied
