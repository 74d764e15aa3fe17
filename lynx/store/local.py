"""The artifact store on a local (or mounted) folder: the embedded default, no server needed.

Layout under ``LYNX_ARTIFACTS_DIR`` (default ``LYNX_HOME/artifacts``)::

    objects/<key>        the bytes, exactly as stored
    meta/<key>.json      {"sha256": ..., "size": ..., "content_type": ...}
    tmp/                 files being written; published into objects/ by an atomic rename

A reader never sees a partial object: bytes are written and fsynced in ``tmp/`` (same filesystem),
then renamed into place. Metadata and bytes are published together under a short lock so two
writers of the same key cannot leave one's metadata beside the other's bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from lynx.errors import ArtifactNotFoundError, InvalidKeyError, ServiceUnavailableError
from lynx.store.base import ArtifactStore, StoredObject, content_key, validate_key, write_hashed

log = logging.getLogger(__name__)

SETTING = "LYNX_ARTIFACTS_DIR"


class LocalArtifactStore(ArtifactStore):
    """Artifacts in a folder; presigned URLs are ``file://`` URLs (only useful on this machine)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.location = f"local folder {self.root}"
        self._objects = self.root / "objects"
        self._meta = self.root / "meta"
        self._tmp = self.root / "tmp"
        self._lock = FileLock(str(self.root / "tmp" / "publish.lock"))

    # --- writing -------------------------------------------------------------------------------
    def _put_stream(self, source: BinaryIO, size: int, key: str | None, content_type: str) -> StoredObject:
        with self._service_errors("write to"):
            self._tmp.mkdir(parents=True, exist_ok=True)
            partial = self._tmp / f"{secrets.token_hex(8)}.partial"
            try:
                sha256, written = write_hashed(source, partial)
                stored = StoredObject(key or content_key(sha256), sha256, written, content_type)
                self._publish(partial, stored, content_addressed=key is None)
            finally:
                partial.unlink(missing_ok=True)
        log.debug("stored %s (%d bytes) in %s", stored.key, written, self.location)
        return stored

    def _publish(self, partial: Path, stored: StoredObject, *, content_addressed: bool) -> None:
        target, meta = self._object_path(stored.key), self._meta_path(stored.key)
        with self._locked():
            if content_addressed and target.exists() and meta.exists():
                return  # same key means same bytes: nothing to do
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                meta.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise InvalidKeyError(
                    f"artifact key {stored.key!r} runs through an existing object in {self.location}"
                ) from None
            if target.is_dir():
                raise InvalidKeyError(f"artifact key {stored.key!r} is a folder of other keys")
            record = {"sha256": stored.sha256, "size": stored.size, "content_type": stored.content_type}
            meta_partial = partial.with_suffix(".meta")
            try:
                write_hashed(io.BytesIO(json.dumps(record).encode()), meta_partial)  # fsynced
                os.replace(meta_partial, meta)
            finally:
                meta_partial.unlink(missing_ok=True)
            os.replace(partial, target)
            _fsync_dir(meta.parent)
            _fsync_dir(target.parent)

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._service_errors("delete from"), self._locked():
            self._object_path(key).unlink(missing_ok=True)
            self._meta_path(key).unlink(missing_ok=True)

    # --- reading -------------------------------------------------------------------------------
    def stat(self, key: str) -> StoredObject:
        validate_key(key)
        target, meta = self._object_path(key), self._meta_path(key)
        if not target.is_file():
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.location}")
        try:
            recorded = json.loads(meta.read_text())
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"artifact {key!r} in {self.location} has no checksum record ({meta} is missing); "
                "store files with `lynx store put`, not by copying them in"
            ) from None
        return StoredObject(key, recorded["sha256"], int(recorded["size"]), recorded["content_type"])

    def exists(self, key: str) -> bool:
        validate_key(key)
        return self._object_path(key).is_file()

    def _open_raw(self, key: str) -> AbstractContextManager[BinaryIO]:
        try:
            return open(self._object_path(key), "rb")
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.location}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)
        # Walk only the folder the prefix points into, not the whole store.
        start = self._objects / prefix.rsplit("/", 1)[0] if "/" in prefix else self._objects
        keys = []
        for folder, _dirs, files in os.walk(start):
            relative = Path(folder).relative_to(self._objects).as_posix()
            for name in files:
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def presigned_url(self, key: str, expires: int | None = None) -> str:
        self.stat(key)
        return self._object_path(key).as_uri()

    # --- health --------------------------------------------------------------------------------
    def check(self) -> None:
        with self._service_errors("write to"):
            for folder in (self._objects, self._meta, self._tmp):
                folder.mkdir(parents=True, exist_ok=True)
            probe = self._tmp / f"probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()

    # --- helpers -------------------------------------------------------------------------------
    def _object_path(self, key: str) -> Path:
        return self._objects / key

    def _meta_path(self, key: str) -> Path:
        return self._meta / f"{key}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        with self._lock:
            yield

    @contextmanager
    def _service_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise ServiceUnavailableError(
                f"cannot {action} the {self.location}: {err.strerror or err}", setting=SETTING
            ) from None


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
