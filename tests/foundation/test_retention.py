"""Retention purge: biometric data of expired subjects is deleted from the store and marked in the DB."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lynx.db.models import utcnow
from lynx.db.tracking import Tracker
from lynx.retention import purge_expired
from lynx.settings import LynxSettings
from lynx.store import ArtifactStore, open_store


@pytest.fixture(params=[("sqlite", "local"), ("postgres", "s3")], ids=["sqlite-local", "postgres-s3"])
def world(request, make_settings):
    backend, store_backend = request.param
    settings: LynxSettings = make_settings(backend=backend, store=store_backend)
    tracker = Tracker.from_settings(settings)
    yield settings, tracker, open_store(settings)
    tracker.close()


def _subject_with_data(tracker: Tracker, store: ArtifactStore, name: str, *, expired: bool, photo: bytes):
    now = utcnow()
    reference = store.put_bytes(photo, content_type="image/jpeg")
    subject = tracker.create_subject(
        name,
        reference=reference,
        consent_reference=f"form-{name}",
        retention_until=now - timedelta(days=1) if expired else now + timedelta(days=30),
    )
    job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt=f"{name} on a boat")
    keys = {"photo": reference.key}
    for kind, data in [
        ("face_embedding", b"emb-" + name.encode()),
        ("id_crop", b"crop-" + name.encode()),
        ("video", b"video-" + name.encode()),
    ]:
        stored = store.put_bytes(data)
        tracker.record_artifact(stored, kind=kind, job_id=job.id)
        keys[kind] = stored.key
    return subject, keys


def test_purge_deletes_biometric_data_of_expired_subjects_only(world):
    settings, tracker, store = world
    gone, gone_keys = _subject_with_data(tracker, store, "expired", expired=True, photo=b"photo-1")
    kept, kept_keys = _subject_with_data(tracker, store, "current", expired=False, photo=b"photo-2")

    report = purge_expired(settings, tracker=tracker, store=store)

    assert [s.subject_id for s in report.subjects] == [gone.id]
    assert sorted(report.subjects[0].deleted_keys) == sorted(
        [gone_keys["photo"], gone_keys["face_embedding"], gone_keys["id_crop"]]
    )
    for kind in ("photo", "face_embedding", "id_crop"):
        assert not store.exists(gone_keys[kind])
    assert store.exists(gone_keys["video"])  # an output, not biometric data
    assert all(store.exists(key) for key in kept_keys.values())
    assert tracker.get_subject(gone.id).purged_at is not None
    assert tracker.get_subject(kept.id).purged_at is None
    live = tracker.list_artifacts(subject_id=gone.id)
    assert [a.kind for a in live] == ["video"]
    deleted = [a for a in tracker.list_artifacts(subject_id=gone.id, include_deleted=True) if a.deleted_at]
    assert sorted(a.kind for a in deleted) == ["face_embedding", "id_crop", "reference_photo"]

    assert purge_expired(settings, tracker=tracker, store=store).subjects == []  # nothing left to do


def test_dry_run_changes_nothing(world):
    settings, tracker, store = world
    subject, keys = _subject_with_data(tracker, store, "expired", expired=True, photo=b"photo-1")

    report = purge_expired(settings, dry_run=True, tracker=tracker, store=store)

    assert report.dry_run and report.objects_deleted == 3 and report.bytes_deleted > 0
    assert all(store.exists(key) for key in keys.values())
    assert tracker.get_subject(subject.id).purged_at is None


def test_object_shared_with_a_current_subject_is_kept(world):
    settings, tracker, store = world
    # The same photo bytes registered for two people: one content-addressed object, two records.
    gone, gone_keys = _subject_with_data(tracker, store, "expired", expired=True, photo=b"same photo")
    kept, kept_keys = _subject_with_data(tracker, store, "current", expired=False, photo=b"same photo")
    assert gone_keys["photo"] == kept_keys["photo"]

    report = purge_expired(settings, tracker=tracker, store=store)

    assert report.subjects[0].shared_keys == [gone_keys["photo"]]
    assert store.exists(gone_keys["photo"])
    assert not store.exists(gone_keys["face_embedding"])
    assert [a.kind for a in tracker.list_artifacts(subject_id=gone.id)] == ["video"]


def test_interrupted_purge_is_finished_by_the_next_run(world):
    settings, tracker, store = world
    subject, keys = _subject_with_data(tracker, store, "expired", expired=True, photo=b"photo-1")
    store.delete(keys["face_embedding"])  # a previous run died after deleting one object

    report = purge_expired(settings, tracker=tracker, store=store)

    assert report.subjects[0].subject_id == subject.id
    assert not store.exists(keys["photo"]) and not store.exists(keys["id_crop"])
    assert tracker.get_subject(subject.id).purged_at is not None
