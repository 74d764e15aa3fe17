"""The quality gate: verdict rules, and a real job held for review when its video is someone else."""

from __future__ import annotations

import pytest

from lynx.db.models import ArtifactKind, Evaluation, JobStatus
from lynx.db.tracking import Tracker
from lynx.evaluation import gate_job, gate_verdict
from lynx.faces.similarity import SimilarityStats
from lynx.store import open_store


def _metrics(*values):
    stats = SimilarityStats()
    for value in values:
        stats.add(value)
    return {"r": stats.result()}


@pytest.mark.parametrize(
    "values,passed,reason",
    [
        ((0.8, 0.9, 0.85, None), True, "0.850 (r) >= 0.600"),
        ((0.5, 0.55, 0.6, 0.5), False, "0.538 (r) is below the threshold 0.600"),
        ((None, None, None), False, "no face found in any sampled frame"),
        ((0.9, None, None, None), False, "a face shows in 25% of sampled frames, below the required 50%"),
    ],
)
def test_verdict_rules(eval_settings, values, passed, reason):
    settings = eval_settings(quality_gate_threshold=0.6, quality_gate_min_face_share=0.5)
    verdict = gate_verdict(_metrics(*values), "r", settings)
    assert verdict.enabled and verdict.passed is passed and verdict.needs_review is not passed
    assert reason in verdict.reason


def test_gate_is_off_without_a_threshold(eval_settings):
    verdict = gate_verdict(_metrics(0.1), "r", eval_settings())
    assert not verdict.enabled and verdict.passed and not verdict.needs_review and "off" in verdict.reason


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_gate_holds_the_other_persons_video_for_review(eval_settings, clips, backend):
    settings = eval_settings(backend=backend, quality_gate_threshold=0.5, eval_frame_stride=4)
    store = open_store(settings)
    with Tracker.from_settings(settings) as tracker:
        subject = tracker.create_subject("Astronaut", reference=store.put_file(clips.astronaut_reference))
        campaign = tracker.get_or_create_campaign("gate")
        job_ids = {}
        for prompt, video in (("same", clips.astronaut), ("other", clips.hanks), ("none", clips.coffee)):
            job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt=prompt, campaign_id=campaign.id)
            tracker.transition_job(job.id, JobStatus.RUNNING)  # as in the lynx flow: delivered, not finished
            stored = store.put_file(video, key=f"deliverables/gate/{job.id}/master.mp4")
            tracker.record_artifact(stored, kind=ArtifactKind.VIDEO, job_id=job.id)
            job_ids[prompt] = job.id

        verdicts = {
            p: gate_job(j, settings=settings, tracker=tracker, store=store) for p, j in job_ids.items()
        }

        assert verdicts["same"].passed and verdicts["same"].similarity > 0.85
        assert verdicts["other"].needs_review and verdicts["other"].similarity < 0.35
        assert verdicts["none"].needs_review and "no face" in verdicts["none"].reason
        same, other = tracker.get_job(job_ids["same"]), tracker.get_job(job_ids["other"])
        assert same.status is JobStatus.RUNNING and not same.needs_review  # the flow completes it
        assert other.status is JobStatus.NEEDS_REVIEW and other.needs_review
        assert other.error_stage == "quality_gate" and "below the threshold 0.500" in other.error_text
        summary = tracker.campaign_summary("gate")
        assert summary.needs_review_job_ids == [job_ids["other"], job_ids["none"]]
        assert summary.jobs_by_status[JobStatus.NEEDS_REVIEW] == 2


def _running_job_without_video(tracker, store, clips) -> int:
    subject = tracker.create_subject("A", reference=store.put_file(clips.astronaut_reference))
    job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="p")
    tracker.transition_job(job.id, JobStatus.RUNNING)
    return job.id


def test_gate_off_measures_nothing(eval_settings, clips):
    settings = eval_settings()
    store = open_store(settings)
    with Tracker.from_settings(settings) as tracker:
        job_id = _running_job_without_video(tracker, store, clips)
        verdict = gate_job(job_id, settings=settings, tracker=tracker, store=store)
        assert not verdict.enabled and tracker.get_job(job_id).status is JobStatus.RUNNING
        with tracker.transaction() as session:
            assert session.query(Evaluation).count() == 0


def test_a_job_without_a_video_fails_an_active_gate(eval_settings, clips):
    settings = eval_settings(quality_gate_threshold=0.5)
    store = open_store(settings)
    with Tracker.from_settings(settings) as tracker:
        job_id = _running_job_without_video(tracker, store, clips)
        verdict = gate_job(job_id, settings=settings, tracker=tracker, store=store)
        assert verdict.needs_review and "no delivered video" in verdict.reason
        assert tracker.get_job(job_id).status is JobStatus.NEEDS_REVIEW
