"""Scoring items into the tracking database: manifests, campaigns, reuse, skips; SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from lynx.db.models import ArtifactKind, Evaluation, JobStatus, StageStatus, utcnow
from lynx.db.tracking import Tracker
from lynx.errors import InputError, NotFoundError
from lynx.evaluation import Evaluator, collect_source, load_manifest
from lynx.store import open_store
from tests.eval.conftest import write_manifest


def _rows(tracker: Tracker) -> int:
    with tracker.transaction() as session:
        return session.scalar(select(func.count()).select_from(Evaluation))


def _entries(clips):
    return [
        {
            "video": "astronaut.mp4",
            "reference_photo": "astronaut_ref.jpg",
            "subject": "astronaut",
            "prompt": "walks",
        },
        {
            "video": "hanks.mp4",
            "reference_photo": "astronaut_ref.jpg",
            "subject": "astronaut",
            "prompt": "talks",
        },
        {
            "video": "coffee.mp4",
            "reference_photo": "astronaut_ref.jpg",
            "subject": "astronaut",
            "prompt": "cup",
        },
        {"video": "gone.mp4", "reference_photo": "astronaut_ref.jpg", "subject": "nobody", "prompt": "lost"},
    ]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_manifest_run_is_recorded_once_and_reused(eval_settings, clips, backend):
    settings = eval_settings(backend=backend, eval_frame_stride=2)
    manifest = write_manifest(clips.folder, _entries(clips), name=f"reuse-{backend}")
    with Tracker.from_settings(settings) as tracker:
        source = collect_source(tracker, manifest=manifest)
        assert source.name == f"reuse-{backend}" and len(source.items) == 4
        with Evaluator(settings, tracker=tracker) as evaluator:
            first = [evaluator.evaluate(item) for item in source.items]
        assert [r.reused for r in first] == [False, False, False, False]
        assert first[0].mean("sface_2021dec") > 0.85 and first[1].mean("sface_2021dec") < 0.35
        assert first[2].metrics["sface_2021dec"].frames_with_face == 0 and first[2].error is None
        assert first[3].metrics is None and "gone.mp4 does not exist" in first[3].error
        assert _rows(tracker) == 3  # one recogniser x three readable videos

        with Evaluator(settings, tracker=tracker) as evaluator:
            again = [evaluator.evaluate(item) for item in source.items]
        assert [r.reused for r in again[:3]] == [True, True, True]
        assert [r.metrics for r in again] == [r.metrics for r in first]
        assert _rows(tracker) == 3
        counts = tracker.compute_counts()["evaluate"]
        assert (counts.computed, counts.reused) == (3, 3)

        with Evaluator(settings, tracker=tracker, force=True) as evaluator:
            forced = evaluator.evaluate(source.items[0])
        assert not forced.reused and _rows(tracker) == 3  # measured again, same row updated

        # Another detector setting makes the stored numbers stale: measured again, row updated.
        stricter = settings.model_copy(update={"face_detection_threshold": 0.6})
        with Evaluator(stricter, tracker=tracker) as evaluator:
            assert not evaluator.evaluate(source.items[0]).reused
        assert _rows(tracker) == 3
        # Another stride is another measurement.
        with Evaluator(settings, tracker=tracker, stride=4) as evaluator:
            assert evaluator.evaluate(source.items[0]).metrics["sface_2021dec"].frames_total == 4
        assert _rows(tracker) == 4


def test_reference_photo_without_a_face_is_an_item_error(eval_settings, clips):
    settings = eval_settings()
    manifest = write_manifest(
        clips.folder,
        [
            {"video": "astronaut.mp4", "reference_photo": "coffee.png", "subject": "cup", "prompt": "p"},
        ],
        name="faceless-reference",
    )
    with Tracker.from_settings(settings) as tracker, Evaluator(settings, tracker=tracker) as evaluator:
        (result,) = [evaluator.evaluate(item) for item in collect_source(tracker, manifest=manifest).items]
    assert result.metrics is None and "no face found" in result.error


def test_manifest_errors_name_the_entry_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {video: a.mp4, subject: x}\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.yaml: videos.0.reference_photo: Field required"):
        load_manifest(bad)
    bad.write_text("videos: [\n", encoding="utf-8")
    with pytest.raises(InputError, match="not valid"):
        load_manifest(bad)
    listed = tmp_path / "list.json"
    listed.write_text('[{"video": "v.mp4", "reference_photo": "r.jpg", "subject": "s"}]', encoding="utf-8")
    manifest = load_manifest(listed)
    assert manifest.name == "list" and manifest.videos[0].video == tmp_path / "v.mp4"
    with pytest.raises(InputError, match="cannot read manifest"):
        load_manifest(tmp_path / "absent.yaml")


@pytest.mark.parametrize("backend,store_backend", [("sqlite", "local"), ("postgres", "s3")])
def test_campaign_jobs_are_evaluated_from_the_store(eval_settings, clips, backend, store_backend, request):
    if store_backend == "s3":
        request.getfixturevalue("s3_reset")
    settings = eval_settings(backend=backend, store=store_backend, eval_frame_stride=4)
    store = open_store(settings)
    with Tracker.from_settings(settings) as tracker:
        astronaut = tracker.create_subject(
            "Astronaut", external_ref="astro", reference=store.put_file(clips.astronaut_reference)
        )
        gone = tracker.create_subject(
            "Gone",
            reference=store.put_file(clips.hanks_reference),
            retention_until=utcnow() + timedelta(days=1),
        )
        campaign = tracker.get_or_create_campaign("spring")
        jobs = {}
        for subject, prompt, video in [
            (astronaut, "walks", clips.astronaut),
            (astronaut, "talks", clips.hanks),
            (gone, "waves", clips.hanks),
            (astronaut, "pending", None),
        ]:
            job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt=prompt, campaign_id=campaign.id)
            jobs[prompt] = job.id
            if video is None:
                continue
            tracker.transition_job(job.id, JobStatus.RUNNING)
            stored = store.put_file(video, key=f"deliverables/spring/{job.id}/master.mp4")
            tracker.record_artifact(stored, kind=ArtifactKind.VIDEO, job_id=job.id)
            tracker.transition_job(job.id, JobStatus.COMPLETED)
        tracker.mark_subject_purged(gone.id, [])  # its retention ended: nothing to compare against

        source = collect_source(tracker, campaign="spring")
        assert [item.job_id for item in source.items] == [jobs["walks"], jobs["talks"], jobs["waves"]]
        assert "1 not finished" in source.description
        with Evaluator(settings, tracker=tracker, store=store) as evaluator:
            results = {r.item.prompt: r for r in map(evaluator.evaluate, source.items)}
            workdir = evaluator._workdir
        assert not workdir.exists()  # downloads (the reference photo is biometric) are gone
        assert results["walks"].mean("sface_2021dec") > 0.85
        assert results["talks"].mean("sface_2021dec") < 0.35
        assert results["waves"].metrics is None and "purged" in results["waves"].error

        (stage,) = tracker.stage_runs(jobs["walks"])
        assert stage.stage == "evaluate" and stage.status is StageStatus.COMPLETED
        assert stage.metrics["frames_sampled"] == 4 and stage.metrics["similarity"]["sface_2021dec"] > 0.85
        assert tracker.get_job(jobs["walks"]).status is JobStatus.COMPLETED  # evaluation changes no status

        with tracker.transaction() as session:
            rows = list(session.scalars(select(Evaluation).order_by(Evaluation.id)))
        assert [row.job_id for row in rows] == [jobs["walks"], jobs["talks"]]
        assert rows[0].video == f"deliverables/spring/{jobs['walks']}/master.mp4"
        assert rows[0].reference_sha256 == astronaut.reference_sha256
        # Per-video statistics only: nothing the size of an embedding is stored.
        assert set(rows[0].setup) == {"face_pack", "detector_size", "detection_threshold", "recognizer"}
        assert len(rows[0].per_frame) == rows[0].frames_sampled == 4

        # A re-run finds the stored metrics by the recorded checksums, without downloading anything.
        with Evaluator(settings, tracker=tracker, store=None) as evaluator:
            assert evaluator.evaluate(source.items[0]).reused

        # A deliverable deleted from the store is that item's problem, not the run's.
        store.delete(source.items[1].video)
        with Evaluator(settings, tracker=tracker, store=store, force=True) as evaluator:
            gone = evaluator.evaluate(source.items[1])
        assert gone.metrics is None and source.items[1].video in gone.error


def test_unknown_campaign_and_ambiguous_sources(eval_settings):
    with Tracker.from_settings(eval_settings()) as tracker:
        with pytest.raises(NotFoundError, match="no campaign named 'absent'"):
            collect_source(tracker, campaign="absent")
        with pytest.raises(InputError, match="either a campaign or a manifest"):
            collect_source(tracker)


def test_a_redelivered_job_is_evaluated_on_its_latest_master(eval_settings, clips):
    from lynx.evaluation.sources import job_item

    settings = eval_settings()
    store = open_store(settings)
    with Tracker.from_settings(settings) as tracker:
        subject = tracker.create_subject("A", reference=store.put_file(clips.astronaut_reference))
        job, _ = tracker.get_or_create_job(subject_id=subject.id, prompt="p")
        key = f"deliverables/adhoc/{job.id}/master.mp4"
        for video in (clips.hanks, clips.astronaut):  # attempt 1, then a retry re-publishes the key
            tracker.record_artifact(store.put_file(video, key=key), kind=ArtifactKind.VIDEO, job_id=job.id)
        item = job_item(tracker, tracker.get_job(job.id))
        assert item.video == key and item.video_sha256 == store.stat(key).sha256
