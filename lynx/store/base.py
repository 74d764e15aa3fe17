"""The artifact store interface shared by the local-folder and the S3 backends.

Objects are addressed by keys like ``sha256/3f/3fa2...`` (content-addressed, the default) or by an
explicit, validated key. Every object carries the sha256 of its bytes, recorded when it was written,
and every read verifies it: a corrupted or truncated object is reported, never handed on.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import re
import secrets
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lynx.errors import ChecksumMismatchError, InputError, InvalidKeyError

CHUNK_SIZE = 1024 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# get_bytes() is for manifests, embeddings and other small things; videos go through files/streams.
MAX_BYTES_IN_MEMORY = 64 * 1024 * 1024
MAX_KEY_BYTES = 1024  # S3's limit on object names
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Control (C0/C1), format (bidi overrides, zero-width), line/paragraph separators and lone surrogates:
# invisible or misleading in logs and listings, and surrogates cannot even be encoded as UTF-8.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class StoredObject:
    """What the store knows about one object: enough to find it again and to verify it."""

    key: str
    sha256: str
    size: int
    content_type: str = DEFAULT_CONTENT_TYPE


def content_key(sha256: str) -> str:
    """The content-addressed key of bytes whose sha256 is ``sha256`` (fan-out by the first byte)."""
    if not _SHA256_HEX.fullmatch(sha256):
        raise InvalidKeyError(f"not a lowercase sha256 hex digest: {sha256!r}")
    return f"sha256/{sha256[:2]}/{sha256}"


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` unchanged if it stays inside the store, else raise ``InvalidKeyError``.

    Keys are relative, '/'-separated paths: no leading '/', no '\\', no empty, '.' or '..' segment,
    no control, format or line/paragraph separator characters (Unicode categories Cc, Cf, Zl, Zp; lone
    surrogates too). A ``prefix`` (for listing) may be empty or end with '/'.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"artifact key must be a string, got {type(key).__name__}")
    if prefix:
        if key == "":
            return key
        body = key[:-1] if key.endswith("/") else key
    else:
        body = key
    shown = key.encode("unicode_escape").decode("ascii")
    if not body:
        raise InvalidKeyError("artifact key is empty")
    if _has_control_chars(key):
        raise InvalidKeyError(f"artifact key {shown!r} contains control or format characters")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"artifact key is longer than {MAX_KEY_BYTES} bytes: {shown[:80]!r}...")
    # A drive ("C:", "C:/x") is absolute on Windows; "a:foo" is an ordinary S3 key.
    if body.startswith("/") or "\\" in body or re.match(r"[A-Za-z]:(/|\\|$)", body):
        raise InvalidKeyError(f"artifact key {shown!r} must be a relative path with '/' separators")
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"artifact key {shown!r} has an empty, '.' or '..' segment")
    return key


def check_expiry(expires: int | None) -> None:
    """Refuse a presigned URL lifetime S3 would not honour (``InputError``)."""
    if expires is not None and not 1 <= expires <= MAX_PRESIGN_SECONDS:
        raise InputError(f"a download URL lives 1 to {MAX_PRESIGN_SECONDS} seconds (7 days), not {expires}")


def _has_control_chars(key: str) -> bool:
    if key.isascii():  # the common case, without a per-character lookup
        return _CONTROL_CHARS.search(key) is not None
    return any(unicodedata.category(char) in _BAD_CATEGORIES for char in key)


class HashingReader(io.RawIOBase):
    """Wraps a binary stream and hashes every byte read through it (uploads hash what they send)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class VerifyingReader(HashingReader):
    """A streaming reader that raises ``ChecksumMismatchError`` at end of stream if the bytes are wrong.

    Consumers of ``open_read`` get bytes as they arrive (no whole-file loads); whoever reads to the
    end learns whether what they read was intact.
    """

    def __init__(self, raw: BinaryIO, expected: StoredObject, where: str) -> None:
        super().__init__(raw)
        self._expected = expected
        self._where = where
        self._checked = False

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        data = super().read(size)
        if not data and not self._checked:
            self._checked = True
            check_digest(self._expected, self.hexdigest(), self.bytes_read, self._where)
        return data

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(CHUNK_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def check_digest(expected: StoredObject, sha256: str, size: int, where: str) -> None:
    if sha256 != expected.sha256 or size != expected.size:
        raise ChecksumMismatchError(
            f"artifact {expected.key!r} in {where} is corrupt: read {size} bytes with sha256 {sha256}, "
            f"expected {expected.size} bytes with sha256 {expected.sha256}"
        )


def write_hashed(source: BinaryIO, path: Path) -> tuple[str, int]:
    """Stream ``source`` into a new file at ``path`` (fsynced); returns its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as out:
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def copy_verified(source: BinaryIO, dest: Path, expected: StoredObject, where: str) -> None:
    """Stream ``source`` into a temp file beside ``dest``, verify it, then atomically rename it.

    On a mismatch the temp file is removed and ``dest`` (if it existed) is left as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(6)}")
    try:
        sha256, size = write_hashed(source, partial)
        check_digest(expected, sha256, size, where)
        partial.replace(dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class ArtifactStore(ABC):
    """Where lynx keeps everything it produces; one interface over a local folder and S3/MinIO."""

    #: Human-readable location used in messages, e.g. "s3://lynx at minio:9000".
    location: str

    # --- writing -------------------------------------------------------------------------------
    def put_file(
        self, path: str | Path, *, key: str | None = None, content_type: str | None = None
    ) -> StoredObject:
        """Store a file, streaming it. ``key=None`` stores it under its content-addressed key;
        ``content_type=None`` guesses it from the file name."""
        path = Path(path)
        if key is not None:
            validate_key(key)
        if content_type is None:
            content_type = mimetypes.guess_type(path.name)[0] or DEFAULT_CONTENT_TYPE
        try:
            source = open(path, "rb")
        except OSError as err:
            raise InputError(f"cannot read {path}: {err.strerror or err}") from None
        with source:
            return self._put_stream(source, os.fstat(source.fileno()).st_size, key, content_type)

    def put_bytes(
        self, data: bytes, *, key: str | None = None, content_type: str | None = None
    ) -> StoredObject:
        """Store bytes held in memory (small objects: manifests, embeddings, reports)."""
        if key is not None:
            validate_key(key)
        return self._put_stream(io.BytesIO(data), len(data), key, content_type or DEFAULT_CONTENT_TYPE)

    @abstractmethod
    def _put_stream(self, source: BinaryIO, size: int, key: str | None, content_type: str) -> StoredObject:
        """Store ``size`` bytes from a seekable ``source``; ``key`` (if any) is already validated."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing object is not an error (deletes are retried)."""

    # --- reading -------------------------------------------------------------------------------
    @abstractmethod
    def stat(self, key: str) -> StoredObject:
        """Metadata of an object; ``ArtifactNotFoundError`` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """A streaming reader; reading to the end verifies the sha256 (``ChecksumMismatchError``)."""
        validate_key(key)
        with self._open_raw(key) as (expected, raw), VerifyingReader(raw, expected, self.location) as reader:
            yield reader  # type: ignore[misc]

    def get_file(self, key: str, dest: str | Path) -> StoredObject:
        """Download to ``dest`` through a verified temp file; ``dest`` only ever holds intact bytes."""
        validate_key(key)
        with self._open_raw(key) as (expected, source):
            copy_verified(source, Path(dest), expected, self.location)
        return expected

    def get_bytes(self, key: str, *, max_bytes: int = MAX_BYTES_IN_MEMORY) -> bytes:
        """Read a small object into memory, verified."""
        validate_key(key)
        with self._open_raw(key) as (expected, raw):
            if expected.size > max_bytes:
                raise InputError(
                    f"artifact {key!r} is {expected.size} bytes, more than get_bytes() reads into memory "
                    f"({max_bytes}); use get_file() or open_read()"
                )
            with VerifyingReader(raw, expected, self.location) as reader:
                return reader.readall()

    @abstractmethod
    def _open_raw(self, key: str) -> AbstractContextManager[tuple[StoredObject, BinaryIO]]:
        """The object's checksum record and its bytes as a stream, unverified (callers verify).

        The two come from one version of the object, even while another writer replaces it:
        a separate ``stat`` could pair one version's checksum with the next one's bytes.
        ``ArtifactNotFoundError`` if there is no object.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, in lexicographic order."""

    @abstractmethod
    def presigned_url(self, key: str, expires: int | None = None) -> str:
        """A URL that downloads the object without lynx credentials (S3: presigned GET)."""

    # --- health --------------------------------------------------------------------------------
    @abstractmethod
    def check(self) -> None:
        """Raise ``ServiceUnavailableError`` naming the setting to fix if the store is unusable."""
