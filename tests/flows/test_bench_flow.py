"""Flow ``lynx-bench`` and ``lynx bench``: a subjects x prompts protocol through the real flows."""

from __future__ import annotations

import json

from flows.bench import lynx_bench
from lynx.db.models import ArtifactKind
from lynx.evaluation.bench import BENCH_PROMPTS, SAMPLE_CONSENT, write_campaign_file
from tasks.services import services
from tests.flows.conftest import TINY_SETTINGS


def test_bench_flow_generates_and_evaluates_every_job(flow_env, photos, tmp_path):
    flow_env(eval_frame_stride=2)
    campaign = write_campaign_file(
        tmp_path / "campaign.yaml",
        name="bench-test",
        photos=[photos["astronaut"], photos["hanks"]],
        prompts=BENCH_PROMPTS[:2],
        settings=TINY_SETTINGS.model_dump(exclude_none=True),
        consent_reference=SAMPLE_CONSENT,
    )
    outcome = lynx_bench(str(campaign), "bench-test", report_dir=str(tmp_path / "report"))

    assert (outcome.subjects, outcome.prompts, outcome.jobs_by_status) == (2, 2, {"completed": 4})
    evaluation = outcome.evaluation
    assert (evaluation.videos, evaluation.evaluated, evaluation.reused) == (4, 4, 0)
    assert evaluation.no_face == 4  # the tiny random model paints noise: honest zero-face results
    assert evaluation.mean_similarity == {"sface_2021dec": None}
    assert (tmp_path / "report" / "report.html").is_file()
    svc = services()
    campaign_id = svc.tracker.get_campaign("bench-test").id
    assert len(svc.tracker.list_artifacts(campaign_id=campaign_id, kind=ArtifactKind.REPORT)) == 1
    assert outcome.generation_seconds > 0 and outcome.evaluation_seconds > 0
    assert "bench-test: 2 subjects x 2 prompts = 4 jobs (4 completed)" in outcome.summary_lines()[0]

    again = lynx_bench(str(campaign), "bench-test")  # nothing generated again, metrics reused
    assert again.jobs_by_status == {"completed": 4} and again.evaluation.reused == 4
    assert svc.tracker.campaign_summary("bench-test").compute["sample"].computed == 4


def test_bench_command_with_the_demo_model(lynx_cli, flow_env, tmp_path, tiny_model_dir):
    env = flow_env()
    env["LYNX_DEMO_MODEL_DIR"] = str(tiny_model_dir)
    done = lynx_cli(
        "bench",
        "--subjects",
        "1",
        "--prompts",
        "1",
        "--frames",
        "5",
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "2",
        "--json",
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RANDOM weights" in done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["name"].startswith("bench-small-1x1-demo-")  # and the protocol's hash
    assert outcome["jobs_by_status"] == {"completed": 1}
    assert outcome["evaluation"]["evaluated"] == 1 and outcome["evaluation"]["report"]["path"].endswith(
        ".html"
    )


def test_paper_protocol_needs_photos(lynx_cli, tmp_path):
    done = lynx_cli("bench", "--protocol", "paper")
    assert done.returncode == 4
    assert done.stderr.strip() == (
        "lynx: error: --protocol paper needs --photos: a folder with one photo per subject (40)"
    )
