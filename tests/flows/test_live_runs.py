"""Runs that die or are cancelled, with real Prefect (the session's test server):

- a cancel lands within one sampling step + 5 s, the jobs end cancelled, the run Cancelled, and a
  re-run resumes from the stored checkpoint;
- a GPU run that ends Crashed (as the heartbeat automation marks a dead one) has its unfinished jobs
  re-submitted to the GPU deployment by the waiting flow, up to LYNX_GPU_RESUBMIT_ATTEMPTS;
- every stage row of a run is closed when the run ends;
- the automations of deployments/automations.py are accepted by a Prefect server, idempotently;
- a campaign re-run (by the re-run automation) past LYNX_CAMPAIGN_RERUN_ATTEMPTS ends Failed at once.
"""

from __future__ import annotations

import threading
import time

import pytest
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.states import Cancelling, Crashed

import tasks.sample
from flows.generate import lynx
from flows.gpu import lynx_gpu
from lynx.db.models import JobStatus, StageStatus
from lynx.jobs import GenerationSettings
from lynx.settings import get_settings
from tasks.services import services
from tasks.states import outcomes_of
from tests.flows.conftest import TINY_SETTINGS

PROMPT = "a person smiling"
STEP_SECONDS = 0.5  # each denoising step is held this long, so that the cancel lands mid-sampling


def test_a_cancel_lands_within_one_step_and_a_rerun_resumes_from_the_checkpoint(
    flow_env, photos, monkeypatch, caplog
):
    flow_env(sample_checkpoint_steps=2)
    settings = GenerationSettings(frames=5, height=64, width=64, steps=12)
    show = tasks.sample.SamplingProgress.__call__

    def slow_step(self, step_index, num_steps, timestep):  # a step of a bigger model
        time.sleep(STEP_SECONDS)
        show(self, step_index, num_steps, timestep)

    monkeypatch.setattr(tasks.sample.SamplingProgress, "__call__", slow_step)
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(
            state=lynx(
                str(photos["astronaut"]), PROMPT, settings=settings, subject_id="ann", return_state=True
            )
        )
    )
    runner.start()
    svc = services()
    deadline = time.monotonic() + 120
    while not svc.tracker.list_artifacts(kind="sampling_checkpoint"):  # step 2's checkpoint is stored
        assert runner.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.1)
    [job] = svc.tracker.list_jobs()
    [parent] = [row.flow_run_id for row in svc.tracker.stage_runs(job.id) if row.stage == "submit"]
    with get_client(sync_client=True) as client:  # what `prefect flow-run cancel` does
        client.set_flow_run_state(parent, Cancelling(message="cancelled by the test"))
    cancelled_at = time.monotonic()
    runner.join(timeout=60)
    landed = time.monotonic() - cancelled_at

    assert landed < STEP_SECONDS + 5, landed
    state = result["state"]
    assert state.is_cancelled(), (state.type, state.message)
    outcome = outcomes_of(state)
    assert (outcome.job_id, outcome.status) == (job.id, "cancelled")
    assert svc.tracker.get_job(job.id).status is JobStatus.CANCELLED
    rows = svc.tracker.stage_runs(job.id)
    assert StageStatus.RUNNING not in {row.status for row in rows}
    assert "sample" in {row.stage for row in rows} and "decode" not in {row.stage for row in rows}
    [checkpoint] = svc.tracker.list_artifacts(job_id=job.id, kind="sampling_checkpoint")
    stored_step = int(checkpoint.key[-16:-12])
    assert 2 <= stored_step < 12

    monkeypatch.setattr(tasks.sample.SamplingProgress, "__call__", show)
    with caplog.at_level("INFO"):
        again = outcomes_of(
            lynx(str(photos["astronaut"]), PROMPT, settings=settings, subject_id="ann", return_state=True)
        )
    assert (again.job_id, again.status, again.attempt) == (job.id, "completed", 2), again.error_text
    messages = [record.getMessage() for record in caplog.records]
    assert f"resuming job {job.id} at step {stored_step}/12" in messages


@pytest.fixture
def gpu_deployment(prefect_harness):
    """``lynx-gpu`` registered as a deployment (no work pool: the test plays the worker)."""
    deployment_id = lynx_gpu.to_deployment(name="gpu-stages").apply()
    return deployment_id


def test_a_crashed_gpu_run_is_resubmitted_and_its_jobs_complete(flow_env, photos, gpu_deployment, tmp_path):
    from prefect.flow_engine import run_flow

    from flows.campaign import lynx_campaign
    from tests.flows.test_campaign_flow import write_campaign

    flow_env(gpu_deployment="lynx-gpu/gpu-stages", gpu_poll_seconds=0.3, gpu_resubmit_attempts=1)
    seen: list = []
    stop = threading.Event()

    def worker() -> None:
        """The first GPU run dies (Crashed, as the heartbeat automation marks it); later ones run."""
        while not stop.is_set():
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[gpu_deployment])),
                )
                for run in runs:
                    if run.id in seen or not run.state.is_scheduled():
                        continue
                    seen.append(run.id)
                    if len(seen) == 1:
                        client.set_flow_run_state(
                            run.id, Crashed(message="no heartbeat for 90 s"), force=True
                        )
                    else:
                        run_flow(lynx_gpu, flow_run=run, parameters=run.parameters)
            time.sleep(0.2)

    playing = threading.Thread(target=worker, daemon=True)
    playing.start()
    try:
        subjects = {"astronaut": str(photos["astronaut"])}
        campaign = write_campaign(tmp_path, "resubmit", subjects, [PROMPT])
        state = lynx_campaign(str(campaign), return_state=True)
    finally:
        stop.set()
        playing.join(timeout=30)
    assert state.is_completed(), state.message
    [outcome] = outcomes_of(state)
    assert outcome.status == "completed" and outcome.master_key
    assert len(seen) == 2  # the crashed run and one re-submission
    with get_client(sync_client=True) as client:
        names = [client.read_flow_run(run_id).name for run_id in seen]
    assert names[1] == f"{names[0]}-resubmit-1"
    assert StageStatus.RUNNING not in {row.status for row in services().tracker.stage_runs(outcome.job_id)}


def test_a_gpu_run_that_crashes_every_time_fails_its_jobs_naming_the_setting(
    flow_env, photos, gpu_deployment
):
    flow_env(gpu_deployment="lynx-gpu/gpu-stages", gpu_poll_seconds=0.3, gpu_resubmit_attempts=1)
    stop = threading.Event()
    crashed: list = []

    def crash_all() -> None:
        while not stop.is_set():
            with get_client(sync_client=True) as client:
                for run in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[gpu_deployment]))
                ):
                    if run.id not in crashed and run.state.is_scheduled():
                        crashed.append(run.id)
                        client.set_flow_run_state(
                            run.id, Crashed(message="no heartbeat for 90 s"), force=True
                        )
            time.sleep(0.2)

    playing = threading.Thread(target=crash_all, daemon=True)
    playing.start()
    try:
        state = lynx(str(photos["astronaut"]), PROMPT, settings=TINY_SETTINGS, return_state=True)
    finally:
        stop.set()
        playing.join(timeout=30)
    outcome = outcomes_of(state)
    assert state.is_failed() and len(crashed) == 2
    assert (outcome.status, outcome.error_stage) == ("failed", "gpu")
    assert "ended Crashed: no heartbeat for 90 s" in outcome.error_text
    assert "LYNX_GPU_RESUBMIT_ATTEMPTS" in outcome.error_text and state.message.endswith(outcome.error_text)


def test_the_automations_are_created_once_and_updated_in_place(prefect_harness, monkeypatch):
    from prefect.automations import Automation
    from prefect.blocks.notifications import SlackWebhook

    from deployments.automations import CRASH_NAME, NOTIFY_NAME, RERUN_NAME, ensure_automations
    from lynx.errors import ConfigurationError

    monkeypatch.setenv("LYNX_HEARTBEAT_WINDOW_SECONDS", "60")
    monkeypatch.delenv("LYNX_NOTIFY_BLOCK", raising=False)
    get_settings.cache_clear()
    [crash, rerun] = ensure_automations()
    [again, rerun_again] = ensure_automations()
    assert again.id == crash.id and rerun_again.id == rerun.id
    stored_rerun = Automation.read(name=RERUN_NAME)
    assert stored_rerun.trigger.expect == {"prefect.flow-run.Crashed"}
    assert stored_rerun.actions[0].source == "inferred"
    stored = Automation.read(name=CRASH_NAME)
    assert stored.trigger.posture == "Proactive" and stored.trigger.within.total_seconds() == 60
    assert stored.trigger.after == {"prefect.flow-run.heartbeat"}
    assert stored.actions[0].state == "CRASHED"

    SlackWebhook(url="https://hooks.example.invalid/lynx").save("lynx-alerts", overwrite=True)
    monkeypatch.setenv("LYNX_NOTIFY_BLOCK", "slack-webhook/lynx-alerts")
    get_settings.cache_clear()
    made = ensure_automations()
    assert [a.name for a in made] == [CRASH_NAME, RERUN_NAME, NOTIFY_NAME]
    notify = Automation.read(name=NOTIFY_NAME)
    assert notify.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}

    monkeypatch.setenv("LYNX_NOTIFY_BLOCK", "slack-webhook/nobody")
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError, match="LYNX_NOTIFY_BLOCK"):
        ensure_automations()
    get_settings.cache_clear()


def test_a_campaign_rerun_past_its_limit_ends_failed_naming_the_setting(flow_env, photos, tmp_path):
    """What the automation `lynx: re-run crashed campaigns` starts once a campaign kept crashing."""
    from flows.campaign import lynx_campaign
    from tests.flows.test_campaign_flow import write_campaign

    flow_env(campaign_rerun_attempts=1)
    campaign = write_campaign(tmp_path, "crashy", {"astronaut": str(photos["astronaut"])}, [PROMPT])
    state = lynx_campaign(str(campaign), reruns=2, return_state=True)
    assert state.is_failed() and "LYNX_CAMPAIGN_RERUN_ATTEMPTS=1" in state.message
    assert services().tracker.list_jobs() == []  # nothing was submitted
