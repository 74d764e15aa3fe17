"""`lynx campaign run|status` and `lynx jobs list|show` against the real tracking database, and the
shipped example campaigns (the demo one runs as shipped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lynx.campaign import load_campaign
from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def test_the_shipped_campaigns_validate_and_the_demo_one_is_small():
    demo = load_campaign(EXAMPLES / "campaign.yaml")
    real = load_campaign(EXAMPLES / "campaign-real.yaml")
    for subject in demo.subjects:  # bundled photos only: it runs as shipped
        assert all(Path(photo).parent == REPO_ROOT.resolve() / "lynx" / "assets" for photo in subject.photos)
    for request in demo.requests():
        s = request.settings
        assert s.frames <= 17 and s.height * s.width <= 128 * 128 and s.steps <= 8
    assert {r.settings.seed for r in demo.requests()} == {42, 7}  # per-prompt overrides shown
    assert real.settings.steps == 50 and (real.settings.height, real.settings.width) == (480, 832)
    assert real.name != demo.name  # their jobs never mix in the tracking database


@pytest.fixture
def cli(monkeypatch):
    """``cli(*args)``: the lynx app in this process; the env the CLI sets is restored afterwards."""
    for name, value in {
        "PREFECT_LOGGING_LEVEL": "CRITICAL", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }.items():
        monkeypatch.setenv(name, value)
    from lynx.cli import app

    def run(*args: str):
        return CliRunner().invoke(app, list(args), catch_exceptions=True)

    return run


def test_the_shipped_demo_campaign_runs_in_process_and_the_operator_views_show_it(flow_env, cli):
    flow_env()
    ran = cli("campaign", "run", str(EXAMPLES / "campaign.yaml"))
    assert ran.exit_code == 0, (ran.output, ran.exception)
    assert "no deployment lynx-campaign/campaign" in ran.output  # the harness has no deployments

    status = cli("campaign", "status", "example-spring", "--json")
    assert status.exit_code == 0, status.output
    rows = json.loads(status.output)
    assert [(r["subject"], r["state"], r["attempt"]) for r in rows] == [("astronaut", "completed", 1)] * 2
    assert sorted(r["seed"] for r in rows) == [7, 42]
    assert all(r["deliverable"].endswith("/master.mp4") and r["error"] is None for r in rows)
    table = cli("campaign", "status", "example-spring").output.splitlines()
    assert table[0].split() == ["id", "subject", "prompt", "state", "attempt", "score", "seed",
                                "candidates", "deliverable", "error"]
    assert len(table) == 3 and all("completed" in line for line in table[1:])

    listed = json.loads(cli("jobs", "list", "--campaign", "example-spring", "--state", "COMPLETED",
                            "--limit", "1", "--json").output)
    assert [r["id"] for r in listed] == [max(r["id"] for r in rows)]  # newest first, limited
    assert json.loads(cli("jobs", "list", "--state", "failed", "--json").output) == []

    shown = cli("jobs", "show", str(rows[0]["id"]), "--json")
    detail = json.loads(shown.output)
    assert detail["campaign"] == "example-spring" and detail["state"] == "completed"
    stages = [s["stage"] for s in detail["stages"]]
    for stage in ("face", "sample", "decode", "deliver"):
        assert stage in stages
    assert all(s["status"] == "completed" and s["duration_s"] is not None for s in detail["stages"])
    assert detail["deliverables"]["master_key"] == rows[0]["deliverable"]
    text = cli("jobs", "show", str(rows[0]["id"])).output
    assert "stages:" in text and "deliver" in text and rows[0]["deliverable"] in text


def test_unknown_names_ids_and_states_are_one_line_errors(lynx_cli, make_pg_database, tmp_path):
    env = {"LYNX_HOME": str(tmp_path / "home"), "LYNX_DATABASE_URL": make_pg_database()}
    cases = [
        (("campaign", "status", "no-such-campaign"), 5, "no campaign named 'no-such-campaign'"),
        (("jobs", "list", "--campaign", "nope"), 5, "no campaign named 'nope'"),
        (("jobs", "show", "424242"), 5, "no job with id 424242"),
        (("jobs", "list", "--state", "done"), 4, "unknown job state 'done'; states: pending, running"),
        (("campaign", "run", str(tmp_path / "missing.yaml")), 4, "does not exist"),
    ]
    for args, code, message in cases:
        result = lynx_cli(*args, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code and len(lines) == 1 and message in lines[0], (args, result.stderr)
    empty = lynx_cli("jobs", "list", env=env)
    assert empty.returncode == 0 and empty.stdout.strip() == "no jobs"


def test_watch_follows_a_flow_run_and_fails_in_one_line_unless_completed(prefect_harness):
    from prefect import flow

    from lynx.deployed import watch
    from lynx.errors import JobFailedError

    @flow(name="lynx-watch-probe")
    def probe(fail: bool) -> int:
        if fail:
            raise ValueError("3 of 3 jobs failed")
        return 1

    seen: list[str] = []
    ok = probe(False, return_state=True)
    assert watch(ok.state_details.flow_run_id, interval=0.1, echo=seen.append).is_completed()
    assert seen[-1].endswith(": Completed")

    failed = probe(True, return_state=True)
    with pytest.raises(JobFailedError, match=r"ended Failed: .*3 of 3 jobs failed") as caught:
        watch(failed.state_details.flow_run_id, interval=0.1, echo=seen.append)
    assert "\n" not in str(caught.value)
