"""What every task needs: the settings, the run tracker and the artifact store, one of each per process.

Workers start a fresh process per flow run and take their configuration from LYNX_* variables
(the work pool's job template sets them), so the services are built from ``get_settings()`` on
first use and shared by every task of the run. Building them again for each task would reconnect
to the database and re-check the schema every time.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from lynx.db.tracking import Tracker
from lynx.settings import LynxSettings, get_settings
from lynx.store import ArtifactStore, open_store


@dataclass(frozen=True)
class Services:
    settings: LynxSettings
    tracker: Tracker
    store: ArtifactStore

    def workdir(self, *parts: str) -> Path:
        """A scratch folder under LYNX_WORKDIR (created)."""
        folder = self.settings.resolved_workdir.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


_lock = threading.Lock()
_services: dict[str, Services] = {}


def _identity(settings: LynxSettings) -> str:
    values = {
        name: value.get_secret_value() if isinstance(value, SecretStr) else value for name, value in settings
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def services(settings: LynxSettings | None = None) -> Services:
    """The services for ``settings`` (default: the process's LYNX_* environment), built once."""
    settings = settings or get_settings()
    key = _identity(settings)
    with _lock:
        if key not in _services:
            _services[key] = Services(settings, Tracker.from_settings(settings), open_store(settings))
        return _services[key]


def reset_services() -> None:
    """Close every tracker (tests switch databases between runs; workers never need this)."""
    with _lock:
        for built in _services.values():
            built.tracker.close()
        _services.clear()
