"""Flow ``lynx-eval`` in a Prefect test harness, and ``lynx eval`` as users run it."""

from __future__ import annotations

import json
from urllib.parse import urlparse
from urllib.request import urlopen

import pytest
from prefect import flow
from sqlalchemy import func, select

from lynx.db.models import ArtifactKind, Evaluation, JobStatus
from lynx.db.tracking import Tracker
from lynx.evaluation.publish import EvaluationOutcome, artifact_key
from lynx.settings import get_settings
from lynx.store import open_store
from tests.conftest import settings_env
from tests.eval.conftest import write_manifest


@pytest.fixture
def use_settings(monkeypatch):
    """Make ``settings`` the process's LYNX_* environment: what a worker's flow run reads."""
    from tasks.services import reset_services

    def apply(settings):
        for key, value in settings_env(settings).items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        reset_services()
        return settings

    yield apply
    reset_services()


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def test_campaign_flow_records_reports_and_is_idempotent(
    prefect_harness, eval_settings, use_settings, clips, s3_reset
):
    from flows.evaluate import lynx_eval

    settings = use_settings(
        eval_settings(backend="postgres", store="s3", eval_frame_stride=4, quality_gate_threshold=0.5)
    )
    store = open_store(settings)
    with Tracker.from_settings(settings) as tracker:
        subject = tracker.create_subject(
            "Astronaut", external_ref="astro", reference=store.put_file(clips.astronaut_reference)
        )
        campaign = tracker.get_or_create_campaign("autumn")
        for prompt, video in (("walks", clips.astronaut), ("talks", clips.hanks)):
            job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt=prompt, campaign_id=campaign.id)
            tracker.transition_job(job.id, JobStatus.RUNNING)
            stored = store.put_file(video, key=f"deliverables/autumn/{job.id}/master.mp4")
            tracker.record_artifact(stored, kind=ArtifactKind.VIDEO, job_id=job.id)
            tracker.transition_job(job.id, JobStatus.COMPLETED)

        state = lynx_eval(campaign="autumn", return_state=True)
        outcome = state.result()
        assert (outcome.videos, outcome.evaluated, outcome.reused, outcome.needs_review) == (2, 2, 0, 1)
        assert outcome.mean_similarity["sface_2021dec"] == pytest.approx(0.54, abs=0.1)
        report = outcome.report
        assert report.key.startswith("reports/eval/autumn/") and report.path.is_file()
        assert store.get_bytes(report.key) == report.path.read_bytes()
        assert urlparse(report.url).scheme == "http"  # presigned GET on the S3 server
        assert urlopen(report.url).read() == report.path.read_bytes()
        (recorded,) = tracker.list_artifacts(campaign_id=campaign.id, kind=ArtifactKind.REPORT)
        assert recorded.key == report.key and not recorded.biometric

        artifacts = _artifacts(state.state_details.flow_run_id)
        key = artifact_key("lynx-eval", "autumn")
        assert key.startswith("lynx-eval-autumn-")
        assert set(artifacts) == {key, f"{key}-report", f"{key}-summary", f"{key}-progress"}
        link = artifacts[f"{key}-report"]  # Prefect stores links as markdown
        assert link.data == f"[Evaluation report: autumn]({report.url})"
        table = artifacts[key]
        assert table.type == "table"
        rows = json.loads(table.data)
        assert [row["prompt"] for row in rows] == ["walks", "talks"]
        assert rows[1]["gate"].startswith("review: identity similarity")
        assert "needs review: 1" in artifacts[f"{key}-summary"].data
        assert artifacts[f"{key}-progress"].data == 100.0

        again = lynx_eval(campaign="autumn")
        assert (again.evaluated, again.reused) == (2, 2)
        assert again.report.key != report.key  # a new report; the same metric rows
        with tracker.transaction() as session:
            assert session.scalar(select(func.count()).select_from(Evaluation)) == 2
        assert len(tracker.list_artifacts(campaign_id=campaign.id, kind=ArtifactKind.REPORT)) == 2


LOOKALIKE_NAMES = ["Spring 2025", "spring-2025", "Été 2025", "ete 2025", "x" * 80 + "-a", "x" * 80 + "-b"]


def test_lookalike_names_get_their_own_valid_artifact_keys(prefect_harness, eval_settings, use_settings):
    from prefect import flow

    from lynx.evaluation.sources import EvaluationSource
    from tasks.evaluate import evaluation_report
    from tasks.report import report_campaign
    from tasks.services import services

    use_settings(eval_settings())
    for name in LOOKALIKE_NAMES:
        services().tracker.get_or_create_campaign(name)

    @flow
    def report_all() -> None:
        for name in LOOKALIKE_NAMES:
            report_campaign(name, [])
            evaluation_report(EvaluationSource(name=name, description=f"videos of {name}", items=[]), [])

    state = report_all(return_state=True)
    assert state.is_completed(), state.message
    artifacts = _artifacts(state.state_details.flow_run_id)
    # six names, each with its own campaign table + compute summary and eval table + link + summary
    assert len(artifacts) == 5 * len(LOOKALIKE_NAMES)
    for name in LOOKALIKE_NAMES:
        campaign, evaluation = artifact_key("campaign", name), artifact_key("lynx-eval", name)
        assert artifacts[campaign].description == f"Campaign {name}: jobs"
        assert f"Campaign {name}\n" in artifacts[f"{campaign}-compute"].data
        assert artifacts[evaluation].description == f"Identity similarity per video: videos of {name}"
        assert f"Evaluation report: {name}]" in artifacts[f"{evaluation}-report"].data
    assert artifact_key("campaign", "Été 2025").startswith("campaign-ete-2025-")


@pytest.mark.parametrize("failures", [1, 10])
def test_a_failing_artifact_call_never_publishes_the_report_twice(
    prefect_harness, eval_settings, use_settings, monkeypatch, failures
):
    import tasks.evaluate
    from flows.evaluate import _retrying
    from lynx.evaluation.sources import EvaluationSource
    from tasks.services import services

    settings = use_settings(eval_settings(retry_delay_seconds=0))
    campaign = services().tracker.get_or_create_campaign("winter")
    real, calls = tasks.evaluate.create_link_artifact, []

    def flaky_link(*args, **kwargs):  # the Prefect API drops out after the report is published
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionError("connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.evaluate, "create_link_artifact", flaky_link)
    source = EvaluationSource(name="winter", description="no videos", items=[], campaign_id=campaign.id)

    @flow
    def report() -> EvaluationOutcome:  # the task as lynx-eval runs it: retried on transient errors
        return _retrying(tasks.evaluate.evaluation_report)(source, [])

    state = report(return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    (recorded,) = services().tracker.list_artifacts(campaign_id=campaign.id, kind=ArtifactKind.REPORT)
    assert recorded.key == outcome.report.key
    assert list(open_store(settings).list("reports/eval/")) == [outcome.report.key]
    key = artifact_key("lynx-eval", "winter")
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert {key, f"{key}-summary"} <= set(artifacts)  # the other artifacts are made either way
    # a blip is retried in place; an API that stays down costs the link, not the evaluation
    assert (f"{key}-report" in artifacts) == (failures < tasks.evaluate.ARTIFACT_ATTEMPTS)
    assert len(calls) == min(failures + 1, tasks.evaluate.ARTIFACT_ATTEMPTS)


def test_eval_videos_command(lynx_cli, eval_settings, clips, tmp_path):
    settings = eval_settings(eval_frame_stride=4)
    manifest = write_manifest(
        clips.folder,
        [
            {
                "video": "astronaut.mp4",
                "reference_photo": "astronaut_ref.jpg",
                "subject": "astronaut",
                "prompt": "p",
            },
            {
                "video": "coffee.mp4",
                "reference_photo": "astronaut_ref.jpg",
                "subject": "astronaut",
                "prompt": "q",
            },
        ],
        name="cli",
    )
    out = tmp_path / "report"
    done = lynx_cli(
        "eval",
        "videos",
        "--manifest",
        str(manifest),
        "--report-dir",
        str(out),
        "--json",
        settings=settings,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert (outcome["videos"], outcome["evaluated"], outcome["no_face"], outcome["needs_review"]) == (
        2,
        2,
        1,
        None,
    )
    assert outcome["mean_similarity"]["sface_2021dec"] > 0.85
    assert outcome["report"]["path"] == str(out / "report.html") and (out / "report.html").is_file()
    assert outcome["report"]["url"].startswith("file://")


def test_eval_command_errors_are_one_line(lynx_cli, eval_settings, tmp_path):
    settings = eval_settings()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {video: a.mp4}\n", encoding="utf-8")
    done = lynx_cli("eval", "videos", "--manifest", str(bad), settings=settings)
    assert done.returncode == 4 and done.stderr.strip().splitlines() == [
        f"lynx: error: manifest {bad}: videos.0.reference_photo: Field required"
    ]
    done = lynx_cli("eval", "campaign", "absent", settings=settings)
    assert done.returncode == 5 and done.stderr.strip() == "lynx: error: no campaign named 'absent'"


def test_prefect_yaml_deploys_lynx_eval_on_the_cpu_pool():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from tests.conftest import REPO_ROOT

    deployments = {
        d["name"]: d for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    }
    evaluate = deployments["evaluate"]
    assert load_flow_from_entrypoint(str(REPO_ROOT / evaluate["entrypoint"])).name == "lynx-eval"
    assert evaluate["work_pool"]["name"] == "lynx-cpu"
    assert evaluate["parameters"] == {"campaign": "example-spring"}
