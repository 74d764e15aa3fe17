"""Results computed once and reused: face analyses, identity tokens, reference features, text embeddings.

A result is looked up in this process's memory first, then in the artifact store under
``cache/<kind>/<cache key>`` (so a later GPU run, on any machine, finds it), and computed only when
neither has it. Cache keys are derived from everything the result depends on: input checksums,
settings and a fingerprint of the model weights. Every lookup is recorded as a compute event
(computed or reused) so a campaign's records show what was really computed, and every use is
recorded as an artifact of the job, so biometric results fall under the subject's retention purge.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from lynx.db.models import ArtifactKind
from lynx.errors import InputError
from lynx.store import StoredObject
from tasks.services import services

T = TypeVar("T")


def cache_key(*parts: Any) -> str:
    """A stable key for everything a result depends on (order matters, types are normalised)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:40]


@dataclass(frozen=True)
class CachedKind(Generic[T]):
    """How one kind of result is stored: its file suffix, (de)serialisers and memory budget."""

    name: str
    artifact_kind: ArtifactKind
    suffix: str
    save: Callable[[T, Path], None]
    load: Callable[[Path], T]
    memory_items: int = 16

    def key(self, cache_key: str) -> str:
        return f"cache/{self.name}/{cache_key}{self.suffix}"


@dataclass(frozen=True)
class Cached(Generic[T]):
    value: T
    stored: StoredObject
    reused: bool


class _Memory:
    """Per-process LRU, bounded per kind (reference features of the 14B model are ~200 MB each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, OrderedDict[str, Any]] = {}

    def get(self, kind: str, key: str) -> Any | None:
        with self._lock:
            items = self._items.get(kind)
            if items is None or key not in items:
                return None
            items.move_to_end(key)
            return items[key]

    def put(self, kind: str, key: str, value: Any, limit: int) -> None:
        with self._lock:
            items = self._items.setdefault(kind, OrderedDict())
            items[key] = value
            items.move_to_end(key)
            while len(items) > limit:
                items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


memory = _Memory()


def get_or_compute(kind: CachedKind[T], key: str, compute: Callable[[], T], *, job_id: int) -> Cached[T]:
    """The result of ``kind`` under ``key``: from memory, else the store, else ``compute()``.

    Records one compute event (``reused`` or not) and one artifact row for the job.
    """
    svc = services()
    store_key = kind.key(key)
    started = time.monotonic()
    hit = memory.get(kind.name, key)
    if hit is not None:
        value, stored = hit
        result = Cached(value, stored, reused=True)
    elif svc.store.exists(store_key):
        with tempfile.TemporaryDirectory(dir=svc.workdir("cache")) as scratch:
            local = Path(scratch) / f"result{kind.suffix}"
            stored = svc.store.get_file(store_key, local)
            value = kind.load(local)
        result = Cached(value, stored, reused=True)
    else:
        value = compute()
        with tempfile.TemporaryDirectory(dir=svc.workdir("cache")) as scratch:
            local = Path(scratch) / f"result{kind.suffix}"
            kind.save(value, local)
            stored = svc.store.put_file(local, key=store_key)
        result = Cached(value, stored, reused=False)
    try:
        svc.tracker.record_artifact(result.stored, kind=kind.artifact_kind, job_id=job_id)
    except InputError:  # the subject was erased (or purged) meanwhile: keep nothing made for it
        if not result.reused:
            svc.store.delete(store_key)
        raise
    memory.put(kind.name, key, (result.value, result.stored), kind.memory_items)
    svc.tracker.record_compute_event(
        kind.name, key, reused=result.reused, job_id=job_id, duration_s=time.monotonic() - started
    )
    return result
