"""Run tracking on PostgreSQL and SQLite: job lifecycle, transitions, concurrency, records, summaries."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from lynx.db.models import BIOMETRIC_KINDS, JOB_TRANSITIONS, ArtifactKind, JobStatus, StageStatus
from lynx.db.tracking import ComputeCounts, Tracker
from lynx.errors import IllegalTransitionError, InputError, NotFoundError
from lynx.settings import LynxSettings
from lynx.store import StoredObject

PARAMS = {
    "seed": 42,
    "frames": 81,
    "height": 480,
    "width": 832,
    "steps": 50,
    "guidance": 5.0,
    "variant": "lite",
}


def _stored(name: str, size: int = 10) -> StoredObject:
    sha = name.encode().hex().ljust(64, "0")[:64]
    return StoredObject(f"sha256/{sha[:2]}/{sha}", sha, size, "application/octet-stream")


def test_job_lifecycle_with_retry(tracker: Tracker, subject_id: int):
    campaign = tracker.get_or_create_campaign("spring-launch", spec={"prompts": ["a walk on the beach"]})
    job, created = tracker.get_or_create_job(
        subject_id=subject_id, prompt="a walk on the beach", params=PARAMS, campaign_id=campaign.id
    )
    assert created and job.status is JobStatus.PENDING and job.attempt == 1 and job.version == 1
    assert job.created_at.tzinfo is not None

    running = tracker.transition_job(job.id, JobStatus.RUNNING)
    assert running.started_at is not None and running.finished_at is None and running.version == 2

    failed = tracker.transition_job(job.id, "failed", error_stage="sample", error_text="CUDA out of memory")
    assert (failed.status, failed.error_stage, failed.error_text) == (
        JobStatus.FAILED,
        "sample",
        "CUDA out of memory",
    )
    assert failed.finished_at >= failed.started_at

    retried = tracker.transition_job(job.id, JobStatus.PENDING)
    assert retried.attempt == 2 and retried.error_text is None and retried.started_at is None

    tracker.transition_job(job.id, JobStatus.RUNNING)
    review = tracker.transition_job(job.id, JobStatus.NEEDS_REVIEW, error_text="identity score 0.41 < 0.5")
    assert review.needs_review is True
    done = tracker.transition_job(job.id, JobStatus.COMPLETED)
    assert done.status is JobStatus.COMPLETED and done.version == 7
    assert tracker.get_job(job.id).status is JobStatus.COMPLETED


def test_rerun_finds_the_same_job(tracker: Tracker, subject_id: int):
    campaign = tracker.get_or_create_campaign("c")
    assert tracker.get_or_create_campaign("c").id == campaign.id
    first, created = tracker.get_or_create_job(
        subject_id=subject_id, prompt="p", params=PARAMS, campaign_id=campaign.id
    )
    again, created_again = tracker.get_or_create_job(
        subject_id=subject_id, prompt="p", params=dict(reversed(PARAMS.items())), campaign_id=campaign.id
    )
    assert created and not created_again and again.id == first.id
    other_seed, created_other = tracker.get_or_create_job(
        subject_id=subject_id, prompt="p", params={**PARAMS, "seed": 7}, campaign_id=campaign.id
    )
    assert created_other and other_seed.id != first.id
    loose, _ = tracker.get_or_create_job(subject_id=subject_id, prompt="p", params=PARAMS)
    loose_again, created_loose = tracker.get_or_create_job(subject_id=subject_id, prompt="p", params=PARAMS)
    assert loose.id == loose_again.id and not created_loose and loose.id != first.id


ILLEGAL = [(src, dst) for src in JobStatus for dst in JobStatus if dst not in JOB_TRANSITIONS[src]]
# The shortest way to bring a new job into each status.
PATH_TO = {
    JobStatus.PENDING: [],
    JobStatus.RUNNING: [JobStatus.RUNNING],
    JobStatus.CANCELLED: [JobStatus.CANCELLED],
    JobStatus.FAILED: [JobStatus.RUNNING, JobStatus.FAILED],
    JobStatus.COMPLETED: [JobStatus.RUNNING, JobStatus.COMPLETED],
    JobStatus.NEEDS_REVIEW: [JobStatus.RUNNING, JobStatus.NEEDS_REVIEW],
}


def test_illegal_transitions_are_rejected_and_change_nothing(tracker: Tracker, subject_id: int):
    assert len(ILLEGAL) == 36 - sum(len(v) for v in JOB_TRANSITIONS.values())
    for number, (src, dst) in enumerate(ILLEGAL):
        job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt=f"prompt {number}")
        for step in PATH_TO[src]:
            tracker.transition_job(job.id, step)
        before = tracker.get_job(job.id)
        with pytest.raises(IllegalTransitionError, match=f"from {src.value} to {dst.value}"):
            tracker.transition_job(job.id, dst)
        after = tracker.get_job(job.id)
        assert (after.status, after.version, after.attempt) == (before.status, before.version, before.attempt)


def test_unknown_job_and_status(tracker: Tracker, subject_id: int):
    with pytest.raises(NotFoundError, match="no job with id 999"):
        tracker.transition_job(999, JobStatus.RUNNING)
    job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt="p")
    with pytest.raises(ValueError):
        tracker.transition_job(job.id, "exploded")


def _run_at_once(settings: LynxSettings, work: Callable[[Tracker, int], None], workers: int = 2) -> None:
    """Run ``work(tracker, index)`` in threads that start together, each with its own engine."""
    trackers = [Tracker.from_settings(settings) for _ in range(workers)]
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            work(trackers[index], index)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for tracker in trackers:
        tracker.close()
    if errors:
        raise errors[0]


def test_concurrent_updates_from_two_connections_lose_nothing(
    tracking_settings: LynxSettings, tracker: Tracker, subject_id: int
):
    """Two workers hammer one job: claim it (pending->running), fail it, retry it (attempt+1).

    Every successful claim must be followed by exactly one retry, so the final attempt count and
    version must account for every claim. A lost update (a read-modify-write that overwrote the
    other worker's change) would show up as a missing attempt or version.
    """
    job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt="contended")
    claims = [0, 0]

    def work(mine: Tracker, index: int) -> None:
        for _ in range(15):
            try:
                mine.transition_job(job.id, JobStatus.RUNNING)
            except IllegalTransitionError:
                continue  # the other worker holds it
            claims[index] += 1
            mine.transition_job(job.id, JobStatus.FAILED, error_stage="sample", error_text=f"worker {index}")
            mine.transition_job(job.id, JobStatus.PENDING)

    _run_at_once(tracking_settings, work)

    final = tracker.get_job(job.id)
    total = sum(claims)
    assert total >= 1
    assert final.status is JobStatus.PENDING
    assert final.attempt == 1 + total
    assert final.version == 1 + 3 * total


def test_two_workers_claiming_at_once_exactly_one_wins(
    tracking_settings: LynxSettings, tracker: Tracker, subject_id: int
):
    for round_number in range(5):
        job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt=f"race {round_number}")
        outcome: list[str] = []

        def claim(worker: Tracker, _index: int, job_id: int = job.id, outcome: list[str] = outcome) -> None:
            try:
                worker.transition_job(job_id, JobStatus.RUNNING)
                outcome.append("won")
            except IllegalTransitionError:
                outcome.append("lost")

        _run_at_once(tracking_settings, claim)
        assert sorted(outcome) == ["lost", "won"]
        assert tracker.get_job(job.id).version == 2


def test_workers_creating_the_same_job_at_once_get_one_job(
    tracking_settings: LynxSettings, tracker: Tracker, subject_id: int
):
    campaign = tracker.get_or_create_campaign("rush")
    for round_number in range(5):
        results: list[tuple[int, bool]] = []

        def create(
            worker: Tracker, _index: int, prompt: str = f"same {round_number}", results: list = results
        ) -> None:
            job, created = worker.get_or_create_job(
                subject_id=subject_id, prompt=prompt, params=PARAMS, campaign_id=campaign.id
            )
            results.append((job.id, created))

        _run_at_once(tracking_settings, create)
        assert len({job_id for job_id, _ in results}) == 1
        assert sorted(created for _, created in results) == [False, True]
    assert len(tracker.list_jobs(campaign_id=campaign.id)) == 5


def test_two_finishes_of_one_stage_run_exactly_one_wins(
    tracking_settings: LynxSettings, tracker: Tracker, subject_id: int
):
    job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt="finish race")
    runs = [tracker.record_stage_start(job.id, "sample").id for _ in range(30)]
    step = threading.Barrier(2, timeout=60)
    winners: dict[int, list[int]] = {run_id: [] for run_id in runs}

    def finish(mine: Tracker, index: int) -> None:
        for run_id in runs:
            step.wait()
            try:
                mine.record_stage_finish(run_id, metrics={"worker": index}, error_text=f"worker {index}")
            except IllegalTransitionError:
                continue
            winners[run_id].append(index)

    _run_at_once(tracking_settings, finish)

    assert all(len(won) == 1 for won in winners.values()), winners
    for run in tracker.stage_runs(job.id):
        assert run.status is StageStatus.COMPLETED
        [winner] = winners[run.id]
        assert run.metrics == {"worker": winner} and run.error_text == f"worker {winner}"


def test_stage_runs_record_timing_outputs_and_failures(tracker: Tracker, subject_id: int):
    job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt="p")
    with tracker.stage(job.id, "embed_face", inputs=["sha256/aa/photo"], flow_run_id="fr-1") as stage:
        time.sleep(0.05)
        stage.output_keys.append("sha256/bb/embedding")
        stage.metrics["det_score"] = 0.93
    with pytest.raises(RuntimeError, match="decoder exploded"), tracker.stage(job.id, "decode"):
        raise RuntimeError("decoder exploded")

    embed, decode = tracker.stage_runs(job.id)
    assert (embed.stage, embed.status, embed.attempt, embed.flow_run_id) == (
        "embed_face",
        StageStatus.COMPLETED,
        1,
        "fr-1",
    )
    assert embed.input_keys == ["sha256/aa/photo"] and embed.output_keys == ["sha256/bb/embedding"]
    assert embed.metrics == {"det_score": 0.93} and embed.duration_s >= 0.05
    assert decode.status is StageStatus.FAILED and decode.error_text == "RuntimeError: decoder exploded"
    with pytest.raises(IllegalTransitionError, match="already finished"):
        tracker.record_stage_finish(decode.id)

    manual = tracker.record_stage_start(job.id, "upscale")
    finished = tracker.record_stage_finish(
        manual.id, status=StageStatus.SKIPPED, metrics={"reason": "already 1080p"}
    )
    assert finished.status is StageStatus.SKIPPED and finished.duration_s >= 0


def test_artifacts_take_owners_from_their_job(tracker: Tracker, subject_id: int):
    campaign = tracker.get_or_create_campaign("c")
    job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt="p", campaign_id=campaign.id)
    embedding = tracker.record_artifact(_stored("emb"), kind="face_embedding", job_id=job.id)
    video = tracker.record_artifact(
        _stored("vid", size=5_000_000_000), kind=ArtifactKind.VIDEO, job_id=job.id
    )

    assert (embedding.subject_id, embedding.campaign_id, embedding.biometric) == (
        subject_id,
        campaign.id,
        True,
    )
    assert video.biometric is False and video.size == 5_000_000_000  # BIGINT: videos exceed 2 GiB
    assert [a.id for a in tracker.list_artifacts(job_id=job.id, kind="video")] == [video.id]
    assert len(tracker.list_artifacts(subject_id=subject_id)) == 2
    with pytest.raises(InputError, match="unknown artifact kind 'selfie'"):
        tracker.record_artifact(_stored("x"), kind="selfie", job_id=job.id)


def test_biometric_artifact_needs_a_subject(tracker: Tracker):
    campaign = tracker.get_or_create_campaign("c")
    for kind in sorted(k.value for k in BIOMETRIC_KINDS):
        with pytest.raises(InputError, match=f"'{kind}' is biometric data: give the subject_id"):
            tracker.record_artifact(_stored("orphan"), kind=kind)
        with pytest.raises(InputError, match="biometric"):
            tracker.record_artifact(_stored("orphan"), kind=kind, campaign_id=campaign.id)
    assert tracker.list_artifacts() == []
    assert tracker.record_artifact(_stored("manifest"), kind="manifest").biometric is False


def test_subject_reference_and_duplicates(tracker: Tracker):
    photo = _stored("photo")
    subject = tracker.create_subject(
        "Grace", external_ref="crm-17", reference=photo, consent_reference="form-9"
    )
    assert subject.reference_key == photo.key and subject.consent_given_at is not None
    assert subject.retention_until - subject.created_at > timedelta(days=29)
    [row] = tracker.list_artifacts(subject_id=subject.id)
    assert (row.kind, row.biometric) == ("reference_photo", True)
    assert tracker.find_subject("crm-17").id == subject.id
    with pytest.raises(InputError, match="crm-17"):
        tracker.create_subject("Grace again", external_ref="crm-17")


def test_purged_subject_gets_no_new_jobs(tracker: Tracker, subject_id: int):
    tracker.mark_subject_purged(subject_id, [])
    with pytest.raises(InputError, match="purged"):
        tracker.get_or_create_job(subject_id=subject_id, prompt="p")
    with pytest.raises(InputError, match="purged"):
        tracker.record_artifact(_stored("crop"), kind="id_crop", subject_id=subject_id)


def test_job_outputs_are_recorded_together_and_a_retry_supersedes_the_live_rows(
    tracker: Tracker, subject_id: int
):
    job, _ = tracker.get_or_create_job(subject_id=subject_id, prompt="p")
    master, manifest, poster = _stored("master"), _stored("manifest"), _stored("poster")
    first = tracker.record_job_outputs([(master, "video"), (manifest, "manifest")], job_id=job.id)
    again = tracker.record_job_outputs([(master, "video"), (poster, "preview")], job_id=job.id)
    live = tracker.list_artifacts(job_id=job.id)
    assert [row.id for row in live] == [first[1].id] + [row.id for row in again]  # one live row per key
    assert live[0].subject_id == subject_id
    with pytest.raises(InputError, match="unknown artifact kind"):  # all rows or none
        tracker.record_job_outputs([(_stored("other"), "video"), (_stored("x"), "nonsense")], job_id=job.id)
    assert len(tracker.list_artifacts(job_id=job.id)) == 3

    tracker.mark_artifacts_deleted([row.id for row in again])
    assert [row.id for row in tracker.list_artifacts(job_id=job.id)] == [first[1].id]
    assert len(tracker.list_artifacts(job_id=job.id, include_deleted=True)) == 4


def test_compute_events_and_campaign_summary(tracker: Tracker, subject_id: int):
    campaign = tracker.get_or_create_campaign("summer")
    jobs = [
        tracker.get_or_create_job(subject_id=subject_id, prompt=f"p{i}", campaign_id=campaign.id)[0]
        for i in range(4)
    ]
    for job in jobs:
        tracker.transition_job(job.id, JobStatus.RUNNING)
        with tracker.stage(job.id, "sample"):
            pass
        tracker.record_compute_event(
            "face_embedding", "emb-of-subject", reused=job is not jobs[0], job_id=job.id
        )
    tracker.record_compute_event("prompt_embeds", "p0", reused=False, job_id=jobs[0].id, duration_s=1.5)
    tracker.transition_job(jobs[0].id, JobStatus.COMPLETED)
    tracker.transition_job(jobs[1].id, JobStatus.FAILED, error_stage="decode", error_text="bad latents")
    tracker.transition_job(jobs[2].id, JobStatus.NEEDS_REVIEW)

    summary = tracker.campaign_summary("summer")
    assert summary.total_jobs == 4
    assert summary.jobs_by_status[JobStatus.COMPLETED] == 1
    assert summary.jobs_by_status[JobStatus.RUNNING] == 1
    assert summary.jobs_by_status[JobStatus.PENDING] == 0
    assert summary.needs_review_job_ids == [jobs[2].id]
    assert [(f.job_id, f.error_stage, f.error_text) for f in summary.failures] == [
        (jobs[1].id, "decode", "bad latents")
    ]
    assert summary.stage_timings["sample"].runs == 4
    assert summary.compute == {
        "face_embedding": ComputeCounts(computed=1, reused=3),
        "prompt_embeds": ComputeCounts(computed=1, reused=0),
    }
    assert tracker.compute_counts(job_id=jobs[1].id) == {
        "face_embedding": ComputeCounts(computed=0, reused=1)
    }
    with pytest.raises(NotFoundError, match="winter"):
        tracker.campaign_summary("winter")


def test_timestamps_are_utc_aware_on_both_backends(tracker: Tracker):
    local_noon = datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    subject = tracker.create_subject("Tz", retention_until=local_noon)
    stored = tracker.get_subject(subject.id).retention_until
    assert stored == local_noon and stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
    assert [s.id for s in tracker.expired_subjects(now=datetime(2030, 1, 1, 10, 1, tzinfo=timezone.utc))] == [
        subject.id
    ]
    assert tracker.expired_subjects(now=datetime(2030, 1, 1, 9, 59, tzinfo=timezone.utc)) == []
