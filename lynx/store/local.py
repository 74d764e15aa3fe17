"""The artifact store on a local (or mounted) folder: the embedded default, no server needed.

Layout under ``LYNX_ARTIFACTS_DIR`` (default ``LYNX_HOME/artifacts``)::

    objects/<key>        the bytes, exactly as stored
    checksums/<key>      {"sha256": ..., "size": ..., "content_type": ...} (JSON)
    tmp/                 files being written; published into objects/ by an atomic rename

The checksum record sits at the same relative path as the bytes, in a tree of its own, so both trees
have the same shape and any keys the objects tree can hold, the records can too. (Stores written
before kept records at ``meta/<key>.json``, where ``x`` and ``x.json/b`` clashed; those records are
still read, and dropped when their key is rewritten or deleted.)

A reader never sees a partial object: bytes are written and fsynced in ``tmp/`` (same filesystem),
then renamed into place. Metadata and bytes are published together under a short lock so two
writers of the same key cannot leave one's metadata beside the other's bytes, and a reader takes the
record and opens the bytes under the same lock, so it never pairs one version's checksum with the
next one's bytes. (A store nobody can write, such as a read-only mount, has no writers: it is read
without the lock.) A put that fails
leaves no folder or temp file behind, and a delete removes the folders it empties, so neither can
block a later key.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from lynx.errors import ArtifactNotFoundError, InvalidKeyError, ServiceUnavailableError
from lynx.store.base import (
    ArtifactStore,
    StoredObject,
    check_expiry,
    content_key,
    validate_key,
    write_hashed,
)

log = logging.getLogger(__name__)

SETTING = "LYNX_ARTIFACTS_DIR"
# Longest file or folder name (bytes) on the filesystems lynx runs on; S3 has no such limit per segment.
MAX_SEGMENT_BYTES = 255


class LocalArtifactStore(ArtifactStore):
    """Artifacts in a folder; presigned URLs are ``file://`` URLs (only useful on this machine)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.location = f"local folder {self.root}"
        self._objects = self.root / "objects"
        self._records = self.root / "checksums"
        self._legacy_meta = self.root / "meta"
        self._tmp = self.root / "tmp"
        # Reads take this lock too, for a moment: poll often so a read waits for one publish, not 50 ms.
        self._lock = FileLock(str(self.root / "tmp" / "publish.lock"), poll_interval=0.002)

    # --- writing -------------------------------------------------------------------------------
    def _put_stream(self, source: BinaryIO, size: int, key: str | None, content_type: str) -> StoredObject:
        if key is not None:
            _check_segments(key)
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
        target, record = self._object_path(stored.key), self._record_path(stored.key)
        with self._locked():
            if content_addressed and target.is_file() and self._read_record(stored.key) is not None:
                return  # same key means same bytes: nothing to do
            self._make_room(stored.key)
            created: list[Path] = []
            new_record = not record.is_file()
            try:
                created += _make_folders(target.parent, self._objects)
                created += _make_folders(record.parent, self._records)
                fields = {"sha256": stored.sha256, "size": stored.size, "content_type": stored.content_type}
                record_partial = partial.with_suffix(".meta")
                try:
                    write_hashed(io.BytesIO(json.dumps(fields).encode()), record_partial)  # fsynced
                    os.replace(record_partial, record)
                finally:
                    record_partial.unlink(missing_ok=True)
                os.replace(partial, target)
            except BaseException:
                # Leave nothing a later put of this or another key could trip over.
                if new_record:
                    _remove_file(record)
                for folder in reversed(created):
                    _remove_folder(folder)
                raise
            legacy = self._legacy_meta_path(stored.key)
            if _remove_file(legacy):  # superseded by the record just written
                _prune_folders(legacy.parent, self._legacy_meta)
            _fsync_dir(record.parent)
            _fsync_dir(target.parent)

    def _make_room(self, key: str) -> None:
        """Refuse (``InvalidKeyError``) a key whose path runs through an object or onto a folder of keys."""
        for root in (self._objects, self._records):
            folder = root
            for segment in key.split("/")[:-1]:
                folder = folder / segment
                if folder.is_dir():
                    continue
                if folder.exists():
                    raise InvalidKeyError(
                        f"artifact key {key!r} runs through an existing object in {self.location}"
                    )
                break  # the rest of the path does not exist yet
            leaf = root / key
            if leaf.is_dir():
                try:
                    leaf.rmdir()  # an empty folder (left by an older version) holds no keys
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    raise InvalidKeyError(f"artifact key {key!r} is a folder of other keys") from None

    def delete(self, key: str) -> None:
        validate_key(key)
        _check_segments(key)
        with self._service_errors("delete from"), self._locked():
            for root, path in (
                (self._objects, self._object_path(key)),
                (self._records, self._record_path(key)),
                (self._legacy_meta, self._legacy_meta_path(key)),
            ):
                if _remove_file(path):
                    # Empty folders would refuse a later key naming one of them as an object.
                    _prune_folders(path.parent, root)

    # --- reading -------------------------------------------------------------------------------
    def stat(self, key: str) -> StoredObject:
        validate_key(key)
        _check_segments(key)
        if not self._object_path(key).is_file():
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.location}")
        return self._stored(key, self._read_record(key))

    def exists(self, key: str) -> bool:
        validate_key(key)
        _check_segments(key)
        return self._object_path(key).is_file()

    @contextmanager
    def _open_raw(self, key: str) -> Iterator[tuple[StoredObject, BinaryIO]]:
        # Writers replace the record and the bytes under this lock; an open file keeps the bytes
        # it was opened on, so record and bytes read here belong together.
        with self._service_errors("read from"), self._read_locked():
            expected = self.stat(key)
            try:
                raw = open(self._object_path(key), "rb")
            except FileNotFoundError:  # removed behind the store's back
                raise ArtifactNotFoundError(f"no artifact {key!r} in {self.location}") from None
        with raw:
            yield expected, raw

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
        check_expiry(expires)  # unused here, but refused as S3 would refuse it
        self.stat(key)
        return self._object_path(key).as_uri()

    # --- health --------------------------------------------------------------------------------
    def check(self) -> None:
        with self._service_errors("write to"):
            for folder in (self._objects, self._records, self._tmp):
                folder.mkdir(parents=True, exist_ok=True)
            probe = self._tmp / f"probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()

    # --- helpers -------------------------------------------------------------------------------
    def _object_path(self, key: str) -> Path:
        return self._objects / key

    def _record_path(self, key: str) -> Path:
        return self._records / key

    def _legacy_meta_path(self, key: str) -> Path:
        return self._legacy_meta / f"{key}.json"

    def _stored(self, key: str, recorded: dict | None) -> StoredObject:
        if recorded is None:
            raise ArtifactNotFoundError(
                f"artifact {key!r} in {self.location} has no checksum record "
                f"({self._record_path(key)} is missing); "
                "store files with `lynx store put`, not by copying them in"
            )
        return StoredObject(key, recorded["sha256"], int(recorded["size"]), recorded["content_type"])

    def _read_record(self, key: str) -> dict | None:
        """The checksum record of ``key``: from ``checksums/``, else from an older store's ``meta/``."""
        for path in (self._record_path(key), self._legacy_meta_path(key)):
            try:
                return json.loads(path.read_text())
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue  # a legacy meta/x.json may be the folder of legacy key x.json/...
        return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        with self._lock:
            yield

    @contextmanager
    def _read_locked(self) -> Iterator[None]:
        """The publish lock, unless this store cannot be written (read-only mount, no write access)."""
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES):
                raise
            yield  # a store nobody can write has no writers to wait for
            return
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _service_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise ServiceUnavailableError(
                f"cannot {action} the {self.location}: {err.strerror or err}", setting=SETTING
            ) from None


def _check_segments(key: str) -> None:
    """A key S3 takes may still name a file this filesystem cannot hold: say so, not "try again"."""
    for segment in key.split("/"):
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidKeyError(
                f"artifact key {key[:80]!r}... has a segment longer than {MAX_SEGMENT_BYTES} bytes, "
                "more than a local folder can hold (use the S3 store for such keys)"
            )


def _make_folders(folder: Path, root: Path) -> list[Path]:
    """Create ``folder`` and any missing parents up to ``root``; return those created, outermost first."""
    root.mkdir(parents=True, exist_ok=True)  # the store's own folders stay
    missing = []
    while folder != root and not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except BaseException:
        for path in reversed(created):
            _remove_folder(path)
        raise
    return created


def _prune_folders(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while they are empty."""
    while folder != root and root in folder.parents:
        if not _remove_folder(folder):
            return
        folder = folder.parent


def _remove_folder(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:
        return False  # not empty, or already gone
    return True


def _remove_file(path: Path) -> bool:
    """Unlink ``path`` if it is a file; False if there was none (or a folder stands there)."""
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    return True


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
