"""The artifact store on MinIO or any S3-compatible server, through the ``minio`` SDK.

Each object carries its sha256 as user metadata (``x-amz-meta-sha256``) so reads can verify it.
Files larger than ``LYNX_S3_PART_SIZE`` go up as multipart uploads, one part in memory per
upload thread; downloads stream. The bucket is created on first use if it does not exist.

minio's default HTTP client waits 5 minutes to connect and retries 5 times; ours connects within
``LYNX_S3_TIMEOUT`` seconds and retries ``LYNX_S3_RETRIES`` times (connection errors and 5xx
answers, with a short exponential backoff), so an unreachable server is reported in seconds.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import BinaryIO, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from lynx.errors import (
    ArtifactNotFoundError,
    ConfigurationError,
    InputError,
    ServiceUnavailableError,
)
from lynx.outage import ride_out
from lynx.settings import LynxSettings
from lynx.store.base import (
    CHUNK_SIZE,
    DEFAULT_CONTENT_TYPE,
    ArtifactStore,
    HashingReader,
    StoredObject,
    check_expiry,
    content_key,
    validate_key,
)

log = logging.getLogger(__name__)

ENDPOINT_SETTING = "LYNX_S3_ENDPOINT"
PUBLIC_ENDPOINT_SETTING = "LYNX_S3_PUBLIC_ENDPOINT"
#: The region links for the public endpoint are signed with when LYNX_S3_REGION is unset: MinIO's
#: and SeaweedFS's own. Given explicitly, signing needs no GetBucketLocation call to that endpoint.
DEFAULT_REGION = "us-east-1"
SHA256_METADATA = "sha256"
# Parts uploaded at once; each holds one part (LYNX_S3_PART_SIZE bytes) in memory.
PARALLEL_PARTS = 2
T = TypeVar("T")
_CREDENTIAL_ERRORS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def _http_client(settings: LynxSettings) -> urllib3.PoolManager:
    retries = urllib3.Retry(
        total=settings.s3_retries,
        backoff_factor=0.2,
        backoff_max=5.0,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=None,  # every S3 call we make is safe to repeat
        raise_on_status=True,
    )
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.s3_timeout, read=settings.s3_read_timeout),
        retries=retries,
        maxsize=max(10, PARALLEL_PARTS * 2),
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )


class S3ArtifactStore(ArtifactStore):
    """Artifacts in one bucket of an S3/MinIO server."""

    def __init__(self, settings: LynxSettings) -> None:
        endpoint = settings.s3_endpoint
        if not endpoint:
            raise ConfigurationError(
                "LYNX_STORE_BACKEND is 's3' but no endpoint is set: set LYNX_S3_ENDPOINT to host:port",
                setting=ENDPOINT_SETTING,
            )
        if "://" in endpoint or "/" in endpoint:
            raise ConfigurationError(
                f"LYNX_S3_ENDPOINT must be host:port without scheme or path (got {endpoint!r}); "
                "choose http or https with LYNX_S3_SECURE",
                setting=ENDPOINT_SETTING,
            )
        self.endpoint = endpoint
        self.bucket = settings.s3_bucket
        self.part_size = settings.s3_part_size
        self.default_expiry = settings.presign_expiry_seconds
        self.location = f"s3://{self.bucket} at {endpoint}"
        access = settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
        secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        if access and not secret:
            raise ConfigurationError(
                "LYNX_S3_ACCESS_KEY is set but LYNX_S3_SECRET_KEY is not", setting="LYNX_S3_SECRET_KEY"
            )
        try:
            self._client = Minio(
                endpoint,
                access_key=access,
                secret_key=secret,
                secure=settings.s3_secure,
                region=settings.s3_region,
                http_client=_http_client(settings),
            )
        except ValueError as err:
            raise ConfigurationError(
                f"invalid S3 endpoint {endpoint!r}: {err}", setting=ENDPOINT_SETTING
            ) from None
        # Links name the host they were signed for; workers may reach S3 by a name browsers cannot.
        self._link_client = self._client
        if settings.s3_public_endpoint:
            host, secure = _public_endpoint(settings.s3_public_endpoint, settings.s3_secure)
            self._link_client = Minio(
                host,
                access_key=access,
                secret_key=secret,
                secure=secure,
                region=settings.s3_region or DEFAULT_REGION,
                http_client=_http_client(settings),
            )
        self._bucket_ready = False
        self.outage_tolerance = settings.outage_tolerance_seconds

    # --- writing -------------------------------------------------------------------------------
    def _put_stream(self, source: BinaryIO, size: int, key: str | None, content_type: str) -> StoredObject:
        # The checksum goes into the upload's metadata, so it is needed before the first byte:
        # hash in one streaming pass, upload in a second that hashes again to catch a changed file.
        digest = hashlib.sha256()
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
        source.seek(0)
        sha256 = digest.hexdigest()
        stored = StoredObject(key or content_key(sha256), sha256, size, content_type)
        # A put that fails mid-way leaves no object (a multipart upload is invisible until completed,
        # a single PUT until its body is in): repeating it whole is safe.
        self._ride_out(lambda: self._upload(source, stored, content_addressed=key is None), stored.key)
        log.debug("stored %s (%d bytes) in %s", stored.key, size, self.location)
        return stored

    def _upload(self, source: BinaryIO, stored: StoredObject, *, content_addressed: bool) -> None:
        source.seek(0)
        self._ensure_bucket()
        if content_addressed and self._stat_or_none(stored.key) is not None:
            return  # content-addressed: already there, byte for byte
        reader = HashingReader(source)
        with self._errors(stored.key):
            self._client.put_object(
                self.bucket,
                stored.key,
                reader,
                length=stored.size,
                content_type=stored.content_type,
                metadata={SHA256_METADATA: stored.sha256},
                part_size=self.part_size,
                num_parallel_uploads=PARALLEL_PARTS,
            )
        if reader.hexdigest() != stored.sha256:
            self.delete(stored.key)
            origin = getattr(source, "name", "the data")
            raise InputError(f"{origin} changed while it was being uploaded; nothing was stored")

    def _ride_out(self, call: Callable[[], T], key: str | None) -> T:
        what = f"S3 at {self.endpoint} ({key or self.bucket})"
        return ride_out(call, tolerance=self.outage_tolerance, what=what)

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            self._ride_out(lambda: self._remove(key), key)
        except ArtifactNotFoundError:
            pass  # no bucket, no object: already deleted

    def _remove(self, key: str) -> None:
        with self._errors(key):
            self._client.remove_object(self.bucket, key)

    # --- reading -------------------------------------------------------------------------------
    def stat(self, key: str) -> StoredObject:
        validate_key(key)
        found = self._stat_or_none(key)
        if found is None:
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.location}")
        return found

    def exists(self, key: str) -> bool:
        validate_key(key)
        return self._stat_or_none(key) is not None

    def _stat_or_none(self, key: str) -> StoredObject | None:
        try:
            info = self._ride_out(lambda: self._stat_raw(key), key)
        except ArtifactNotFoundError:
            return None
        return self._stored(key, info.metadata, info.size, info.content_type)

    def _stat_raw(self, key: str):
        with self._errors(key):
            return self._client.stat_object(self.bucket, key)

    def _stored(
        self, key: str, headers: Mapping[str, str] | None, size: int | str | None, content_type: str | None
    ) -> StoredObject:
        sha256 = (headers or {}).get(f"x-amz-meta-{SHA256_METADATA}")
        if not sha256:
            raise ArtifactNotFoundError(
                f"artifact {key!r} in {self.location} has no sha256 metadata; "
                "store files with `lynx store put`, not with other S3 tools"
            )
        return StoredObject(key, sha256, int(size or 0), content_type or DEFAULT_CONTENT_TYPE)

    @contextmanager
    def _open_raw(self, key: str) -> Iterator[tuple[StoredObject, BinaryIO]]:
        # Opening rides out an outage; a stream cut mid-way fails the read (callers retry the stage).
        response = self._ride_out(lambda: self._get_raw(key), key)
        try:
            # The checksum comes with the bytes, in this response's headers: a separate stat could
            # describe an earlier or later version of an overwritten key.
            headers = response.headers
            stored = self._stored(key, headers, headers.get("content-length"), headers.get("content-type"))
            yield stored, _ResponseReader(response, self, key)  # type: ignore[misc]
        finally:
            response.close()
            response.release_conn()

    def _get_raw(self, key: str) -> urllib3.BaseHTTPResponse:
        with self._errors(key):
            return self._client.get_object(self.bucket, key)

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, prefix=True)  # here, not in the generator: a bad prefix raises at the call
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        try:
            with self._errors(prefix):
                for item in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                    yield item.object_name
        except ArtifactNotFoundError:
            return  # no bucket yet: nothing stored

    def presigned_url(self, key: str, expires: int | None = None) -> str:
        check_expiry(expires)
        self.stat(key)  # a URL to nothing helps nobody: say so now
        lifetime = timedelta(seconds=expires or self.default_expiry)
        with self._errors(key):
            return self._link_client.presigned_get_object(self.bucket, key, expires=lifetime)

    # --- health --------------------------------------------------------------------------------
    def check(self) -> None:
        self._bucket_ready = False
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._errors(None):
            if not self._client.bucket_exists(self.bucket):
                log.info("creating bucket %s on %s", self.bucket, self.endpoint)
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as err:
                    if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        self._bucket_ready = True

    # --- error translation ---------------------------------------------------------------------
    @contextmanager
    def _errors(self, key: str | None) -> Iterator[None]:
        """Turn minio/urllib3 exceptions into one-line LynxErrors naming the setting to check."""
        try:
            yield
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject"):
                raise ArtifactNotFoundError(f"no artifact {key!r} in {self.location}") from None
            if err.code == "NoSuchBucket":
                raise ArtifactNotFoundError(
                    f"no artifact {key!r} in {self.location}: the bucket does not exist",
                    setting="LYNX_S3_BUCKET",
                ) from None
            if err.code == "InvalidBucketName":  # minio checks names on make_bucket, not on every call
                raise ConfigurationError(
                    f"invalid S3 bucket name {self.bucket!r}: {err.message}", setting="LYNX_S3_BUCKET"
                ) from None
            if err.code in _CREDENTIAL_ERRORS:
                raise ConfigurationError(
                    f"S3 at {self.endpoint} refused our credentials ({err.code}): "
                    "check LYNX_S3_ACCESS_KEY and LYNX_S3_SECRET_KEY",
                    setting="LYNX_S3_ACCESS_KEY",
                ) from None
            status = getattr(err.response, "status", None) or 0
            raise ServiceUnavailableError(
                f"S3 at {self.endpoint} failed on {key or self.bucket!r}: {err.code}: {err.message}",
                setting=ENDPOINT_SETTING,
                transient=status >= 500,  # a 4xx we do not know will not mend by waiting
            ) from None
        except (ServerError, InvalidResponseError) as err:
            raise ServiceUnavailableError(
                f"S3 at {self.endpoint} answered with an error: {_one_line(err)}", setting=ENDPOINT_SETTING
            ) from None
        except urllib3.exceptions.HTTPError as err:
            raise ServiceUnavailableError(
                f"cannot reach S3 at {self.endpoint}: {_one_line(err)}", setting=ENDPOINT_SETTING
            ) from None
        except ValueError as err:  # minio validates bucket names client-side
            if "bucket name" in str(err).lower():
                raise ConfigurationError(
                    f"invalid S3 bucket name {self.bucket!r}: {err}", setting="LYNX_S3_BUCKET"
                ) from None
            raise


def _public_endpoint(value: str, default_secure: bool) -> tuple[str, bool]:
    """``host:port`` and https-or-not of LYNX_S3_PUBLIC_ENDPOINT (``host:port`` or a URL)."""
    parsed = urllib.parse.urlsplit(value if "://" in value else f"//{value}")
    problem = None
    if parsed.scheme not in ("", "http", "https"):
        problem = "the scheme must be http or https"
    elif not parsed.hostname:
        problem = "it names no host"
    elif parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        problem = "a path is not allowed (links are path-style: /bucket/key)"
    elif parsed.username or parsed.password:
        problem = "credentials do not belong in it"
    else:
        try:
            parsed.port  # noqa: B018 -- raises on a port that is not a number in range
        except ValueError as err:
            problem = str(err)
    if problem:
        shown = repr(value) if "@" not in value else "(not shown: it holds credentials)"
        raise ConfigurationError(
            f"invalid LYNX_S3_PUBLIC_ENDPOINT {shown}: {problem}", setting=PUBLIC_ENDPOINT_SETTING
        )
    secure = default_secure if not parsed.scheme else parsed.scheme == "https"
    return parsed.netloc, secure


class _ResponseReader(io.RawIOBase):
    """A streaming HTTP body whose network errors surface as ``ServiceUnavailableError``."""

    def __init__(self, response: urllib3.BaseHTTPResponse, store: S3ArtifactStore, key: str) -> None:
        super().__init__()
        self._response = response
        self._store = store
        self._key = key

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self._store._errors(self._key):
            return self._response.read(None if size is None or size < 0 else size)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _one_line(err: BaseException) -> str:
    """The useful tail of a urllib3/minio message, on one line, without object reprs."""
    reason = getattr(err, "reason", None) or err
    text = str(reason).replace("\n", " ")
    if ">: " in text:  # "<HTTPConnection object at 0x...>: Failed to establish ..."
        text = text.split(">: ", 1)[1]
    return text.strip()[:300] or type(err).__name__
