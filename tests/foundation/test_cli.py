"""The `lynx` command line as operators run it: a real subprocess against real servers."""

from __future__ import annotations

import hashlib
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from lynx.db import migrate
from lynx.settings import LynxSettings
from tests.conftest import S3_SECRET_KEY, free_port

DB_PASSWORD = "pg-pass-never-print-me"


def _one_line_error(result, setting: str) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("lynx: error: ") and setting in lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_help_lists_the_foundation_commands(lynx_cli):
    result = lynx_cli("--help")
    assert result.returncode == 0, result.stderr
    for group in ("db", "store", "retention"):
        assert group in result.stdout
    for args in (["db", "--help"], ["store", "--help"], ["retention", "purge", "--help"]):
        assert lynx_cli(*args).returncode == 0


def test_db_upgrade_current_downgrade(lynx_cli, tracking_settings: LynxSettings):
    head = migrate.head_revision()

    upgraded = lynx_cli("db", "upgrade", settings=tracking_settings)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"at revision {head}" in upgraded.stdout
    assert "up to date" in lynx_cli("db", "current", settings=tracking_settings).stdout

    downgraded = lynx_cli("db", "downgrade", "base", settings=tracking_settings)
    assert downgraded.returncode == 0, downgraded.stderr
    assert migrate.current(tracking_settings) is None
    assert "behind" in lynx_cli("db", "current", settings=tracking_settings).stdout


def test_store_put_get_url(lynx_cli, make_settings, store_backend: str, tmp_path: Path):
    settings = make_settings(store=store_backend)
    source = tmp_path / "portrait.jpg"
    source.write_bytes(b"\xff\xd8 not really a jpeg " * 1000)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    subject = _make_subject(settings)

    put = lynx_cli(
        "store", "put", str(source), "--kind", "reference_photo", "--subject", str(subject), settings=settings
    )
    assert put.returncode == 0, put.stderr
    assert f"key     sha256/{sha[:2]}/{sha}" in put.stdout and f"sha256  {sha}" in put.stdout
    key = f"sha256/{sha[:2]}/{sha}"

    dest = tmp_path / "back" / "portrait.jpg"
    got = lynx_cli("store", "get", key, str(dest), settings=settings)
    assert got.returncode == 0, got.stderr
    assert f"sha256  {sha} (verified)" in got.stdout and dest.read_bytes() == source.read_bytes()

    url = lynx_cli("store", "url", key, "--expires", "120", settings=settings)
    assert url.returncode == 0, url.stderr
    with urllib.request.urlopen(url.stdout.strip(), timeout=10) as response:
        assert hashlib.sha256(response.read()).hexdigest() == sha

    too_long = lynx_cli("store", "url", key, "--expires", "999999", settings=settings)
    assert too_long.returncode == 2 and "604800" in too_long.stderr and "Traceback" not in too_long.stderr

    assert lynx_cli("store", "ls", "sha256/", settings=settings).stdout.split() == [key]
    missing = lynx_cli("store", "get", "sha256/00/nothing", str(tmp_path / "x"), settings=settings)
    assert "sha256/00/nothing" in _one_line_error(missing, "no artifact")
    assert missing.returncode == 5


@pytest.fixture(params=["local", "s3"])
def store_backend(request) -> str:
    return request.param


def _make_subject(settings: LynxSettings) -> int:
    from lynx.db.tracking import Tracker

    tracker = Tracker.from_settings(settings)
    try:
        return tracker.create_subject("Ada", consent_reference="form-1").id
    finally:
        tracker.close()


def test_biometric_kind_without_subject_is_refused_before_upload(lynx_cli, make_settings, tmp_path: Path):
    settings = make_settings()
    source = tmp_path / "face.png"
    source.write_bytes(b"png bytes")

    result = lynx_cli("store", "put", str(source), "--kind", "reference_photo", settings=settings)
    line = _one_line_error(result, "--subject")
    assert "'reference_photo' is biometric data" in line and result.returncode == 4
    artifacts = settings.resolved_artifacts_dir / "objects"
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))
    assert lynx_cli("store", "put", str(source), "--kind", "manifest", settings=settings).returncode == 0


def test_wrong_database_port_one_line_no_object_written(lynx_cli, make_settings, tmp_path: Path):
    port = free_port()
    url = f"postgresql+psycopg://postgres:{DB_PASSWORD}@127.0.0.1:{port}/lynx"
    settings = make_settings(database_url=url)
    source = tmp_path / "face.png"
    source.write_bytes(b"png bytes")

    put = ["store", "put", str(source), "--kind", "reference_photo", "--subject", "1"]
    for args in (["db", "upgrade"], put):
        result = lynx_cli(*args, settings=settings)
        line = _one_line_error(result, "LYNX_DATABASE_URL")
        assert result.returncode == 3
        assert f"postgres:***@127.0.0.1:{port}/lynx" in line
        assert DB_PASSWORD not in result.stderr + result.stdout
    artifacts = settings.resolved_artifacts_dir / "objects"
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))


@pytest.mark.parametrize("key", ["password", "sslpassword", "passfile", "api_token"])
def test_password_in_the_query_string_is_never_printed(lynx_cli, make_settings, key: str):
    port = free_port()
    settings = make_settings(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/lynx?{key}={DB_PASSWORD}")
    for args in (["db", "upgrade"], ["db", "current"]):
        result = lynx_cli(*args, settings=settings)
        line = _one_line_error(result, "LYNX_DATABASE_URL")
        assert f"postgres@127.0.0.1:{port}/lynx?{key}=***" in line
        assert DB_PASSWORD not in result.stderr + result.stdout


def test_stopped_s3_server_one_line_no_row_written(
    lynx_cli, make_settings, make_s3_server, tmp_path: Path
):
    server = make_s3_server()
    server.stop()
    port = server.ports.s3
    # tolerance 0: fail at once (a longer one retries first, logging each wait; tests/faults cover that)
    settings = make_settings(store="s3", s3_endpoint=server.endpoint, outage_tolerance_seconds=0)
    source = tmp_path / "face.png"
    source.write_bytes(b"png bytes")
    subject = _make_subject(settings)

    result = lynx_cli(
        "store", "put", str(source), "--kind", "reference_photo", "--subject", str(subject), settings=settings
    )
    line = _one_line_error(result, "LYNX_S3_ENDPOINT")
    assert f"127.0.0.1:{port}" in line and result.returncode == 3
    assert S3_SECRET_KEY not in result.stderr + result.stdout
    with sqlite3.connect(settings.home / "lynx.db") as db:
        assert db.execute("SELECT count(*) FROM artifacts").fetchone() == (0,)

    fetched = lynx_cli("store", "get", "sha256/00/anything", str(tmp_path / "out"), settings=settings)
    _one_line_error(fetched, "LYNX_S3_ENDPOINT")
    assert not (tmp_path / "out").exists()


def test_successful_commands_print_no_secrets(lynx_cli, make_settings, pg_url: str, tmp_path: Path):
    url_with_password = pg_url.replace("postgres@", f"postgres:{DB_PASSWORD}@")  # trust auth ignores it
    settings = make_settings(store="s3", database_url=url_with_password)
    source = tmp_path / "f.bin"
    source.write_bytes(b"data")
    outputs = []
    for args in (
        ["db", "upgrade"],
        ["db", "current"],
        ["store", "put", str(source), "--kind", "manifest"],
        ["retention", "purge", "--dry-run"],
    ):
        result = lynx_cli(*args, settings=settings)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    joined = "\n".join(outputs)
    assert DB_PASSWORD not in joined and S3_SECRET_KEY not in joined
    assert "postgres:***@" in joined


def test_retention_purge_cli(lynx_cli, make_settings):
    from datetime import timedelta

    from lynx.db.models import utcnow
    from lynx.db.tracking import Tracker
    from lynx.store import open_store

    settings = make_settings()
    tracker = Tracker.from_settings(settings)
    photo = open_store(settings).put_bytes(b"photo", content_type="image/jpeg")
    subject = tracker.create_subject("Old", reference=photo, retention_until=utcnow() - timedelta(days=2))
    tracker.close()

    dry = lynx_cli("retention", "purge", "--dry-run", settings=settings)
    assert dry.returncode == 0, dry.stderr
    assert f"subject {subject.id} (Old)" in dry.stdout and "would delete 1 objects" in dry.stdout
    assert open_store(settings).exists(photo.key)

    real = lynx_cli("retention", "purge", settings=settings)
    assert real.returncode == 0, real.stderr
    assert "deleted 1 objects" in real.stdout
    assert not open_store(settings).exists(photo.key)
