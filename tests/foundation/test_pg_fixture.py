"""The PostgreSQL fixture never lets CI pass without PostgreSQL."""

from __future__ import annotations

import pytest

from tests.conftest import postgres_unavailable


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_missing_postgres_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is not running"):
        postgres_unavailable("PostgreSQL is not running on 127.0.0.1:5432")


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_missing_postgres_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch, ci: str | None):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not running"):
        postgres_unavailable("PostgreSQL is not running on 127.0.0.1:5432")
