"""Flow ``lynx-campaign``: reuse across jobs, re-runs, and jobs that fail alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from prefect import get_client

from lynx.db.models import JobStatus
from lynx.evaluation.publish import artifact_key
from tasks.services import services
from tests.flows.conftest import TINY_SETTINGS, run_campaign

PROMPTS = ["a woman walking on a beach", "a man reading in a park", "a person smiling at the camera"]


def write_campaign(folder: Path, name: str, subjects: dict[str, str], prompts: list[str]) -> Path:
    path = folder / f"{name}.yaml"
    spec = {
        "name": name,
        "settings": TINY_SETTINGS.model_dump(exclude_none=True),
        "subjects": [
            {"id": sid, "photo": photo, "consent_reference": "test"} for sid, photo in subjects.items()
        ],
        "prompts": prompts,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def counts(campaign: str) -> dict[str, tuple[int, int]]:
    tracker = services().tracker
    summary = tracker.campaign_summary(campaign)
    return {kind: (c.computed, c.reused) for kind, c in summary.compute.items()}


def test_two_subjects_three_prompts_compute_each_thing_once_and_rerun_samples_nothing(
    flow_env, photos, tmp_path
):
    flow_env(gpu_batch_size=4)
    path = write_campaign(
        tmp_path, "reuse", {"astronaut": str(photos["astronaut"]), "tom": str(photos["hanks"])}, PROMPTS
    )
    outcomes = run_campaign(str(path))

    assert [o.status for o in outcomes] == ["completed"] * 6, [o.error_text for o in outcomes]
    computed = counts("reuse")
    # per subject: the face analysis, identity tokens and reference features
    assert computed["face"] == (2, 4)
    assert computed["identity_tokens"] == (2, 4)
    assert computed["reference_features"] == (2, 4)
    # per distinct prompt, plus the shared negative prompt once
    assert computed["prompt_embeds"] == (3, 3)
    assert computed["negative_prompt_embeds"] == (1, 5)
    # the unconditional reference once per worker process; the model once per process
    assert computed["uncond_reference"] == (1, 1)
    assert computed["model_load"][0] == 1
    assert computed["sample"] == (6, 0)

    with get_client(sync_client=True) as client:
        table = next(
            a for a in client.read_latest_artifacts(limit=100) if a.key == artifact_key("campaign", "reuse")
        )
    assert table.type == "table" and "a man reading in a park" in table.data

    again = run_campaign(name="reuse")  # by name: the spec stored by the first run
    assert [o.status for o in again] == ["completed"] * 6
    assert all(o.earlier for o in again)
    assert [o.master_key for o in again] == [o.master_key for o in outcomes]
    assert counts("reuse") == computed  # nothing was computed again, sampling included


def test_a_photo_without_a_face_fails_its_jobs_alone_and_a_rerun_retries_them(flow_env, photos, tmp_path):
    flow_env(gpu_batch_size=8)
    subjects = {
        "astronaut": str(photos["astronaut"]),
        "blank": str(photos["noface"]),
        "ghost": str(tmp_path / "missing.jpg"),
    }
    path = write_campaign(tmp_path, "mixed", subjects, PROMPTS[:2])
    outcomes = run_campaign(str(path))
    by_subject = {}
    for outcome in outcomes:
        by_subject.setdefault(outcome.subject, []).append(outcome)

    assert [o.status for o in by_subject["astronaut"]] == ["completed", "completed"]
    for outcome in by_subject["blank"]:
        assert outcome.status == "failed" and outcome.error_stage == "face"
        assert "no face found" in outcome.error_text
    for outcome in by_subject["ghost"]:
        assert outcome.status == "failed" and outcome.error_stage == "submit"
        assert "missing.jpg" in outcome.error_text
    svc = services()
    blank_job = by_subject["blank"][0].job_id
    assert not list(svc.store.list(f"deliverables/mixed/{blank_job}/"))
    assert "sample" not in {run.stage for run in svc.tracker.stage_runs(blank_job)}

    again = run_campaign(str(path))
    retried = [o for o in again if o.subject == "blank"]
    assert all(o.status == "failed" and o.attempt == 2 for o in retried)
    assert all(o.earlier for o in again if o.subject == "astronaut")
    summary = svc.tracker.campaign_summary("mixed")
    assert summary.jobs_by_status[JobStatus.COMPLETED] == 2
    assert summary.jobs_by_status[JobStatus.FAILED] == 4


def test_a_purged_subject_fails_its_requests_alone_and_its_photo_is_not_stored_again(
    flow_env, photos, tmp_path
):
    flow_env(gpu_batch_size=8)
    tracker = services().tracker
    grace = tracker.create_subject("Grace", external_ref="grace")
    campaign = tracker.get_or_create_campaign("purged")
    earlier, _ = tracker.get_or_create_job(  # a job from before the purge, failed
        subject_id=grace.id, prompt=PROMPTS[0], params=TINY_SETTINGS.job_params(), campaign_id=campaign.id
    )
    tracker.transition_job(earlier.id, JobStatus.RUNNING)
    tracker.transition_job(earlier.id, JobStatus.FAILED, error_stage="sample", error_text="out of memory")
    tracker.mark_subject_purged(grace.id, [])

    subjects = {"astronaut": str(photos["astronaut"]), "grace": str(photos["hanks"])}
    outcomes = run_campaign(str(write_campaign(tmp_path, "purged", subjects, PROMPTS[:2])))
    by_subject = {}
    for outcome in outcomes:
        by_subject.setdefault(outcome.subject, []).append(outcome)

    assert [o.status for o in by_subject["astronaut"]] == ["completed", "completed"]
    assert [(o.job_id, o.status, o.error_stage) for o in by_subject["grace"]] == [
        (earlier.id, "failed", "submit"),  # the old job is not run again
        (None, "failed", "submit"),  # and no new one is recorded
    ]
    assert all("was purged" in o.error_text for o in by_subject["grace"])
    assert [job.id for job in tracker.list_jobs(subject_id=grace.id)] == [earlier.id]
    assert "sample" not in {r.stage for r in tracker.stage_runs(earlier.id) if r.attempt == 2}
    keys = list(services().store.list(""))
    assert any(hashlib.sha256(photos["astronaut"].read_bytes()).hexdigest() in key for key in keys)
    assert not any(hashlib.sha256(photos["hanks"].read_bytes()).hexdigest() in key for key in keys)
    with get_client(sync_client=True) as client:
        table = next(
            a for a in client.read_latest_artifacts(limit=100) if a.key == artifact_key("campaign", "purged")
        )
    assert "was purged" in table.data


def test_a_campaign_file_error_names_line_and_field_in_a_local_or_stored_file(flow_env, tmp_path):
    import pytest

    from lynx.errors import InputError
    from tasks.campaign import read_campaign_spec

    flow_env()
    text = "name: broken\nsubjects:\n  - id: a\n    photo: a.jpg\n  - id: b\nprompts: [hello]\n"
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(
        InputError, match=r"broken.yaml:5: subjects\[1\]: give photo \(a path or store key\) or photos"
    ):
        read_campaign_spec(str(path))
    key = services().store.put_bytes(text.encode(), key="campaigns/broken.yaml").key
    with pytest.raises(InputError, match=r"^campaigns/broken.yaml:5: subjects\[1\]: give photo"):
        read_campaign_spec(key)
    with pytest.raises(InputError, match="neither a file on this machine nor an object"):
        read_campaign_spec("campaigns/missing.yaml")
