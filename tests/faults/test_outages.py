"""Outages ridden out: the tracking database stopped (pg_ctl stop: real signals to a real server)
and SeaweedFS SIGKILLed mid-put, with LYNX_OUTAGE_TOLERANCE_SECONDS above or below the outage."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import pytest

from lynx.db.models import JobStatus, StageStatus
from lynx.db.tracking import Tracker
from lynx.errors import ServiceUnavailableError
from lynx.store import open_store
from tests.faults.harness import PrivatePostgres

REASON = "RuntimeError: the sampler ran out of memory"


def _tracker_and_job(settings):
    tracker = Tracker.from_settings(settings)
    subject = tracker.create_subject("Outage")
    job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="a walk in the rain")
    return tracker, job


def test_tracker_writes_ride_out_a_database_restart(make_settings, private_postgres: PrivatePostgres):
    settings = make_settings(database_url=private_postgres.create_database(), outage_tolerance_seconds=30)
    tracker, job = _tracker_and_job(settings)
    tracker.transition_job(job.id, JobStatus.RUNNING)

    outage = threading.Thread(target=private_postgres.outage, args=(6.0,))
    outage.start()
    time.sleep(0.3)  # the server is down now: every write below meets the outage
    started = time.monotonic()
    with tracker.stage(job.id, "sample") as stage:
        stage.metrics["steps"] = 4
    tracker.record_compute_event("sample", "key-1", reused=False, job_id=job.id)
    done = tracker.transition_job(job.id, JobStatus.COMPLETED)
    waited = time.monotonic() - started
    outage.join()

    assert waited > 4, "the writes should have waited for the restart"
    assert done.status is JobStatus.COMPLETED
    [row] = tracker.stage_runs(job.id)
    assert row.status is StageStatus.COMPLETED and row.metrics == {"steps": 4}
    assert tracker.compute_counts(job_id=job.id)["sample"].computed == 1
    tracker.close()


def test_outage_past_the_tolerance_fails_in_one_line_and_the_ending_lands_after_recovery(
    make_settings, private_postgres: PrivatePostgres
):
    settings = make_settings(database_url=private_postgres.create_database(), outage_tolerance_seconds=2)
    tracker, job = _tracker_and_job(settings)
    tracker.transition_job(job.id, JobStatus.RUNNING)

    with pytest.raises(ServiceUnavailableError) as caught, tracker.stage(job.id, "sample"):
        private_postgres.stop()
        raise RuntimeError("the sampler ran out of memory")
    message = str(caught.value)
    assert "LYNX_OUTAGE_TOLERANCE_SECONDS=2" in message and "LYNX_DATABASE_URL" in message
    assert "\n" not in message
    # what a stage task does next: record the real reason on the job (spooled: the server is down)
    with pytest.raises(ServiceUnavailableError):
        tracker.transition_job(
            job.id, JobStatus.FAILED, error_stage="sample", error_text=REASON
        )
    tracker.close()

    private_postgres.start()
    # the next run on this machine: its first tracking call writes the spooled endings
    with Tracker.from_settings(settings) as later:
        failed = later.get_job(job.id)
        assert failed.status is JobStatus.FAILED and failed.error_stage == "sample"
        assert failed.error_text == REASON
        [row] = later.stage_runs(job.id)
        assert row.status is StageStatus.FAILED and "ran out of memory" in row.error_text
        assert later.replay_spooled() == 0  # written once


def test_a_spooled_failure_never_fails_a_later_attempt(make_settings, private_postgres: PrivatePostgres):
    """A spooled 'failed' of attempt 0 is overtaken when another run already retried the job."""
    settings = make_settings(database_url=private_postgres.create_database(), outage_tolerance_seconds=1)
    tracker, job = _tracker_and_job(settings)
    tracker.transition_job(job.id, JobStatus.RUNNING)
    private_postgres.stop()
    with pytest.raises(ServiceUnavailableError):
        tracker.transition_job(job.id, JobStatus.FAILED, error_text="lost in the outage")
    private_postgres.start()
    # another machine (no spool of ours) fails and retries the job meanwhile
    with Tracker.from_settings(settings.model_copy(update={"home": settings.home / "other"})) as other:
        other.transition_job(job.id, JobStatus.FAILED, error_text="worker lost")
        other.transition_job(job.id, JobStatus.PENDING)
        other.transition_job(job.id, JobStatus.RUNNING)
    assert tracker.replay_spooled() == 0
    assert tracker.get_job(job.id).status is JobStatus.RUNNING
    tracker.close()


class _KillMidUpload(io.BytesIO):
    """The bytes to store; once the first upload pass (after the hashing pass and the upload's own
    rewind) is past ``at`` bytes, the
    S3 server is SIGKILLed, and restarted ``down_s`` seconds later from another thread."""

    def __init__(self, data: bytes, server, at: int, down_s: float | None) -> None:
        super().__init__(data)
        self.server, self.at, self.down_s = server, at, down_s
        self.passes = 0
        self.killed_at: float | None = None

    def seek(self, *args):
        self.passes += 1
        return super().seek(*args)

    def read(self, size=-1):
        if self.passes == 2 and self.killed_at is None and self.tell() >= self.at:
            self.server.kill()
            self.killed_at = time.monotonic()
            if self.down_s is not None:
                threading.Timer(self.down_s, self.server.restart).start()
        return super().read(size)


@pytest.mark.parametrize(("tolerance", "down_s"), [(30, 3.0), (2, None)], ids=["ridden-out", "too-long"])
def test_seaweedfs_sigkilled_mid_put(make_settings, make_s3_server, tolerance: float, down_s: float | None):
    server = make_s3_server()
    settings = make_settings(store="s3", s3_endpoint=server.endpoint, outage_tolerance_seconds=tolerance)
    store = open_store(settings)
    data = hashlib.sha256(b"seed").digest() * (12 * 1024 * 1024 // 32)  # 12 MiB: 3 parts of 5 MiB
    source = _KillMidUpload(data, server, at=6 * 1024 * 1024, down_s=down_s)
    key = "videos/job-1/decoded.mp4"

    if down_s is not None:
        stored = store._put_stream(source, len(data), key, "video/mp4")
        assert source.killed_at is not None and source.passes >= 3, "the put should have been cut"
        assert store.get_bytes(key) == data and stored.sha256 == hashlib.sha256(data).hexdigest()
    else:
        with pytest.raises(ServiceUnavailableError) as caught:
            store._put_stream(source, len(data), key, "video/mp4")
        message = str(caught.value)
        assert "LYNX_OUTAGE_TOLERANCE_SECONDS=2" in message and "LYNX_S3_ENDPOINT" in message
        assert "\n" not in message
        server.restart()
        assert not store.exists(key), "a put that failed must leave no object"
        assert list(store.list("videos/")) == []
