"""Settings (env, .env, secrets) and the database engine (SQLite pragmas, unreachable servers)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from lynx.db.engine import make_engine
from lynx.db.models import JobStatus
from lynx.db.tracking import Tracker
from lynx.errors import ConfigurationError, ServiceUnavailableError
from lynx.settings import LynxSettings, get_settings
from lynx.store import open_store
from tests.conftest import S3_SECRET_KEY, free_port

DB_PASSWORD = "pg-pass-never-log-me"


def test_embedded_defaults_need_no_server(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("LYNX_HOME", str(tmp_path / "home"))
    settings = get_settings()
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'home' / 'lynx.db'}"
    assert settings.resolved_artifacts_dir == tmp_path / "home" / "artifacts"
    assert settings.store_backend == "local"
    tracker = Tracker.from_settings(settings)
    subject = tracker.create_subject("Local")
    tracker.close()
    assert subject.id == 1 and (tmp_path / "home" / "lynx.db").is_file()


@pytest.mark.parametrize("folder", ["what?now", "take#2", "a b%20c"])
def test_embedded_database_stays_in_a_home_with_url_characters(make_settings, tmp_path: Path, folder: str):
    home = tmp_path / folder / "home"
    settings = make_settings(home=home)
    Tracker.from_settings(settings).close()
    assert (home / "lynx.db").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder]


def test_environment_and_dotenv(monkeypatch, tmp_path: Path):
    (tmp_path / ".env").write_text(
        "LYNX_S3_BUCKET=from-dotenv\nLYNX_S3_SECRET_KEY=dotenv-secret\nLYNX_S3_SECURE=false\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LYNX_S3_BUCKET", "from-env")  # the environment wins over .env
    settings = LynxSettings()
    assert settings.s3_bucket == "from-env"
    assert settings.s3_secret_key.get_secret_value() == "dotenv-secret" and settings.s3_secure is False


def _with_password(url: str, where: str) -> str:
    """``url`` carrying DB_PASSWORD in its user part or in a query key that names a secret."""
    if where == "userinfo":
        return url.replace("postgres@", f"postgres:{DB_PASSWORD}@")
    return f"{url}?sslmode=disable&{where}={DB_PASSWORD}"


PASSWORD_PLACES = ["userinfo", "password", "sslpassword", "passfile", "PGPASSWORD", "auth_token"]


@pytest.mark.parametrize("where", PASSWORD_PLACES)
def test_secrets_never_in_repr_or_dumps(make_settings, where: str):
    url = _with_password(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/lynx", where)
    settings = make_settings(store="s3", database_url=url)
    for shown in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        str(settings.model_dump()),
        settings.database_url_for_display,
        repr(make_engine(settings)),
        repr(make_engine(settings).url),
    ):
        assert DB_PASSWORD not in shown and S3_SECRET_KEY not in shown
    assert "***" in settings.database_url_for_display


def test_display_url_masks_only_secret_query_values(make_settings):
    url = "postgresql+psycopg://u:pw@db.example:5432/lynx?sslmode=require&password=pw2&options=-c%20x%3Dy"
    shown = make_settings(database_url=url).database_url_for_display
    assert shown == "postgresql+psycopg://u:***@db.example:5432/lynx?sslmode=require&password=***&options=-c+x%3Dy"


def test_query_string_password_still_reaches_the_driver(make_settings):
    from sqlalchemy import event

    url = _with_password(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/lynx", "password")
    engine = make_engine(make_settings(database_url=url))
    seen: dict[str, object] = {}
    event.listen(engine, "do_connect", lambda _d, _r, _a, cparams: seen.update(cparams))
    with pytest.raises(ServiceUnavailableError):
        engine.connect()
    assert seen["password"] == DB_PASSWORD and seen["sslmode"] == "disable"


@pytest.mark.parametrize("where", ["userinfo", "password"])
def test_logs_carry_no_secrets(make_settings, pg_url: str, caplog: pytest.LogCaptureFixture, where: str):
    settings = make_settings(store="s3", database_url=_with_password(pg_url, where))
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # SQL and parameters too
        try:
            tracker = Tracker.from_settings(settings)
            store = open_store(settings)
            stored = store.put_bytes(b"photo")
            subject = tracker.create_subject("Logged", reference=stored)
            job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="p")
            tracker.transition_job(job.id, JobStatus.RUNNING)
            tracker.close()
            broken = make_settings(
                store="s3",
                s3_endpoint=f"127.0.0.1:{free_port()}",
                s3_retries=0,
                database_url=_with_password(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
                                            where),
            )
            with pytest.raises(ServiceUnavailableError):
                open_store(broken).check()
            with pytest.raises(ServiceUnavailableError):
                Tracker.from_settings(broken)
        finally:
            logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    assert caplog.records, "expected some log output to check"
    assert DB_PASSWORD not in caplog.text and S3_SECRET_KEY not in caplog.text


def test_sqlite_pragmas(make_settings):
    engine = make_engine(make_settings())
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
    engine.dispose()


def test_unreachable_database_fails_fast_naming_the_setting(make_settings):
    port = free_port()
    settings = make_settings(database_url=f"postgresql+psycopg://lynx:{DB_PASSWORD}@127.0.0.1:{port}/lynx")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as caught:
        Tracker.from_settings(settings)
    assert time.monotonic() - started < settings.database_connect_timeout + 2
    message = str(caught.value)
    assert message.startswith(
        f"cannot reach the tracking database at postgresql+psycopg://lynx:***@127.0.0.1:{port}"
    )
    assert "LYNX_DATABASE_URL" in message and "\n" not in message and DB_PASSWORD not in message


@pytest.mark.parametrize(
    ("user", "database", "reason"),
    [
        ("postgres", "lynx_no_such_db", 'database "lynx_no_such_db" does not exist'),
        ("lynx_no_such_role", "postgres", 'role "lynx_no_such_role" does not exist'),
    ],
)
def test_missing_database_or_refused_login_is_a_configuration_error(
    make_settings, make_pg_database, user: str, database: str, reason: str
):
    url = f"postgresql+psycopg://{user}@127.0.0.1:5432/{database}"  # make_pg_database: the server is up
    with pytest.raises(ConfigurationError) as caught:
        Tracker.from_settings(make_settings(database_url=url))
    assert not isinstance(caught.value, ServiceUnavailableError)  # not worth a retry
    assert caught.value.setting == "LYNX_DATABASE_URL"
    message = str(caught.value)
    assert reason in message and "refused the connection" in message and "\n" not in message


def test_database_that_goes_away_mid_run(make_settings, make_pg_database):
    import psycopg

    url = make_pg_database()
    settings = make_settings(database_url=url)
    tracker = Tracker.from_settings(settings)
    subject = tracker.create_subject("Before")
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (url.rsplit("/", 1)[1],),
        )
    # pool_pre_ping replaces the killed connection: the next call just works.
    assert tracker.get_subject(subject.id).name == "Before"
    tracker.close()


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "postgresql://postgres@127.0.0.1/x",
        "mysql+nodriver://x@y/z",
        "postgresql+psycopg://u:pw@h:notaport/db",  # ValueError inside SQLAlchemy
        "mysql://u:pw@h/db",  # a dialect whose driver is not installed: ImportError
    ],
)
def test_bad_database_url_is_a_configuration_error(make_settings, url: str):
    with pytest.raises(ConfigurationError, match="LYNX_DATABASE_URL") as info:
        make_engine(make_settings(database_url=url))
    assert "pw" not in str(info.value)


def test_invalid_setting_is_one_line_naming_the_variable_without_its_value(lynx_cli) -> None:
    result = lynx_cli(
        "db", "current", env={"LYNX_S3_SECURE": "sometimes", "LYNX_S3_PART_SIZE": "s3cr3t-ish"}
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lynx: error: invalid setting")
    assert "LYNX_S3_SECURE" in lines[0] and "LYNX_S3_PART_SIZE" in lines[0]
    assert "Traceback" not in result.stderr and "s3cr3t-ish" not in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [("LYNX_DELIVER_RENDITIONS", "notjson"), ("LYNX_EVAL_RECOGNIZERS", "[")],
)
def test_setting_that_is_not_json_is_one_line_naming_the_variable(lynx_cli, name: str, value: str) -> None:
    result = lynx_cli("db", "current", env={name: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"lynx: error: invalid setting {name}: not valid JSON "
                     '(write lists and objects as JSON, e.g. ["a", "b"])'], result.stderr


def test_sqlite_database_in_a_folder_that_cannot_be_made_names_the_setting(make_settings, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigurationError, match="cannot create the folder of the SQLite database") as info:
        make_engine(make_settings(database_url=f"sqlite:///{blocker}/sub/lynx.db"))
    assert info.value.setting == "LYNX_DATABASE_URL"
