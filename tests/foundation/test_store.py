"""The artifact store against a real S3 server (SeaweedFS on loopback) and a local folder."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from filelock import FileLock

from lynx.errors import (
    ArtifactNotFoundError,
    ChecksumMismatchError,
    ConfigurationError,
    InputError,
    InvalidKeyError,
    ServiceUnavailableError,
)
from lynx.store import ArtifactStore, content_key, open_store
from lynx.store.local import LocalArtifactStore

from .conftest import overwrite_bytes

MB = 1000 * 1000


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "clip.mp4"
    path.write_bytes(os.urandom(20 * MB))
    return path


def test_round_trip_of_20mb_file_uses_multipart_and_verifies(
    store: ArtifactStore, big_file: Path, tmp_path: Path
):
    expected_sha = hashlib.sha256(big_file.read_bytes()).hexdigest()

    stored = store.put_file(big_file)

    assert stored.key == f"sha256/{expected_sha[:2]}/{expected_sha}"
    assert (stored.sha256, stored.size, stored.content_type) == (expected_sha, 20 * MB, "video/mp4")
    assert store.stat(stored.key) == stored
    if store.location.startswith("s3://"):
        etag = store._client.stat_object(store.bucket, stored.key).etag
        assert etag.endswith("-4"), f"expected a 4-part multipart upload, got ETag {etag}"
    dest = tmp_path / "out" / "clip.mp4"
    assert store.get_file(stored.key, dest) == stored
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected_sha
    assert [p.name for p in dest.parent.iterdir()] == ["clip.mp4"]  # no partial files left beside it


def test_large_files_stream_without_whole_file_loads(store: ArtifactStore, tmp_path: Path):
    """Python-side peak memory stays far below the file size going up and coming down.

    S3 holds at most a few parts (5 MiB here) in memory; the local store one 1 MiB chunk.
    """
    import tracemalloc

    source = tmp_path / "long.mp4"
    with open(source, "wb") as out:
        for _ in range(48):
            out.write(os.urandom(MB))
    budget = 30 * MB if store.location.startswith("s3://") else 8 * MB

    tracemalloc.start()
    try:
        stored = store.put_file(source)
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        store.get_file(stored.key, tmp_path / "back.mp4")
        download_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert upload_peak < budget, f"upload peaked at {upload_peak / MB:.1f} MB for a 48 MB file"
    assert download_peak < budget, f"download peaked at {download_peak / MB:.1f} MB for a 48 MB file"


def test_same_bytes_same_key_and_explicit_keys(store: ArtifactStore):
    first = store.put_bytes(b"embedding bytes")
    again = store.put_bytes(b"embedding bytes")
    named = store.put_bytes(
        b'{"ok": true}', key="campaigns/c1/manifest.json", content_type="application/json"
    )

    assert first == again
    assert first.key == content_key(hashlib.sha256(b"embedding bytes").hexdigest())
    assert store.get_bytes(named.key) == b'{"ok": true}'
    assert store.stat(named.key).content_type == "application/json"
    assert list(store.list("campaigns/")) == ["campaigns/c1/manifest.json"]
    assert list(store.list()) == sorted([first.key, named.key])


def test_checksum_mismatch_is_detected_and_dest_untouched(store: ArtifactStore, tmp_path: Path):
    stored = store.put_bytes(b"A" * 1000, key="jobs/1/latents.pt")
    overwrite_bytes(store, stored, b"B" * 1000)
    dest = tmp_path / "downloads" / "latents.pt"
    dest.parent.mkdir()
    dest.write_bytes(b"previous good copy")

    with pytest.raises(ChecksumMismatchError, match="jobs/1/latents.pt"):
        store.get_file(stored.key, dest)
    assert dest.read_bytes() == b"previous good copy"
    assert [p.name for p in dest.parent.iterdir()] == ["latents.pt"]
    with pytest.raises(ChecksumMismatchError):
        store.get_bytes(stored.key)
    with pytest.raises(ChecksumMismatchError), store.open_read(stored.key) as reader:
        while reader.read(100):
            pass


def test_reads_during_an_overwrite_see_one_whole_version(store: ArtifactStore, tmp_path: Path):
    """A key rewritten while it is read gives the old or the new bytes, never a false mismatch."""
    versions = [os.urandom(64 * 1024), os.urandom(96 * 1024)]
    key = "campaigns/c1/manifest.json"
    store.put_bytes(versions[0], key=key)
    stop = threading.Event()

    def overwrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.put_bytes(versions[i % 2], key=key)

    writer = threading.Thread(target=overwrite, daemon=True)
    writer.start()
    reads = {"get_bytes": 0, "get_file": 0, "open_read": 0}
    deadline = time.monotonic() + 6
    try:
        for i in range(300):
            if time.monotonic() > deadline:
                break
            if i % 3 == 0:
                data = store.get_bytes(key)
                reads["get_bytes"] += 1
            elif i % 3 == 1:
                store.get_file(key, tmp_path / "copy.bin")
                data = (tmp_path / "copy.bin").read_bytes()
                reads["get_file"] += 1
            else:
                with store.open_read(key) as reader:
                    data = reader.read()
                reads["open_read"] += 1
            assert data in versions
    finally:
        stop.set()
        writer.join(timeout=30)
    assert all(n >= 10 for n in reads.values()), reads


def test_truncated_object_is_detected(store: ArtifactStore):
    stored = store.put_bytes(b"0123456789", key="frames/f.bin")
    overwrite_bytes(store, stored, b"01234")
    with pytest.raises(ChecksumMismatchError, match="read 5 bytes"):
        store.get_bytes(stored.key)


def test_open_read_streams_in_chunks(store: ArtifactStore, big_file: Path):
    stored = store.put_file(big_file, key="videos/clip.mp4")
    digest, reads = hashlib.sha256(), 0
    with store.open_read(stored.key) as reader:
        while chunk := reader.read(1024 * 1024):
            assert len(chunk) <= 1024 * 1024
            digest.update(chunk)
            reads += 1
    assert digest.hexdigest() == stored.sha256
    assert reads >= 20


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "a/../../b",
        "/etc/passwd",
        "a//b",
        "./a",
        "a/./b",
        "a\\b",
        "a\x00b",
        "a\nb",
        "a\x7fb",
        "a\x85b",  # C1 control (NEL)
        "a\u2028b",  # line separator
        "a\u2029b",  # paragraph separator
        "a\u202eb",  # right-to-left override: shows a different name than it is
        "a\u200bb",  # zero-width space
        "a\ud800b",  # lone surrogate: not even encodable as UTF-8
        "",
        "trailing/",
        "C:/windows",
        "C:",
        "d:\\x",
        "x" * 1100,
    ],
)
def test_bad_keys_are_rejected_before_any_io(store: ArtifactStore, key: str, tmp_path: Path):
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    with pytest.raises(InvalidKeyError):
        store.put_bytes(b"x", key=key)
    with pytest.raises(InvalidKeyError):
        store.put_file(source, key=key)
    with pytest.raises(InvalidKeyError):
        store.get_file(key, tmp_path / "out")
    with pytest.raises(InvalidKeyError):
        store.delete(key)
    assert list(store.list()) == []


@pytest.mark.parametrize("prefix", ["../", "/abs/", "a//", "a\x85/", "a\u202e"])
def test_list_rejects_a_bad_prefix_at_the_call(store: ArtifactStore, prefix: str):
    with pytest.raises(InvalidKeyError):
        store.list(prefix)  # not only once iteration starts


@pytest.mark.parametrize("keys", [("x", "x.json/b"), ("x.json/b", "x"), ("v/clip", "v/clip.json")])
def test_keys_that_s3_accepts_coexist(store: ArtifactStore, keys: tuple[str, str]):
    """The local store once kept metadata at meta/<key>.json, so `x` and `x.json/b` clashed there."""
    for key in keys:
        store.put_bytes(key.encode(), key=key)
    for key in keys:
        assert store.get_bytes(key) == key.encode()
        assert store.stat(key).size == len(key)
    assert list(store.list()) == sorted(keys)
    for key in keys:
        store.delete(key)
    assert list(store.list()) == []


def test_keys_with_a_colon_that_are_not_drives_are_fine(store: ArtifactStore):
    for key in ("a:foo", "jobs/7/C:/frame.png", "ab:/x", "urn:lynx:1"):
        assert store.get_bytes(store.put_bytes(key.encode(), key=key).key) == key.encode()
    assert list(store.list()) == sorted(["a:foo", "ab:/x", "jobs/7/C:/frame.png", "urn:lynx:1"])


def test_non_ascii_keys_are_fine(store: ArtifactStore):
    for key in ("café/naïve.mp4", "日本/動画.mp4", "emoji/🎬 take 2.mp4"):
        assert store.get_bytes(store.put_bytes(b"v", key=key).key) == b"v"
    assert list(store.list()) == sorted(["café/naïve.mp4", "emoji/🎬 take 2.mp4", "日本/動画.mp4"])


def test_presigned_url_downloads_same_bytes(store: ArtifactStore):
    stored = store.put_bytes(os.urandom(300_000), key="previews/p.webp")
    url = store.presigned_url(stored.key, expires=60)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    assert hashlib.sha256(body).hexdigest() == stored.sha256
    if store.location.startswith("s3://"):
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url


def test_presigned_url_lives_at_most_seven_days(store: ArtifactStore):
    stored = store.put_bytes(b"preview", key="previews/p.webp")
    url = store.presigned_url(stored.key, expires=604800)
    if store.location.startswith("s3://"):
        assert "X-Amz-Expires=604800" in url
    for expires in (604801, 999999, 0):
        with pytest.raises(InputError, match=f"1 to 604800 seconds \\(7 days\\), not {expires}$"):
            store.presigned_url(stored.key, expires=expires)


def test_missing_object_gives_clear_error(store: ArtifactStore, tmp_path: Path):
    for call in (
        lambda: store.get_file("jobs/7/video.mp4", tmp_path / "v.mp4"),
        lambda: store.stat("jobs/7/video.mp4"),
        lambda: store.get_bytes("jobs/7/video.mp4"),
        lambda: store.presigned_url("jobs/7/video.mp4"),
    ):
        with pytest.raises(ArtifactNotFoundError) as caught:
            call()
        assert "'jobs/7/video.mp4'" in str(caught.value) and store.location in str(caught.value)
    assert not (tmp_path / "v.mp4").exists()
    assert store.exists("jobs/7/video.mp4") is False


def test_delete_is_idempotent(store: ArtifactStore):
    stored = store.put_bytes(b"bye", key="tmp/x")
    store.delete(stored.key)
    store.delete(stored.key)
    assert not store.exists(stored.key)
    assert list(store.list()) == []


def test_get_bytes_refuses_large_objects(store: ArtifactStore):
    stored = store.put_bytes(b"x" * 2000, key="big/one")
    with pytest.raises(InputError, match="get_file"):
        store.get_bytes(stored.key, max_bytes=1000)


def test_missing_source_file_is_an_input_error(store: ArtifactStore, tmp_path: Path):
    with pytest.raises(InputError, match="nope.mp4"):
        store.put_file(tmp_path / "nope.mp4")


# --- local backend specifics ---------------------------------------------------------------------------
class _FailingStream(io.RawIOBase):
    """Yields some bytes, then fails like a dying disk or network share."""

    def __init__(self) -> None:
        self.sent = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.sent >= 3 * 1024 * 1024:
            raise OSError(5, "Input/output error")
        self.sent += 1024 * 1024
        return b"z" * 1024 * 1024


def test_local_interrupted_write_publishes_nothing(tmp_path: Path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    with pytest.raises(ServiceUnavailableError, match="LYNX_ARTIFACTS_DIR"):
        store._put_stream(_FailingStream(), 4 * 1024 * 1024, "videos/partial.mp4", "video/mp4")
    assert not store.exists("videos/partial.mp4")
    assert list(store.list()) == []
    assert list((tmp_path / "artifacts" / "tmp").glob("*.partial")) == []


def test_local_key_cannot_pass_through_an_existing_object(tmp_path: Path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    store.put_bytes(b"file", key="a/b")
    with pytest.raises(InvalidKeyError, match="existing object"):
        store.put_bytes(b"child", key="a/b/c")
    with pytest.raises(InvalidKeyError, match="folder"):
        store.put_bytes(b"parent", key="a")
    assert store.get_bytes("a/b") == b"file"


def _empty_folders(root: Path) -> list[str]:
    return sorted(
        Path(folder).relative_to(root).as_posix()
        for folder, dirs, files in os.walk(root)
        if not dirs and not files and Path(folder) != root
    )


def test_local_failed_puts_leave_no_folders_or_temp_files(tmp_path: Path):
    root = tmp_path / "artifacts"
    store = LocalArtifactStore(root)
    store.put_bytes(b"file", key="a/b")
    with pytest.raises(InvalidKeyError, match="existing object"):
        store.put_bytes(b"child", key="a/b/c/d")
    # S3 takes any segment length; a local folder cannot, and that is no reason to retry.
    with pytest.raises(InvalidKeyError, match="255 bytes"):
        store.put_bytes(b"long", key="deep/er/" + "n" * 300)
    with pytest.raises(InvalidKeyError, match="255 bytes"):
        store.stat("deep/er/" + "n" * 300)

    assert _empty_folders(root) == []
    assert sorted(p.name for p in (root / "tmp").iterdir()) == ["publish.lock"]
    assert list(store.list()) == ["a/b"]


def test_local_delete_removes_the_folders_it_empties(tmp_path: Path):
    root = tmp_path / "artifacts"
    store = LocalArtifactStore(root)
    store.put_bytes(b"deep", key="a/b/c")
    store.put_bytes(b"kept", key="k/keep")
    store.delete("a/b/c")
    assert _empty_folders(root) == []
    store.put_bytes(b"now a file", key="a")  # no leftover folder named `a` to refuse it
    store.delete("a/b/c/d")  # through an object: nothing to delete, no error
    assert store.get_bytes("a") == b"now a file" and store.get_bytes("k/keep") == b"kept"
    # An empty folder left behind by an older version holds no keys either.
    (root / "objects" / "old" / "x.json").mkdir(parents=True)
    store.put_bytes(b"ok", key="old/x.json")
    assert store.get_bytes("old/x.json") == b"ok"


def test_local_reads_records_of_older_stores(tmp_path: Path):
    """Stores written before checksums/ kept records at meta/<key>.json; they stay readable."""
    root = tmp_path / "artifacts"
    for key, data in (("old/clip.bin", b"old bytes"), ("y.json/b", b"legacy sibling")):
        (root / "objects" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "objects" / key).write_bytes(data)
        record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "content_type": "x/old"}
        (root / "meta" / f"{key}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "meta" / f"{key}.json").write_text(json.dumps(record))
    store = LocalArtifactStore(root)

    assert store.get_bytes("old/clip.bin") == b"old bytes"
    assert store.stat("old/clip.bin").content_type == "x/old"
    overwrite_bytes(store, store.stat("old/clip.bin"), b"rotted!!!")
    with pytest.raises(ChecksumMismatchError):
        store.get_bytes("old/clip.bin")  # legacy records still verify

    store.put_bytes(b"new", key="y")  # meta/y.json is legacy key y.json/b's folder: no clash
    assert store.get_bytes("y") == b"new" and store.get_bytes("y.json/b") == b"legacy sibling"
    store.put_bytes(b"rewritten", key="old/clip.bin")
    assert not (root / "meta" / "old").exists()  # superseded legacy record (and its folder) gone
    assert store.get_bytes("old/clip.bin") == b"rewritten"
    store.delete("y.json/b")
    assert not (root / "meta").exists() or _empty_folders(root / "meta") == []
    assert list(store.list()) == ["old/clip.bin", "y"]


def test_local_unwritable_folder_names_the_setting(tmp_path: Path, make_settings):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    store = open_store(make_settings(artifacts_dir=blocker))
    with pytest.raises(ServiceUnavailableError, match="LYNX_ARTIFACTS_DIR"):
        store.check()


@contextmanager
def _read_only_mount(folder: Path) -> Iterator[None]:
    """``folder`` bind-mounted read-only onto itself: unwritable even for root."""
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {made.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("lock_folder", ["kept", "never made"])
def test_local_read_only_store_is_still_readable(tmp_path: Path, lock_folder: str):
    root = tmp_path / "artifacts"
    LocalArtifactStore(root).put_bytes(b"published", key="videos/a.mp4")
    if lock_folder == "never made":  # as copied onto a read-only volume without tmp/
        for leftover in (root / "tmp").iterdir():
            leftover.unlink()
        (root / "tmp").rmdir()
    with _read_only_mount(root):
        store = LocalArtifactStore(root)
        assert store.get_bytes("videos/a.mp4") == b"published"
        with pytest.raises(ArtifactNotFoundError):
            store.get_bytes("videos/missing.mp4")
        with pytest.raises(ServiceUnavailableError, match="LYNX_ARTIFACTS_DIR"):
            store.put_bytes(b"new", key="videos/b.mp4")  # writing still fails, naming the setting


class _DeniedLock(FileLock):
    """The lock of a reader without write access to the store's tmp/ folder."""

    def acquire(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", self.lock_file)


def test_local_reader_without_write_access_reads_without_the_lock(tmp_path: Path):
    root = tmp_path / "artifacts"
    store = LocalArtifactStore(root)
    store.put_bytes(b"published", key="a")
    store._lock = _DeniedLock(store._lock.lock_file)
    assert store.get_bytes("a") == b"published"
    with pytest.raises(ServiceUnavailableError, match="Permission denied"):
        store.put_bytes(b"new", key="b")  # a writer still needs the lock


# --- S3 backend specifics ------------------------------------------------------------------------------
def test_s3_bucket_is_created_on_first_write(make_settings, s3_reset):
    store = open_store(make_settings(store="s3", s3_bucket="lynx-autocreated"))
    assert not store._client.bucket_exists("lynx-autocreated")
    store.put_bytes(b"first")
    assert store._client.bucket_exists("lynx-autocreated")


def test_s3_unreachable_fails_fast_naming_the_endpoint(make_settings, make_s3_server):
    server = make_s3_server()
    # no outage tolerance: this test is about how the error reads (tests/faults rides outages out)
    settings = make_settings(
        store="s3", s3_endpoint=server.endpoint, s3_retries=3, s3_timeout=5, outage_tolerance_seconds=0
    )
    store = open_store(settings)
    store.check()
    stored = store.put_bytes(b"before the outage")
    server.kill()

    for call in (store.check, lambda: store.get_bytes(stored.key), lambda: store.put_bytes(b"during")):
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as caught:
            call()
        assert time.monotonic() - started < 10
        message = str(caught.value)
        assert "LYNX_S3_ENDPOINT" in message and server.endpoint in message and "\n" not in message


@pytest.mark.parametrize("wrong", ["s3_secret_key", "s3_access_key"])
def test_s3_wrong_credentials_one_line_naming_both_settings(make_settings, wrong: str):
    store = open_store(make_settings(store="s3", **{wrong: "not-the-right-one"}))
    for call in (store.check, lambda: store.put_bytes(b"refused"), lambda: list(store.list())):
        with pytest.raises(ConfigurationError) as caught:
            call()
        message = str(caught.value)
        assert "LYNX_S3_ACCESS_KEY" in message and "LYNX_S3_SECRET_KEY" in message
        assert "\n" not in message and "not-the-right-one" not in message


def test_s3_objects_whose_put_returned_survive_sigkill_and_restart(make_settings, make_s3_server):
    server = make_s3_server()
    store = open_store(make_settings(store="s3", s3_endpoint=server.endpoint, s3_timeout=5))
    written = {f"jobs/{i}/frame.bin": os.urandom(50_000 + i) for i in range(20)}
    written["videos/big.mp4"] = os.urandom(12 * MB)  # multipart: 3 parts
    for key, data in written.items():
        store.put_bytes(data, key=key)

    server.kill()  # no SIGTERM, no flush: a crash right after the last put returned
    assert not server.running
    server.restart()

    assert sorted(store.list()) == sorted(written)
    for key, data in written.items():
        assert store.get_bytes(key) == data  # sha256 checked against the recorded one


def test_s3_links_for_a_public_endpoint_download_the_same_bytes(make_settings, s3_server: str):
    """Workers write to 127.0.0.1:PORT; the links name localhost:PORT, as a browser would reach it."""
    port = s3_server.rsplit(":", 1)[1]
    store = open_store(make_settings(store="s3", s3_public_endpoint=f"localhost:{port}"))
    stored = store.put_bytes(os.urandom(200_000), key="videos/public.mp4")

    url = store.presigned_url(stored.key, expires=60)

    assert url.startswith(f"http://localhost:{port}/{store.bucket}/videos/public.mp4?")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert hashlib.sha256(response.read()).hexdigest() == stored.sha256
    # The signature covers the host: the same link on the workers' name is refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url.replace(f"localhost:{port}", s3_server), timeout=10)
    assert refused.value.code == 403


def test_s3_links_are_signed_without_contacting_the_public_endpoint(make_settings):
    store = open_store(make_settings(store="s3", s3_public_endpoint="https://files.example.invalid"))
    stored = store.put_bytes(b"poster", key="previews/poster.jpg")
    started = time.monotonic()
    url = store.presigned_url(stored.key, expires=60)
    assert time.monotonic() - started < 5  # no lookup of an unresolvable host, no retries
    assert url.startswith(f"https://files.example.invalid/{store.bucket}/previews/poster.jpg?")
    assert "X-Amz-Credential=" in url and "%2Fus-east-1%2Fs3%2F" in url


@pytest.mark.parametrize(
    "value", ["ftp://files:21", "https://files.example.com/s3", "http://:9000", "files:notaport"]
)
def test_s3_bad_public_endpoint_is_one_line_naming_the_setting(make_settings, value: str):
    with pytest.raises(ConfigurationError) as caught:
        open_store(make_settings(store="s3", s3_public_endpoint=value))
    message = str(caught.value)
    assert "LYNX_S3_PUBLIC_ENDPOINT" in message and repr(value) in message and "\n" not in message


def test_s3_public_endpoint_with_credentials_is_refused_without_echoing_them(make_settings):
    with pytest.raises(ConfigurationError, match="LYNX_S3_PUBLIC_ENDPOINT.*credentials") as caught:
        open_store(make_settings(store="s3", s3_public_endpoint="https://user:hunter2@files:9000"))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"s3_endpoint": None}, "LYNX_S3_ENDPOINT"),
        ({"s3_endpoint": "http://minio:9000"}, "LYNX_S3_ENDPOINT"),
        ({"s3_secret_key": None}, "LYNX_S3_SECRET_KEY"),
        ({"s3_bucket": "no_underscores"}, "LYNX_S3_BUCKET"),
    ],
)
def test_s3_misconfiguration_names_the_setting(make_settings, overrides, setting):
    with pytest.raises(ConfigurationError) as caught:
        open_store(make_settings(store="s3", **overrides)).check()
    assert setting in str(caught.value)
