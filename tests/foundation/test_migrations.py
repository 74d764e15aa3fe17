"""Migrations on PostgreSQL and SQLite: up, down, agreement with the models, concurrent start-up."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect, text

from lynx.db import migrate
from lynx.db.engine import make_engine
from lynx.db.models import Base
from lynx.errors import ConfigurationError
from lynx.settings import LynxSettings

TABLES = {
    "subjects", "campaigns", "jobs", "stage_runs", "artifacts", "compute_events", "evaluations", "erasures"
}


def _tables(settings: LynxSettings) -> set[str]:
    engine = make_engine(settings)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_and_downgrade(tracking_settings: LynxSettings):
    assert migrate.current(tracking_settings) is None
    assert _tables(tracking_settings) == set()

    assert migrate.upgrade(tracking_settings) == migrate.head_revision()
    assert _tables(tracking_settings) == TABLES
    assert migrate.current(tracking_settings) == migrate.head_revision()

    assert migrate.downgrade(tracking_settings, "base") is None
    assert _tables(tracking_settings) == set()

    assert migrate.upgrade(tracking_settings) == migrate.head_revision()
    assert _tables(tracking_settings) == TABLES


def test_models_and_migrations_agree(tracking_settings: LynxSettings):
    migrate.upgrade(tracking_settings)
    assert migrate.schema_differences(tracking_settings) == []
    assert set(Base.metadata.tables) == TABLES


def test_ensure_schema_is_safe_when_workers_race(tracking_settings: LynxSettings):
    errors: list[BaseException] = []

    def start_worker() -> None:
        try:
            # What each worker process runs on start-up (below the per-process memo), so the
            # threads meet at the database's lock exactly as separate processes would.
            migrate.upgrade_if_behind(tracking_settings.model_copy())
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    workers = [threading.Thread(target=start_worker) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert errors == []
    assert migrate.current(tracking_settings) == migrate.head_revision()


def test_ensure_schema_after_downgrade_migrates_again(tracking_settings: LynxSettings):
    migrate.ensure_schema(tracking_settings)
    migrate.downgrade(tracking_settings, "base")
    migrate.ensure_schema(tracking_settings)
    assert _tables(tracking_settings) == TABLES


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_file_and_folder_are_created(make_settings, tmp_path, backend):
    settings = make_settings(backend=backend, database_url=f"sqlite:///{tmp_path}/deep/er/lynx.db")
    migrate.upgrade(settings)
    assert (tmp_path / "deep" / "er" / "lynx.db").is_file()


def test_database_ahead_of_this_lynx_is_a_clear_error(tracking_settings: LynxSettings):
    migrate.upgrade(tracking_settings)
    engine = make_engine(tracking_settings)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    engine.dispose()
    migrate._ensured.clear()
    with pytest.raises(ConfigurationError, match="from_the_future"):
        migrate.ensure_schema(tracking_settings)
    with pytest.raises(ConfigurationError, match="LYNX_DATABASE_URL"):
        migrate.downgrade(tracking_settings, "no-such-revision")
