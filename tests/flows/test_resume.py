"""Finished work is never redone: re-runs deliver a stored decoded video again instead of sampling,
deliverables that were lost are delivered again (or the video generated again), and a job killed
with SIGKILL mid-sampling resumes from its last checkpoint with the uninterrupted run's latents."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lynx import ledger
from lynx.db.models import JobStatus, StageStatus
from lynx.errors import ServiceUnavailableError
from lynx.jobs import GenerationRequest, GenerationSettings, SubjectSpec
from lynx.settings import get_settings
from tasks.jobs import submit_requests
from tasks.services import services
from tests.conftest import REPO_ROOT
from tests.flows.conftest import TINY_SETTINGS, run_campaign, run_lynx

PROMPT = "a person smiling"
GPU_STAGES = {"model", "reference", "text", "sample", "decode"}


def run(photos, **kwargs):
    return run_lynx(
        str(photos["astronaut"]), PROMPT, settings=kwargs.pop("settings", TINY_SETTINGS), **kwargs
    )


def stages_of(job_id: int, attempt: int) -> list[str]:
    return [row.stage for row in services().tracker.stage_runs(job_id) if row.attempt == attempt]


def deliverables_verify(job_id: int) -> None:
    """Every deliverable the job's outcome and rows name is stored and hashes to its row."""
    tracker, store = services().tracker, services().store
    job = tracker.get_job(job_id)
    assert ledger.undelivered(tracker, store, job) == []
    assert sorted(store.list(f"deliverables/adhoc/{job_id}/")) == sorted(
        row.key for row in tracker.list_artifacts(job_id=job_id) if row.key.startswith("deliverables/")
    )


def test_a_job_failed_at_deliver_is_delivered_again_without_any_gpu_stage(
    flow_env, photos, tmp_path, monkeypatch
):
    logo = tmp_path / "logo.png"
    logo.write_text("not an image")
    flow_env(deliver_watermark=logo)
    failed = run(photos, subject_id="ann")
    assert (failed.status, failed.error_stage) == ("failed", "deliver")
    intermediate = f"intermediates/job-{failed.job_id}/attempt-1.mkv"

    monkeypatch.delenv("LYNX_DELIVER_WATERMARK")  # the operator fixes the setting and runs it again
    get_settings.cache_clear()
    outcome = run(photos, subject_id="ann")

    assert (outcome.job_id, outcome.status, outcome.attempt) == (failed.job_id, "completed", 2)
    assert stages_of(outcome.job_id, 2) == ["submit", "face", "deliver"]  # no GPU stage, no sampling
    tracker = services().tracker
    assert tracker.compute_counts(job_id=outcome.job_id)["sample"].computed == 1
    submit, deliver = (r for r in tracker.stage_runs(outcome.job_id) if r.attempt == 2 and r.stage != "face")
    assert submit.metrics["decoded_earlier"] == intermediate and deliver.input_keys == [intermediate]
    deliverables_verify(outcome.job_id)


def test_a_completed_job_whose_deliverables_were_lost_is_delivered_again_from_its_video(flow_env, photos):
    flow_env()
    done = run(photos, subject_id="ann")
    assert done.status == "completed", done.error_text
    store = services().store
    for key in list(store.list(f"deliverables/adhoc/{done.job_id}/")):  # the S3 store lost them
        store.delete(key)

    outcome = run(photos, subject_id="ann")

    assert (outcome.job_id, outcome.status, outcome.attempt, outcome.earlier) == (
        done.job_id,
        "completed",
        2,
        False,
    )
    assert stages_of(done.job_id, 2) == ["submit", "face", "deliver"]
    assert store.exists(outcome.master_key) and store.exists(outcome.manifest_key)
    deliverables_verify(done.job_id)
    # and a third run finds everything in place: nothing is done again
    again = run(photos, subject_id="ann")
    assert (again.status, again.attempt, again.earlier) == ("completed", 2, True)
    assert stages_of(done.job_id, 3) == []


def test_a_completed_job_whose_video_is_gone_too_is_generated_again(flow_env, photos):
    flow_env()
    done = run(photos, subject_id="ann")
    store = services().store
    store.delete(done.master_key)
    store.delete(f"intermediates/job-{done.job_id}/attempt-1.mkv")

    outcome = run(photos, subject_id="ann")

    assert (outcome.status, outcome.attempt) == ("completed", 2), outcome.error_text
    assert GPU_STAGES <= set(stages_of(done.job_id, 2))
    tracker = services().tracker
    sample = next(r for r in tracker.stage_runs(done.job_id) if r.attempt == 2 and r.stage == "sample")
    assert (sample.metrics["resumed_at"], sample.metrics["steps_run"]) == (0, TINY_SETTINGS.steps)
    assert store.exists(f"intermediates/job-{done.job_id}/attempt-2.mkv")
    assert tracker.compute_counts(job_id=done.job_id)["sample"].computed == 2
    deliverables_verify(done.job_id)


def test_a_campaign_rerun_delivers_regenerates_or_skips_each_job_by_what_it_finds_stored(
    flow_env, photos, tmp_path
):
    from tests.flows.test_campaign_flow import write_campaign

    flow_env(gpu_batch_size=4)
    prompts = ["a woman walking on a beach", "a man reading in a park", "a person smiling at the camera"]
    path = write_campaign(tmp_path, "healing", {"ann": str(photos["astronaut"])}, prompts)
    first = run_campaign(str(path))
    assert [o.status for o in first] == ["completed"] * 3, [o.error_text for o in first]
    store = services().store
    lost_files, lost_video, intact = (o.job_id for o in first)
    for job_id in (lost_files, lost_video):
        for key in list(store.list(f"deliverables/healing/{job_id}/")):
            store.delete(key)
    store.delete(f"intermediates/job-{lost_video}/attempt-1.mkv")

    again = run_campaign(name="healing")

    assert [(o.status, o.attempt, o.earlier) for o in again] == [
        ("completed", 2, False),
        ("completed", 2, False),
        ("completed", 1, True),
    ]
    assert stages_of(lost_files, 2) == ["submit", "face", "deliver"]
    assert GPU_STAGES <= set(stages_of(lost_video, 2))
    assert stages_of(intact, 2) == []
    assert services().tracker.campaign_summary("healing").compute["sample"].computed == 4
    for outcome in again:
        assert store.exists(outcome.master_key) and store.exists(outcome.manifest_key)


def test_sampling_goes_on_when_its_checkpoints_cannot_be_stored(flow_env, photos, monkeypatch):
    flow_env(sample_checkpoint_steps=1)
    import tasks.sample

    def store_down(*args, **kwargs):
        raise ServiceUnavailableError("cannot reach S3 at minio:9000", setting="LYNX_S3_ENDPOINT")

    monkeypatch.setattr(tasks.sample.ledger, "store_checkpoint", store_down)
    outcome = run(photos)
    assert outcome.status == "completed", outcome.error_text
    sample = next(r for r in services().tracker.stage_runs(outcome.job_id) if r.stage == "sample")
    assert sample.metrics["checkpoints"] == [] and sample.metrics["checkpoint_failures"] >= 1


def test_a_checkpoint_of_another_generation_is_dropped_and_the_job_sampled_from_the_start(
    flow_env, photos, tiny_model_dir, tmp_path, caplog
):
    flow_env(sample_checkpoint_steps=1)
    request = GenerationRequest(
        subject=SubjectSpec(id="ann", photo=str(photos["astronaut"])), prompt=PROMPT, settings=TINY_SETTINGS
    )
    [ticket] = submit_requests([request])  # as if a run registered the job and died
    # a checkpoint of a generation with another seed, stored under this job's key
    from lynx_model import LynxPipeline

    pipe = LynxPipeline.from_pretrained(tiny_model_dir / "base", torch_dtype=torch.float32)
    pipe.load_lynx_adapter(tiny_model_dir / "lynx_full")
    pipe.set_progress_bar_config(disable=True)
    saved = []
    pipe(
        prompt=PROMPT,
        face_embeds=[0.1] * 128,
        num_frames=5,
        height=64,
        width=64,
        num_inference_steps=2,
        seed=99,
        output_type="latent",
        checkpoint_callback=saved.append,
        checkpoint_steps=1,
    )
    path = saved[0].save(tmp_path / "foreign.safetensors")
    svc = services()
    ledger.store_checkpoint(svc.tracker, svc.store, ticket.job_id, path, 1)

    with caplog.at_level("INFO"):
        outcome = run(photos, subject_id="ann")

    assert outcome.status == "completed", outcome.error_text
    messages = [record.getMessage() for record in caplog.records]
    assert f"resuming job {ticket.job_id} at step 1/2" in messages
    assert any(
        "sampling checkpoint was made with seed 99, this call uses 42; sampling from step 0" in m
        for m in messages
    )
    sample = next(r for r in svc.tracker.stage_runs(ticket.job_id) if r.attempt == 2 and r.stage == "sample")
    assert (sample.metrics["resumed_at"], sample.metrics["checkpoints"]) == (0, [1, 2])
    assert not svc.tracker.list_artifacts(job_id=ticket.job_id, kind="sampling_checkpoint")
    assert not list(svc.store.list(f"checkpoints/job-{ticket.job_id}/"))


# --- a real SIGKILL mid-sampling ---------------------------------------------------------------------
KILLED_RUN = textwrap.dedent(
    """
    import sys, threading

    import tasks.sample
    from flows.generate import lynx
    from lynx.jobs import GenerationSettings

    photo, prompt, settings, block_at = sys.argv[1:5]
    show = tasks.sample.SamplingProgress.__call__

    def progress_then_wait(self, step_index, num_steps, timestep):
        show(self, step_index, num_steps, timestep)
        if step_index + 1 == int(block_at):
            threading.Event().wait()  # the test kills this process while it waits here

    tasks.sample.SamplingProgress.__call__ = progress_then_wait
    lynx(photo, prompt, settings=GenerationSettings.model_validate_json(settings), subject_id="ann")
    """
)


@pytest.mark.slow
def test_a_job_killed_mid_sampling_resumes_from_its_last_checkpoint_with_the_same_latents(
    flow_env, photos, tmp_path, monkeypatch, caplog
):
    env = flow_env(sample_checkpoint_steps=2)
    settings = GenerationSettings(frames=5, height=64, width=64, steps=8)
    svc = services()
    # The killed run is a `lynx` flow in a process of its own, with Prefect's temporary server.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LYNX_", "PREFECT_"))}
    child_env.update(env)
    child_env.update(
        PYTHONPATH=str(REPO_ROOT),
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_LOGGING_LEVEL="WARNING",
        DO_NOT_TRACK="1",
    )
    command = [
        sys.executable,
        "-c",
        KILLED_RUN,
        str(photos["astronaut"]),
        PROMPT,
        settings.model_dump_json(),
        "5",
    ]
    log_path = tmp_path / "killed-run.log"
    with open(log_path, "wb") as log_file:
        # its own process group: the temporary Prefect server it starts outlives a SIGKILL of the
        # run (as it would in production) and is stopped with the group afterwards
        child = subprocess.Popen(
            command, env=child_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while True:  # the checkpoint of step 4 is stored (and step 2's dropped) while step 5's progress waits
            keys = [row.key for row in svc.tracker.list_artifacts(kind="sampling_checkpoint")]
            if [key[-22:] for key in keys] == ["step-00004.safetensors"] and svc.store.exists(keys[0]):
                break
            assert child.poll() is None, f"the run ended early: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint of step 4: {log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL

    [job] = svc.tracker.list_jobs()
    assert job.status is JobStatus.RUNNING
    rows = svc.tracker.stage_runs(job.id)
    assert (rows[-1].stage, rows[-1].status) == ("sample", StageStatus.RUNNING)
    [checkpoint] = svc.tracker.list_artifacts(job_id=job.id, kind="sampling_checkpoint")
    assert checkpoint.key == ledger.checkpoint_key(job.id, 4)
    assert checkpoint.biometric and checkpoint.subject_id == job.subject_id  # retention and erasure find it

    latents = []
    import tasks.decode

    decode_job = tasks.decode.decode_job

    def keep_latents(gpu_job, recorder):
        latents.append(gpu_job.latents.clone())
        return decode_job(gpu_job, recorder)

    monkeypatch.setattr(tasks.decode, "decode_job", keep_latents)
    with caplog.at_level("INFO"):
        resumed = run_lynx(str(photos["astronaut"]), PROMPT, settings=settings, subject_id="ann")
    assert (resumed.job_id, resumed.status, resumed.attempt) == (job.id, "completed", 2), resumed.error_text
    assert f"resuming job {job.id} at step 4/8" in [record.getMessage() for record in caplog.records]
    sample = next(r for r in svc.tracker.stage_runs(job.id) if r.attempt == 2 and r.stage == "sample")
    assert (sample.metrics["resumed_at"], sample.metrics["steps_run"]) == (4, 4)
    # the video is stored: the checkpoints are gone, rows and objects
    assert not svc.tracker.list_artifacts(job_id=job.id, kind="sampling_checkpoint")
    assert not list(svc.store.list(f"checkpoints/job-{job.id}/"))

    # the same generation uninterrupted (another job: same subject, prompt and settings in a campaign)
    uninterrupted = run_lynx(
        str(photos["astronaut"]), PROMPT, settings=settings, subject_id="ann", campaign="again"
    )
    assert uninterrupted.status == "completed" and uninterrupted.job_id != job.id
    assert len(latents) == 2 and torch.equal(latents[0], latents[1])
    assert json.loads(json.dumps(sample.metrics["latent_shape"])) == list(latents[0].shape)
