"""Erasure on request: everything derived from a subject, gone from the store and the database.

Synthetic subjects (bytes stand for photos, embeddings, videos) on SQLite + a local folder and on
PostgreSQL + S3; the real pipeline's objects are erased in tests/flows/test_erasure_flow.py. Each
test lists the whole store afterwards and compares it with what must remain.
"""

from __future__ import annotations

import json

import pytest

from lynx.db.models import Erasure, Evaluation, JobStatus, StageRun
from lynx.db.tracking import Tracker
from lynx.erasure import erase_subject
from lynx.errors import InputError, NotFoundError
from lynx.settings import LynxSettings
from lynx.store import ArtifactStore, open_store


@pytest.fixture(params=[("sqlite", "local"), ("postgres", "s3")], ids=["sqlite-local", "postgres-s3"])
def world(request, make_settings):
    backend, store_backend = request.param
    settings: LynxSettings = make_settings(backend=backend, store=store_backend)
    tracker = Tracker.from_settings(settings)
    store = open_store(settings)
    yield settings, tracker, store
    tracker.close()
    if store_backend == "s3":
        for key in list(store.list()):
            store.delete(key)


def _subject(tracker: Tracker, store: ArtifactStore, ref: str, *, shared_photo: bytes | None = None):
    """A subject with two photos and one finished job whose objects cover every way a key is found."""
    photos = [
        store.put_bytes(shared_photo or f"photo-1-{ref}".encode()),
        store.put_bytes(f"photo-2-{ref}".encode()),
    ]
    subject = tracker.create_subject(ref, external_ref=ref, photos=photos, consent_reference=f"form-{ref}")
    campaign = tracker.get_or_create_campaign(f"spring-{ref}")
    job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="on a boat", campaign_id=campaign.id)
    recorded = {}
    for kind, key in [
        ("face_embedding", f"cache/face/{ref}.npz"),
        ("id_crop", f"cache/id_crop/{ref}.png"),
        ("identity_tokens", f"cache/identity_tokens/{ref}.safetensors"),
        ("latents", f"checkpoints/job-{job.id}/step-10.safetensors"),  # a kind the erasure never names
        ("prompt_embeds", f"cache/prompt_embeds/{ref}.safetensors"),
        ("frames", f"intermediates/job-{job.id}/attempt-1.mkv"),
    ]:
        stored = store.put_bytes(f"{kind}-{ref}".encode(), key=key)
        tracker.record_artifact(stored, kind=kind, job_id=job.id)
        recorded[kind] = key
    deliverables = f"deliverables/spring-{ref}/{job.id}"
    published = [
        store.put_bytes(f"{name}-{ref}".encode(), key=f"{deliverables}/{name}")
        for name in ("master.mp4", "manifest.json")
    ]
    tracker.record_job_outputs([(published[0], "video"), (published[1], "manifest")], job_id=job.id)
    # never recorded: found under the job's prefixes, or through a stage row
    stray = store.put_bytes(b"stray", key=f"intermediates/job-{job.id}/attempt-1-seed-43.mkv").key
    scratch = store.put_bytes(b"scratch", key=f"work/job-{job.id}/scratch.bin").key
    with tracker.stage(job.id, "face", inputs=[photos[0].key]) as stage:
        stage.output_keys += [recorded["face_embedding"], scratch]
        stage.metrics.update(box=[1, 2, 3, 4], det_score=0.9, photos=[{"consistency": 0.8}])
    with tracker.stage(job.id, "deliver") as stage:
        stage.metrics.update(master_key=published[0].key, similarity=0.7, score=0.71)
    tracker.transition_job(job.id, "running")
    tracker.transition_job(job.id, "completed")
    with tracker.transaction() as session:
        session.add(
            Evaluation(job_id=job.id, video=published[0].key, video_sha256=published[0].sha256,
                       reference_sha256=photos[0].sha256, recognizer="sface", stride=1, mean=0.7,
                       frames_sampled=4, frames_with_face=4, face_share=1.0, per_frame=[0.7] * 4)
        )  # fmt: skip
    return (
        subject,
        job,
        {
            "photos": [photo.key for photo in photos],
            "recorded": recorded,
            "deliverables": [item.key for item in published],
            "unrecorded": [stray, scratch],
        },
    )


def test_erasure_removes_every_derived_object_and_row_and_keeps_the_rest(world):
    settings, tracker, store = world
    subject, job, keys = _subject(tracker, store, "alice")
    _, other_job, other = _subject(tracker, store, "bob")
    before = set(store.list())

    receipt = erase_subject(settings, "alice", tracker=tracker, store=store)

    derived = {*keys["photos"], *keys["unrecorded"], *keys["recorded"].values()} - {
        keys["recorded"]["prompt_embeds"]
    }
    assert set(receipt.removed_keys) == derived
    # the whole store: nothing else went, the receipt came
    assert set(store.list()) == (before - derived) | {receipt.receipt_key}
    assert receipt.kept_deliverables == sorted(keys["deliverables"]) and receipt.kept_text_only == 1
    assert receipt.removed_by_kind["latents"] == 1 and receipt.removed_by_kind["unrecorded"] == 1
    assert receipt.receipt_key and store.exists(receipt.receipt_key)
    stored_receipt = json.loads(store.get_bytes(receipt.receipt_key))
    assert (
        stored_receipt["schema"] == "lynx.erasure/1"
        and stored_receipt["removed_keys"] == receipt.removed_keys
    )
    assert "photo-1-alice" not in json.dumps(stored_receipt)

    erased = tracker.get_subject(subject.id)
    assert erased.erased_at is not None and erased.photos is None and erased.reference_key is None
    rows = tracker.list_artifacts(subject_id=subject.id, include_deleted=True)
    assert {row.kind for row in rows} == {"prompt_embeds", "video", "manifest"}
    runs = {run.stage: run for run in tracker.stage_runs(job.id)}
    assert runs["face"].metrics == {} and runs["deliver"].metrics == {"master_key": keys["deliverables"][0]}
    with tracker.transaction() as session:
        assert session.query(Evaluation).filter_by(job_id=job.id).count() == 0
    # bob is untouched
    assert all(store.exists(key) for key in [*other["photos"], *other["recorded"].values()])
    assert tracker.get_subject(other_job.subject_id).erased_at is None
    assert tracker.get_job(job.id).status is JobStatus.COMPLETED  # history stays


def test_with_deliverables_and_idempotent_reruns(world):
    settings, tracker, store = world
    subject, _, keys = _subject(tracker, store, "alice")
    first = erase_subject(settings, "alice", tracker=tracker, store=store)
    assert all(store.exists(key) for key in keys["deliverables"])

    again = erase_subject(settings, "alice", tracker=tracker, store=store)
    assert again.already_erased and again.erasure_id == first.erasure_id

    later = erase_subject(settings, "alice", with_deliverables=True, tracker=tracker, store=store)
    assert not later.already_erased and set(later.removed_keys) == set(keys["deliverables"])
    assert not any(key.startswith("deliverables/") for key in store.list())
    assert tracker.get_subject(subject.id).erased_at == first.requested_at  # erased on the first date
    with tracker.transaction() as session:
        assert session.query(Erasure).filter_by(subject_id=subject.id).count() == 2


def test_an_object_shared_with_another_subject_is_kept(world):
    settings, tracker, store = world
    _, _, keys = _subject(tracker, store, "alice", shared_photo=b"the same bytes")
    _, _, other = _subject(tracker, store, "bob", shared_photo=b"the same bytes")
    assert keys["photos"][0] == other["photos"][0]  # content-addressed: one object

    receipt = erase_subject(settings, "alice", tracker=tracker, store=store)
    assert receipt.kept_shared == [keys["photos"][0]] and store.exists(keys["photos"][0])
    assert not store.exists(keys["photos"][1])


def test_an_erased_subject_gets_no_new_job_and_no_new_artifact(world):
    settings, tracker, store = world
    subject, job, _ = _subject(tracker, store, "alice")
    erase_subject(settings, f"subject-{subject.id}", tracker=tracker, store=store)
    day = f"{tracker.get_subject(subject.id).erased_at:%Y-%m-%d}"

    with pytest.raises(InputError, match=f"^subject alice was erased on {day}$"):
        tracker.get_or_create_job(subject_id=subject.id, prompt="a new prompt")
    with pytest.raises(InputError, match="was erased on"):
        tracker.record_artifact(store.put_bytes(b"late frames"), kind="frames", job_id=job.id)
    with pytest.raises(InputError, match="was erased on"):
        tracker.set_subject_photos(subject.id, [store.put_bytes(b"new photo")])


def test_running_jobs_are_stopped_and_unknown_subjects_are_one_line_errors(world):
    settings, tracker, store = world
    subject, _, _ = _subject(tracker, store, "alice")
    running, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="still sampling")
    tracker.transition_job(running.id, "running")

    receipt = erase_subject(settings, "alice", tracker=tracker, store=store)
    assert receipt.jobs_stopped == [running.id]
    stopped = tracker.get_job(running.id)
    assert stopped.status is JobStatus.FAILED and stopped.error_text == "subject alice was erased"
    with pytest.raises(NotFoundError, match="^no subject 'nobody'; `lynx subject list` shows the subjects$"):
        erase_subject(settings, "nobody", tracker=tracker, store=store)


def test_subject_commands(make_settings, lynx_cli):
    settings = make_settings()
    with Tracker.from_settings(settings) as tracker:
        store = open_store(settings)
        _subject(tracker, store, "alice")

    listed = lynx_cli("subject", "list", settings=settings)
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout and "form-alice" in listed.stdout and "active" in listed.stdout

    refused = lynx_cli("subject", "erase", "alice", settings=settings)
    assert refused.returncode == 4 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "lynx: error: erasing subject alice deletes its photos and everything made from them for good; "
        "add --yes to confirm"
    ]
    erased = lynx_cli("subject", "erase", "alice", "--yes", settings=settings)
    assert erased.returncode == 0, erased.stderr
    assert erased.stdout.startswith("erased subject alice: 9 objects removed")
    assert "kept 2 delivered files (add --with-deliverables to remove them)" in erased.stdout

    shown = lynx_cli("subject", "show", "alice", "--json", settings=settings)
    document = json.loads(shown.stdout)
    assert document["status"].startswith("erased on ") and document["photo_list"] == []
    assert document["erasures"][0]["objects_removed"] == 9 and document["jobs"] == 1
    missing = lynx_cli("subject", "show", "nobody", settings=settings)
    assert missing.returncode == 5 and missing.stderr.startswith("lynx: error: no subject 'nobody'")


def test_stage_metrics_other_than_identity_stay(world):
    settings, tracker, store = world
    _, job, _ = _subject(tracker, store, "alice")
    with tracker.stage(job.id, "sample") as stage:
        stage.metrics.update(steps=2, seeds=[42, 43])
    erase_subject(settings, "alice", tracker=tracker, store=store)
    with tracker.transaction() as session:
        sample = session.query(StageRun).filter_by(job_id=job.id, stage="sample").one()
        assert sample.metrics == {"steps": 2, "seeds": [42, 43]}
