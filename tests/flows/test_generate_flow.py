"""Flow ``lynx`` end to end in the Prefect test harness: tiny model, real faces, PostgreSQL, S3."""

from __future__ import annotations

import time

from prefect import get_client

from flows.generate import lynx
from lynx.db.models import ArtifactKind, JobStatus, StageStatus
from tasks.services import services
from tests.flows.conftest import TINY_SETTINGS

STAGES = ["submit", "face", "model", "reference", "text", "sample", "decode", "deliver"]
BIOMETRIC = {
    "reference_photo",
    "face_embedding",
    "id_crop",
    "ref_crop",
    "identity_tokens",
    "reference_features",
}


def test_one_job_completes_with_deliverable_stage_rows_and_artifacts(flow_env, photos):
    flow_env()
    outcome = lynx(str(photos["astronaut"]), "a woman smiling at the camera", settings=TINY_SETTINGS)
    svc = services()

    assert outcome.status == "completed", outcome.error_text
    job = svc.tracker.get_job(outcome.job_id)
    assert job.status is JobStatus.COMPLETED and job.error_stage is None

    # the deliverable is in the S3 bucket, master first, manifest last
    assert outcome.master_key == f"deliverables/adhoc/{job.id}/master.mp4"
    keys = set(svc.store.list(f"deliverables/adhoc/{job.id}/"))
    assert {outcome.master_key, outcome.manifest_key} <= keys
    assert svc.store.stat(outcome.master_key).size > 0
    assert outcome.deliverable_url.startswith(f"http://{svc.settings.s3_endpoint}/")

    # one completed stage row per stage, in pipeline order, each with its timing
    runs = svc.tracker.stage_runs(job.id)
    assert [run.stage for run in runs] == STAGES
    assert all(run.status is StageStatus.COMPLETED and run.duration_s is not None for run in runs)
    face = next(run for run in runs if run.stage == "face")
    x1, y1, x2, y2 = face.metrics["box"]
    assert face.metrics["faces_detected"] == 1 and 0 <= x1 < x2 and 0 <= y1 < y2 and x2 - x1 >= 64
    assert 0.5 < face.metrics["det_score"] <= 1
    decode = next(run for run in runs if run.stage == "decode")
    assert decode.output_keys == [f"intermediates/job-{job.id}/attempt-1.mkv"]
    assert decode.metrics["frames"] == TINY_SETTINGS.frames and decode.metrics["fps"] == 16

    # artifact rows for inputs, intermediate results and outputs; biometric ones flagged
    artifacts = svc.tracker.list_artifacts(subject_id=job.subject_id)
    kinds = {artifact.kind for artifact in artifacts}
    assert BIOMETRIC | {"prompt_embeds", "frames", "video", "preview", "manifest"} <= kinds
    assert {a.kind for a in artifacts if a.biometric} == BIOMETRIC
    for artifact in artifacts:
        assert svc.store.exists(artifact.key), artifact.key
    assert not any(a.key.startswith("deliverables/") for a in artifacts if a.biometric)


def test_sampling_progress_artifact_reaches_100_percent(flow_env, photos):
    flow_env()
    outcome = lynx(str(photos["astronaut"]), "a person walking", settings=TINY_SETTINGS)
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(limit=100)
        progress = [a for a in artifact if a.key == f"sampling-job-{outcome.job_id}"]
    assert progress and progress[0].type == "progress"
    assert float(progress[0].data) == 100.0


def test_a_progress_artifact_the_api_refuses_does_not_stop_the_sampling(prefect_harness, caplog):
    from prefect import flow

    from tasks.sample import SamplingProgress

    @flow
    def samples() -> list[int]:
        progress = SamplingProgress(job_id=7, steps=3)
        with get_client(sync_client=True) as client:  # gone under the sampler: updates get a 404
            client.delete_artifact(progress.artifact_id)
        done = []
        for step in range(3):
            progress(step, 3, timestep=0.0)
            done.append(step)
        return done

    assert samples() == [0, 1, 2]
    assert [r for r in caplog.records if "progress artifact not updated" in r.getMessage()]


def test_model_seconds_count_the_model_not_the_encode_and_upload_of_its_frames(flow_env, photos, monkeypatch):
    import tasks.decode

    flow_env()
    write = tasks.decode.write_lossless

    def slow_write(*args, **kwargs):  # as a slow FFV1 encode of a long video
        time.sleep(3)
        return write(*args, **kwargs)

    monkeypatch.setattr(tasks.decode, "write_lossless", slow_write)
    outcome = lynx(str(photos["astronaut"]), "a person walking", settings=TINY_SETTINGS)
    assert outcome.status == "completed", outcome.error_text
    rows = {r.stage: r for r in services().tracker.stage_runs(outcome.job_id)}
    model_seconds = rows["decode"].metrics["model_seconds"]
    assert 0 < model_seconds < rows["sample"].duration_s + rows["decode"].duration_s - 3


def test_a_subject_id_makes_a_rerun_return_the_completed_job_whether_photo_is_path_or_key(flow_env, photos):
    flow_env()
    first = lynx(str(photos["hanks"]), "a man smiling", settings=TINY_SETTINGS, subject_id="tom")
    # the photo may also be given by its artifact-store key (what a remote caller does)
    photo_key = services().store.put_file(photos["hanks"]).key
    again = lynx(photo_key, "a man smiling", settings=TINY_SETTINGS, subject_id="tom")
    assert first.status == again.status == "completed"
    assert again.job_id == first.job_id and again.earlier and not first.earlier
    counts = services().tracker.compute_counts(job_id=first.job_id)
    assert counts["sample"].computed == 1


def test_the_lite_variant_runs_without_reference_features(flow_env, photos, tiny_model_dir):
    flow_env(adapter_path=tiny_model_dir / "lynx_lite", model_variant="lite")
    settings = TINY_SETTINGS.model_copy(update={"variant": "lite", "frames": 5})
    outcome = lynx(str(photos["astronaut"]), "a woman smiling", settings=settings)
    assert outcome.status == "completed", outcome.error_text
    svc = services()
    kinds = {a.kind for a in svc.tracker.list_artifacts(job_id=outcome.job_id)}
    assert "identity_tokens" in kinds and "reference_features" not in kinds
    decode = [r for r in svc.tracker.stage_runs(outcome.job_id) if r.stage == "decode"][0]
    assert decode.metrics["variant"] == "lite" and decode.metrics["fps"] == 24
    assert ArtifactKind.REFERENCE_FEATURES.value not in kinds
