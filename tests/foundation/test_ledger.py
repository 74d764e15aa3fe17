"""The job ledger's rules (lynx/ledger.py) on real databases and stores, without flows or models:
stored work counts only while it verifies, a delivered job with damaged files is reopened, the
newest decoded video and checkpoint that verify are found, checkpoints are biometric and purged."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from lynx import ledger
from lynx.db.models import ArtifactKind, JobStatus, StageStatus, utcnow
from lynx.db.tracking import Tracker
from lynx.errors import InputError
from lynx.retention import purge_expired
from lynx.store import ArtifactStore, open_store

from .conftest import overwrite_bytes

DELIVERABLES = {
    "master.mp4": ArtifactKind.VIDEO,
    "poster.jpg": ArtifactKind.PREVIEW,
    "manifest.json": ArtifactKind.MANIFEST,
}


@pytest.fixture(
    params=[("sqlite", "local"), ("postgres", "local"), ("postgres", "s3")],
    ids=["sqlite-local", "postgres-local", "postgres-s3"],
)
def world(request, make_settings):
    backend, store_backend = request.param
    settings = make_settings(backend=backend, store=store_backend)
    tracker = Tracker.from_settings(settings)
    yield settings, tracker, open_store(settings)
    tracker.close()


def new_job(tracker: Tracker, prompt: str = "a person smiling", retention_until=None) -> int:
    subject = tracker.create_subject("Ada", consent_reference="form-1", retention_until=retention_until)
    job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt=prompt)
    tracker.transition_job(job.id, JobStatus.RUNNING)
    return job.id


def decode(
    tracker: Tracker, store: ArtifactStore, job_id: int, content: bytes, *, finish: bool = True
) -> str:
    """What the decode stage leaves: an intermediate (kind frames) and, if it finished, its row."""
    attempt = tracker.get_job(job_id).attempt
    stored = store.put_bytes(content, key=f"intermediates/job-{job_id}/attempt-{attempt}.mkv")
    run = tracker.record_stage_start(job_id, "decode")
    tracker.record_artifact(stored, kind=ArtifactKind.FRAMES, job_id=job_id)
    if finish:
        tracker.record_stage_finish(run.id, outputs=[stored.key], metrics={"frames": 5, "fps": 16.0})
    return stored.key


def deliver(
    tracker: Tracker, store: ArtifactStore, job_id: int, status=JobStatus.COMPLETED
) -> dict[str, str]:
    """What the deliver stage leaves: published files, their rows, its row, the job completed."""
    run = tracker.record_stage_start(job_id, "deliver")
    files = [
        (store.put_bytes(f"{name} of job {job_id}".encode(), key=f"deliverables/adhoc/{job_id}/{name}"), kind)
        for name, kind in DELIVERABLES.items()
    ]
    tracker.record_job_outputs(files, job_id=job_id)
    tracker.record_stage_finish(run.id, outputs=[stored.key for stored, _ in files])
    tracker.transition_job(job_id, status)
    return {name: stored.key for name, (stored, _) in zip(DELIVERABLES, files, strict=True)}


def delivered_job(tracker: Tracker, store: ArtifactStore, status=JobStatus.COMPLETED) -> tuple[int, dict]:
    job_id = new_job(tracker)
    keys = {"intermediate": decode(tracker, store, job_id, b"lossless frames")}
    keys.update(deliver(tracker, store, job_id, status))
    return job_id, keys


def test_verify_tells_intact_missing_replaced_and_corrupt_objects_apart(world):
    _, _, store = world
    stored = store.put_bytes(b"the master video", key="deliverables/x/master.mp4")
    assert ledger.verify(store, stored.key, stored.sha256, stored.size) is None
    assert ledger.verify(store, "deliverables/x/none.mp4", stored.sha256, stored.size) == "missing"
    other = store.put_bytes(b"other bytes", key="deliverables/x/other.mp4")
    assert ledger.verify(store, other.key, stored.sha256, stored.size) == "replaced by other bytes"
    overwrite_bytes(store, stored, b"the master vidEo")  # bit rot under an intact record
    assert ledger.verify(store, stored.key, stored.sha256, stored.size) == "corrupt"
    assert ledger.verify(store, stored.key, stored.sha256, stored.size, how="record") is None


def test_a_delivered_job_whose_files_verify_is_left_as_it_is(world):
    _, tracker, store = world
    job_id, _ = delivered_job(tracker, store)
    before = tracker.get_job(job_id)
    assert ledger.undelivered(tracker, store, before) == []
    after = ledger.reopen_undelivered(tracker, store, job_id)
    assert (after.status, after.version) == (JobStatus.COMPLETED, before.version)


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.NEEDS_REVIEW])
def test_a_delivered_job_with_a_missing_file_is_failed_and_its_other_files_withdrawn(world, status):
    _, tracker, store = world
    job_id, keys = delivered_job(tracker, store, status)
    store.delete(keys["master.mp4"])

    job = ledger.reopen_undelivered(tracker, store, job_id)

    assert (job.status, job.error_stage) == (JobStatus.FAILED, "deliver")
    assert job.error_text == f"deliverables missing or corrupt: {keys['master.mp4']} missing"
    for name in DELIVERABLES:  # no partial delivery is left behind, nor a live row of one
        assert not store.exists(keys[name])
    live = {row.key for row in tracker.list_artifacts(job_id=job_id)}
    assert live == {keys["intermediate"]}  # the decoded video stays: it is delivered again
    # the failed job is retried like any other
    assert tracker.transition_job(job_id, JobStatus.PENDING).attempt == 2


def test_bit_rot_reopens_a_job_when_checksums_are_read_not_when_records_are_compared(world):
    _, tracker, store = world
    job_id, keys = delivered_job(tracker, store)
    poster = store.stat(keys["poster.jpg"])
    overwrite_bytes(store, poster, b"poster.jpg of job ?")

    assert ledger.reopen_undelivered(tracker, store, job_id, how="record").status is JobStatus.COMPLETED
    job = ledger.reopen_undelivered(tracker, store, job_id)
    assert job.status is JobStatus.FAILED and f"{keys['poster.jpg']} corrupt" in job.error_text


def test_reopening_twice_is_harmless_and_other_statuses_are_not_touched(world):
    _, tracker, store = world
    job_id, keys = delivered_job(tracker, store)
    for name in DELIVERABLES:
        store.delete(keys[name])
    first = ledger.reopen_undelivered(tracker, store, job_id)
    second = ledger.reopen_undelivered(tracker, store, job_id)  # as a second run finding it
    assert first.status is second.status is JobStatus.FAILED and second.version == first.version
    assert first.error_text == "deliverables missing or corrupt: " + "; ".join(
        f"{keys[name]} missing" for name in DELIVERABLES
    )

    running = new_job(tracker, "a person waving")
    assert ledger.reopen_undelivered(tracker, store, running).status is JobStatus.RUNNING


def test_the_newest_decoded_video_that_verifies_is_the_jobs_video(world):
    _, tracker, store = world
    job_id = new_job(tracker)
    assert ledger.stored_video(tracker, store, job_id) is None
    first = decode(tracker, store, job_id, b"frames of attempt 1")
    tracker.transition_job(job_id, JobStatus.FAILED, error_stage="deliver", error_text="x")
    tracker.transition_job(job_id, JobStatus.PENDING)
    tracker.transition_job(job_id, JobStatus.RUNNING)
    second = decode(tracker, store, job_id, b"frames of attempt 2")

    video = ledger.stored_video(tracker, store, job_id)
    assert (video.intermediate_key, video.frames, video.fps, video.status) == (second, 5, 16.0, "completed")

    overwrite_bytes(store, store.stat(second), b"frames of attempt ?")
    video = ledger.stored_video(tracker, store, job_id)
    assert video.intermediate_key == first  # the damaged one is dropped, the older one used
    assert not store.exists(second)
    assert {row.key for row in tracker.list_artifacts(job_id=job_id, kind="frames")} == {first}

    store.delete(first)
    assert ledger.stored_video(tracker, store, job_id) is None


def test_an_intermediate_whose_decode_stage_never_finished_does_not_count(world):
    _, tracker, store = world
    job_id = new_job(tracker)
    decode(tracker, store, job_id, b"frames", finish=False)  # killed before its row was closed
    assert ledger.stored_video(tracker, store, job_id) is None
    assert [r.status for r in tracker.stage_runs(job_id)] == [StageStatus.RUNNING]


def checkpoint_file(tmp_path: Path, steps: int) -> Path:
    path = tmp_path / f"checkpoint-{steps}.safetensors"
    path.write_bytes(f"latents after {steps} steps".encode() * 100)
    return path


def test_checkpoints_are_biometric_rows_of_the_subject_and_only_the_newest_is_kept(world, tmp_path):
    _, tracker, store = world
    job_id = new_job(tracker)
    subject_id = tracker.get_job(job_id).subject_id
    first = ledger.store_checkpoint(tracker, store, job_id, checkpoint_file(tmp_path, 10), 10)
    second = ledger.store_checkpoint(tracker, store, job_id, checkpoint_file(tmp_path, 20), 20)

    assert (first.key, second.key) == (ledger.checkpoint_key(job_id, 10), ledger.checkpoint_key(job_id, 20))
    assert not store.exists(first.key) and store.exists(second.key)
    rows = tracker.list_artifacts(subject_id=subject_id, kind="sampling_checkpoint", include_deleted=True)
    assert [(r.key, r.biometric, r.job_id, r.deleted_at is None) for r in rows] == [
        (first.key, True, job_id, False),
        (second.key, True, job_id, True),
    ]
    found = ledger.latest_checkpoint(tracker, store, job_id, tmp_path / "found")
    assert found.key == second.key
    assert (tmp_path / "found").read_bytes() == checkpoint_file(tmp_path, 20).read_bytes()

    # the same step written again (a later attempt) keeps the new object
    again = ledger.store_checkpoint(tracker, store, job_id, checkpoint_file(tmp_path, 20), 20)
    assert store.exists(again.key)
    assert len(tracker.list_artifacts(job_id=job_id, kind="sampling_checkpoint")) == 1

    assert ledger.drop_checkpoints(tracker, store, job_id) == 1
    assert not store.exists(again.key) and not tracker.list_artifacts(
        job_id=job_id, kind="sampling_checkpoint"
    )
    assert ledger.latest_checkpoint(tracker, store, job_id, tmp_path / "none") is None


def test_a_checkpoint_whose_write_never_finished_or_that_rotted_falls_back_to_the_older_one(world, tmp_path):
    _, tracker, store = world
    job_id = new_job(tracker)
    older = ledger.store_checkpoint(tracker, store, job_id, checkpoint_file(tmp_path, 10), 10)
    # killed mid-upload: the row of step 20 is recorded, its object never appeared, step 10 is kept
    from lynx.store import StoredObject

    unwritten = StoredObject(ledger.checkpoint_key(job_id, 20), "0" * 64, 123)
    tracker.record_artifact(unwritten, kind="sampling_checkpoint", job_id=job_id)
    assert ledger.latest_checkpoint(tracker, store, job_id, tmp_path / "a").key == older.key

    newer = ledger.store_checkpoint(tracker, store, job_id, checkpoint_file(tmp_path, 30), 30)
    overwrite_bytes(store, newer, b"damaged")
    assert (
        ledger.latest_checkpoint(tracker, store, job_id, tmp_path / "b") is None
    )  # 10 went when 30 was stored
    assert not store.exists(newer.key)
    assert not tracker.list_artifacts(job_id=job_id, kind="sampling_checkpoint")


def test_the_retention_purge_deletes_checkpoints_and_a_purged_subject_gets_none(world, tmp_path):
    settings, tracker, store = world
    job_id = new_job(tracker, retention_until=utcnow() + timedelta(seconds=1))
    stored = ledger.store_checkpoint(tracker, store, job_id, checkpoint_file(tmp_path, 10), 10)

    report = purge_expired(settings, utcnow() + timedelta(days=1), tracker=tracker, store=store)

    assert report.subjects[0].deleted_keys == [stored.key] and not store.exists(stored.key)
    with pytest.raises(InputError, match="was purged"):
        ledger.store_checkpoint(tracker, store, job_id, checkpoint_file(tmp_path, 20), 20)
    assert not store.exists(ledger.checkpoint_key(job_id, 20))
