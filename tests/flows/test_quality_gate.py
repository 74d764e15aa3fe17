"""The quality gate inside the flows: a delivered video that does not show its subject is held for
review (job ``needs_review``, files kept, listed in the campaign summary) instead of completed.

The tiny random model paints noise, so no face is ever found in its videos: with the gate on,
every job must be held; with it off (the default, all other flow tests) every job completes.
"""

from __future__ import annotations

from flows.campaign import lynx_campaign
from flows.generate import lynx
from lynx.db.models import JobStatus
from tasks.services import services
from tests.flows.conftest import TINY_SETTINGS
from tests.flows.test_campaign_flow import PROMPTS, write_campaign


def test_lynx_flow_holds_a_faceless_video_for_review(flow_env, photos):
    flow_env(quality_gate_threshold=0.5, eval_frame_stride=1)
    outcome = lynx(str(photos["astronaut"]), "a woman smiling at the camera", settings=TINY_SETTINGS)
    svc = services()

    assert outcome.status == "needs_review", outcome.error_text
    assert outcome.error_stage == "quality_gate"
    assert outcome.error_text == "quality gate: no face found in any sampled frame"
    job = svc.tracker.get_job(outcome.job_id)
    assert job.status is JobStatus.NEEDS_REVIEW and job.needs_review
    # the files stay for the reviewer, and the outcome says where
    assert outcome.master_key == f"deliverables/adhoc/{job.id}/master.mp4"
    assert svc.store.exists(outcome.master_key) and svc.store.exists(outcome.manifest_key)

    runs = {run.stage: run for run in svc.tracker.stage_runs(job.id)}
    gate = runs["deliver"].metrics["quality_gate"]
    assert gate["enabled"] and not gate["passed"] and gate["threshold"] == 0.5
    assert runs["evaluate"].metrics["frames_sampled"] == TINY_SETTINGS.frames
    assert runs["evaluate"].metrics["frames_with_face"] == 0


def test_campaign_summary_lists_the_held_jobs(flow_env, photos, tmp_path):
    flow_env(quality_gate_threshold=0.5)
    path = write_campaign(tmp_path, "gated", {"astronaut": str(photos["astronaut"])}, PROMPTS[:2])
    outcomes = lynx_campaign(str(path))

    assert [o.status for o in outcomes] == ["needs_review"] * 2
    summary = services().tracker.campaign_summary("gated")
    assert summary.needs_review_job_ids == [o.job_id for o in outcomes]
    assert summary.jobs_by_status[JobStatus.NEEDS_REVIEW] == 2
    assert summary.jobs_by_status[JobStatus.COMPLETED] == 0

    again = lynx_campaign(name="gated")  # a re-run leaves jobs under review alone
    assert [o.status for o in again] == ["needs_review"] * 2
    assert services().tracker.campaign_summary("gated").compute["sample"].computed == 2
