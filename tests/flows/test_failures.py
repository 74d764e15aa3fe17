"""Failure semantics: transient errors retried, others fail the job at once with stage and reason,
timeouts name their setting, failures leave no deliverable, dead runs and cancellations are handled."""

from __future__ import annotations

import subprocess
import time

import pytest
from prefect import flow, get_client, task
from prefect.states import Crashed, Running
from sqlalchemy import update

from flows.generate import lynx
from lynx.db.models import JobStatus, StageRun, StageStatus
from lynx.errors import InputError, JobFailedError, ServiceUnavailableError
from lynx.jobs import GenerationRequest, JobTicket, SubjectSpec
from lynx.liveness import Owner, hostname, process_start, this_process
from lynx.settings import get_settings
from tasks.deliver import deliver_stage
from tasks.gpu import run_batch
from tasks.jobs import submit_requests
from tasks.policy import is_transient
from tasks.services import services
from tasks.states import outcomes_of
from tasks.tracking import cancel_flow_run_jobs, run_stage, stage_call
from tests.flows.conftest import TINY_SETTINGS, run_campaign, run_lynx


def request(photo, prompt="a person smiling", subject_id=None) -> GenerationRequest:
    return GenerationRequest(
        subject=SubjectSpec(id=subject_id, photo=str(photo)), prompt=prompt, settings=TINY_SETTINGS
    )


def test_only_transient_errors_count_as_transient():
    assert is_transient(ServiceUnavailableError("S3 down"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(InputError("no face"))
    assert not is_transient(RuntimeError("bug"))


def run_in_a_flow(ticket: JobTicket, work) -> JobTicket:
    """Run ``work`` as stage 'face' of the ticket's job, in a task with the configured policy."""

    @task(name="test-stage")
    def stage(ticket: JobTicket) -> JobTicket:
        return run_stage(ticket, "face", work)

    @flow
    def run(ticket: JobTicket) -> JobTicket:
        return stage_call(stage, "face", ticket)

    return run(ticket)


def test_a_transient_error_is_retried_and_recorded_then_the_stage_completes(flow_env, photos):
    flow_env(task_retries=2)
    [ticket] = submit_requests([request(photos["astronaut"])])
    calls = []

    def flaky(recorder):
        calls.append(1)
        if len(calls) == 1:
            raise ServiceUnavailableError("cannot reach S3 at minio:9000", setting="LYNX_S3_ENDPOINT")
        return ticket

    result = run_in_a_flow(ticket, flaky)
    assert result.active and len(calls) == 2
    tracker = services().tracker
    rows = [r for r in tracker.stage_runs(ticket.job_id) if r.stage == "face"]
    assert [r.status for r in rows] == [StageStatus.FAILED, StageStatus.COMPLETED]
    assert "cannot reach S3" in rows[0].error_text
    assert tracker.get_job(ticket.job_id).status is JobStatus.RUNNING


def test_a_permanent_error_fails_the_job_at_once_without_retries(flow_env, photos):
    flow_env(task_retries=3)
    [ticket] = submit_requests([request(photos["astronaut"])])
    calls = []

    def bad(recorder):
        calls.append(1)
        raise InputError("the photo shows a cat")

    result = run_in_a_flow(ticket, bad)
    assert len(calls) == 1
    assert (result.status, result.error_stage, result.error_text) == (
        "failed",
        "face",
        "the photo shows a cat",
    )
    job = services().tracker.get_job(ticket.job_id)
    assert (job.status, job.error_stage, job.error_text) == (
        JobStatus.FAILED,
        "face",
        "the photo shows a cat",
    )


def test_a_stage_past_its_timeout_fails_the_job_naming_the_setting(flow_env, photos):
    flow_env(face_timeout=1)
    [ticket] = submit_requests([request(photos["astronaut"])])

    def slow(recorder):
        for _ in range(50):
            time.sleep(0.1)
        return ticket

    started = time.monotonic()
    result = run_in_a_flow(ticket, slow)
    assert time.monotonic() - started < 4
    assert result.status == "failed" and "LYNX_FACE_TIMEOUT" in result.error_text
    assert services().tracker.get_job(ticket.job_id).error_stage == "face"


def test_missing_model_weights_fail_the_job_at_stage_model_naming_the_setting(flow_env, photos, tmp_path):
    flow_env(base_model_path=tmp_path / "no-weights-here")
    state = lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS, return_state=True)
    outcome = outcomes_of(state)
    # the run tells the truth: Failed, with the job's one-line reason; the outcome was reported first
    assert (
        state.is_failed()
        and state.message == f"job {outcome.job_id} failed at stage model: {outcome.error_text}"
    )
    with pytest.raises(JobFailedError, match="failed at stage model"):
        state.result()
    assert outcome.status == "failed" and outcome.error_stage == "model"
    assert "LYNX_BASE_MODEL_PATH" in outcome.error_text
    assert "sample" not in {r.stage for r in services().tracker.stage_runs(outcome.job_id)}


def test_a_model_load_past_its_timeout_fails_the_jobs_at_stage_model_naming_the_setting(
    flow_env, photos, monkeypatch
):
    flow_env(model_load_timeout=1)
    import tasks.model

    def slow_load(settings):  # as the 14B model on a slow disk; sleeps in steps the timeout can break
        for _ in range(50):
            time.sleep(0.1)
        raise AssertionError("the timeout did not stop the load")

    monkeypatch.setattr(tasks.model, "loaded_model", slow_load)
    outcome = run_lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS)
    assert (outcome.status, outcome.error_stage) == ("failed", "model"), outcome.error_text
    assert outcome.error_text.startswith("loading the model timed out after")
    assert "LYNX_MODEL_LOAD_TIMEOUT" in outcome.error_text
    assert "sample" not in {r.stage for r in services().tracker.stage_runs(outcome.job_id)}


@pytest.mark.parametrize(
    "setting,value,named",
    [
        ("deliver_preset", "warp-speed", "LYNX_DELIVER_PRESET"),
        ("quality_gate_recognizer", "no-such-recogniser", "LYNX_QUALITY_GATE_RECOGNIZER"),
    ],
)
def test_impossible_delivery_settings_fail_the_job_at_submit_before_any_gpu_stage(
    flow_env, photos, setting, value, named
):
    flow_env(**{setting: value}, quality_gate_threshold=0.5)
    outcome = run_lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS)
    assert (outcome.status, outcome.error_stage) == ("failed", "submit")
    assert named in outcome.error_text and "\n" not in outcome.error_text
    assert [r.stage for r in services().tracker.stage_runs(outcome.job_id)] == ["submit"]


def test_settings_made_impossible_after_a_job_completed_fail_nothing_on_a_rerun(
    flow_env, photos, monkeypatch, caplog
):
    flow_env()
    done = run_lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS, subject_id="ann")
    assert done.status == "completed", done.error_text
    # a re-run claims no job: the later stages' settings are not even checked
    monkeypatch.setenv("LYNX_DELIVER_PRESET", "warp-speed")
    get_settings.cache_clear()
    with caplog.at_level("ERROR", logger="tasks.jobs"):
        [ticket] = submit_requests([request(photos["astronaut"], subject_id="ann")])
    assert (ticket.job_id, ticket.status, ticket.error_stage) == (done.job_id, "completed", None)
    assert services().tracker.get_job(done.job_id).status is JobStatus.COMPLETED
    assert not [r for r in caplog.records if "jobs fail at submit" in r.getMessage()]


def test_a_delivery_failure_publishes_nothing(flow_env, photos, tmp_path):
    logo = tmp_path / "logo.png"
    logo.write_text("not an image")
    flow_env(deliver_watermark=logo)
    outcome = run_lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS)
    assert outcome.status == "failed" and outcome.error_stage == "deliver"
    assert "LYNX_DELIVER_WATERMARK" in outcome.error_text
    assert outcome.master_key is None
    assert not list(services().store.list("deliverables/"))


def test_a_job_cancelled_while_delivering_keeps_no_published_files(flow_env, photos):
    flow_env()
    done = run_lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS, subject_id="ann")
    tracker = services().tracker
    # a second job of the same subject, cancelled while its (borrowed) video is being delivered
    [ticket] = submit_requests([request(photos["astronaut"], "a person waving", "ann")])
    first = tracker.stage_runs(done.job_id)
    face = next(r for r in first if r.stage == "face")
    decode = next(r for r in first if r.stage == "decode")
    from lynx.jobs import FaceOutputs, GpuJobResult

    ticket = ticket.model_copy(
        update={
            "face": FaceOutputs(
                embedding_key=face.output_keys[0],
                id_crop_key=face.output_keys[1],
                ref_crop_key=face.output_keys[2],
                embedding_model="sface",
                embedding_dim=128,
                det_score=0.9,
                box=face.metrics["box"],
                faces_detected=face.metrics["faces_detected"],
            ),
            "video": GpuJobResult(
                job_id=ticket.job_id,
                status="completed",
                intermediate_key=decode.output_keys[0],
                frames=5,
                fps=16.0,
                variant="full",
            ),
        }
    )
    tracker.transition_job(ticket.job_id, JobStatus.CANCELLED)

    result = deliver_stage.fn(ticket)
    assert result.status == "failed" and result.error_stage == "deliver"
    assert not list(services().store.list(f"deliverables/adhoc/{ticket.job_id}/"))
    assert tracker.get_job(ticket.job_id).status is JobStatus.CANCELLED
    assert list(services().store.list(f"deliverables/adhoc/{done.job_id}/"))  # the other job's stay
    # the files were recorded before the job turned out cancelled; their rows are deleted with them
    rows = tracker.list_artifacts(job_id=ticket.job_id, include_deleted=True)
    rows = [row for row in rows if row.key.startswith("deliverables/")]
    assert {row.kind for row in rows} == {"video", "preview", "manifest"}
    assert all(row.deleted_at is not None for row in rows)


def test_a_delivery_retried_after_a_transient_error_keeps_one_live_row_per_file(
    flow_env, photos, monkeypatch
):
    flow_env(task_retries=1)
    import tasks.deliver

    gate = tasks.deliver.gate_job
    calls = []

    def flaky_gate(*args, **kwargs):  # the database drops out after the files are recorded
        calls.append(1)
        if len(calls) == 1:
            raise ServiceUnavailableError("cannot reach the tracking database", setting="LYNX_DATABASE_URL")
        return gate(*args, **kwargs)

    monkeypatch.setattr(tasks.deliver, "gate_job", flaky_gate)
    outcome = run_lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS)
    assert outcome.status == "completed" and len(calls) == 2
    tracker = services().tracker
    prefix = f"deliverables/adhoc/{outcome.job_id}/"
    published = sorted(services().store.list(prefix))
    rows = [r for r in tracker.list_artifacts(job_id=outcome.job_id, include_deleted=True) if prefix in r.key]
    assert sorted(row.key for row in rows if row.deleted_at is None) == published  # one live row per file
    assert sorted(row.key for row in rows if row.deleted_at) == published  # the first try's, deleted


def test_a_job_left_running_by_a_dead_run_is_retried_by_the_next_run(flow_env, photos):
    flow_env()

    @flow
    def dies_after_submitting() -> int:  # as if the worker died right after registering the job
        return submit_requests([request(photos["hanks"], "a man smiling", "tom")])[0].job_id

    job_id = dies_after_submitting()
    tracker = services().tracker
    assert tracker.get_job(job_id).status is JobStatus.RUNNING

    outcome = run_lynx(str(photos["hanks"]), "a man smiling", settings=TINY_SETTINGS, subject_id="tom")
    assert outcome.job_id == job_id and outcome.status == "completed" and outcome.attempt == 2
    first_attempt = [r for r in tracker.stage_runs(job_id) if r.attempt == 1]
    assert [r.stage for r in first_attempt] == ["submit"]


def left_running_by(job_id: int, owner: str, state=None) -> str:
    """Hand the job's rows to a flow run in ``state`` (default Running, as a SIGKILLed run stays
    without the heartbeat automation) whose process is ``owner`` (host:pid:start); returns its id."""

    @flow(name="killed")
    def killed() -> None: ...

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(killed, state=state or Running())
    with services().tracker.transaction() as session:
        session.execute(
            update(StageRun)
            .where(StageRun.job_id == job_id)
            .values(flow_run_id=str(run.id), owner=owner, status=StageStatus.RUNNING, finished_at=None)
        )
    return str(run.id)


def exited_process() -> Owner:
    child = subprocess.Popen(["sleep", "0.2"])
    owner = Owner(hostname(), child.pid, process_start(child.pid))
    child.wait()
    return owner


def test_process_liveness_tells_a_live_a_dead_and_a_reused_process_id_apart():
    me = this_process()
    assert me.local and me.alive() and Owner.parse(str(me)) == me
    assert not exited_process().alive()
    assert not Owner(me.host, me.pid, me.start + 1).alive()  # the id now names another process
    assert not Owner("another-host", 1, 0).local
    assert Owner.parse("no owner") is None


def test_a_job_whose_owning_process_on_this_machine_is_gone_is_retried_at_once(flow_env, photos):
    flow_env()
    [first] = submit_requests([request(photos["hanks"], "a man smiling", "tom")])
    left_running_by(first.job_id, str(exited_process()))  # Prefect still calls its run Running

    outcome = run_lynx(str(photos["hanks"]), "a man smiling", settings=TINY_SETTINGS, subject_id="tom")
    assert outcome.job_id == first.job_id and outcome.status == "completed" and outcome.attempt == 2
    [old] = [r for r in services().tracker.stage_runs(first.job_id) if r.attempt == 1]
    assert old.status is StageStatus.FAILED and "worker lost" in old.error_text


def test_a_job_of_a_live_process_with_a_running_flow_run_is_left_alone(flow_env, photos):
    flow_env()
    [first] = submit_requests([request(photos["hanks"], "a man smiling", "tom")])
    child = subprocess.Popen(["sleep", "60"])
    try:
        left_running_by(first.job_id, str(Owner(hostname(), child.pid, process_start(child.pid))))
        [again] = submit_requests([request(photos["hanks"], "a man smiling", "tom")])
    finally:
        child.kill()
        child.wait()
    assert (again.job_id, again.attempt, again.status) == (first.job_id, 1, "running")


def test_a_job_of_another_machines_run_is_taken_over_once_prefect_calls_that_run_crashed(flow_env, photos):
    flow_env()
    [first] = submit_requests([request(photos["hanks"], "a man smiling", "tom")])
    run_id = left_running_by(first.job_id, "gpu-node-7:4242:123")
    [again] = submit_requests([request(photos["hanks"], "a man smiling", "tom")])
    assert (again.attempt, again.status) == (1, "running")  # its heartbeats may still come

    with get_client(sync_client=True) as client:  # as the heartbeat automation does
        client.set_flow_run_state(run_id, Crashed(message="no heartbeat for 90 s"), force=True)
    [taken] = submit_requests([request(photos["hanks"], "a man smiling", "tom")])
    assert (taken.job_id, taken.attempt, taken.status) == (first.job_id, 2, None)


def test_a_retried_submit_keeps_the_jobs_it_already_claimed(flow_env, photos):
    flow_env()

    @flow
    def submits_twice() -> tuple[JobTicket, JobTicket]:  # as a submit task retried by Prefect would
        requests = [request(photos["astronaut"], "a person waving", "ann")]
        return submit_requests(requests)[0], submit_requests(requests)[0]

    first, second = submits_twice()
    assert first.active and second.active
    assert (second.job_id, second.attempt) == (first.job_id, 1)
    assert services().tracker.get_job(first.job_id).status is JobStatus.RUNNING


def test_the_cancellation_hook_marks_the_runs_jobs_cancelled(flow_env, photos):
    flow_env()

    @flow
    def registers_two() -> list[int]:
        tickets = submit_requests([request(photos["astronaut"], "one"), request(photos["astronaut"], "two")])
        return [t.job_id for t in tickets]

    state = registers_two(return_state=True)
    job_ids = state.result()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    cancel_flow_run_jobs(None, flow_run, state)
    tracker = services().tracker
    assert [tracker.get_job(j).status for j in job_ids] == [JobStatus.CANCELLED] * 2
    assert tracker.get_job(job_ids[0]).attempt == 1


def test_a_gpu_run_that_crashes_fails_its_jobs_with_the_reason(flow_env, photos):
    flow_env()

    @flow(name="broken-gpu")
    def broken_gpu(batch) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    @flow
    def run() -> list[JobTicket]:
        from tasks.face import face_stage

        tickets = [face_stage(t) for t in submit_requests([request(photos["astronaut"])])]
        return run_batch(tickets, broken_gpu)

    [ticket] = run()
    assert ticket.status == "failed" and ticket.error_stage == "gpu"
    assert "illegal memory access" in ticket.error_text
    job = services().tracker.get_job(ticket.job_id)
    assert job.status is JobStatus.FAILED and "illegal memory access" in job.error_text


@pytest.mark.parametrize("field,value", [("frames", 8), ("height", 100)])
def test_impossible_generation_settings_are_refused_before_anything_runs(field, value):
    from pydantic import ValidationError

    from lynx.jobs import GenerationSettings

    with pytest.raises(ValidationError, match="4k\\+1|multiple of 16"):
        GenerationSettings(**{field: value})


def test_an_unknown_gpu_deployment_fails_the_job_at_stage_gpu_naming_the_setting(flow_env, photos):
    flow_env(gpu_deployment="lynx-gpu/does-not-exist")
    outcome = run_lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS)
    assert (outcome.status, outcome.error_stage) == ("failed", "gpu")
    assert "'lynx-gpu/does-not-exist'" in outcome.error_text and "LYNX_GPU_DEPLOYMENT" in outcome.error_text
    assert "\n" not in outcome.error_text
    tracker = services().tracker
    job = tracker.get_job(outcome.job_id)
    assert (job.status, job.error_stage) == (JobStatus.FAILED, "gpu")
    assert StageStatus.RUNNING not in {r.status for r in tracker.stage_runs(outcome.job_id)}


def test_a_failed_gpu_hand_off_fails_its_batch_alone_and_the_campaign_is_reported(
    flow_env, photos, tmp_path, monkeypatch
):
    import tasks.gpu
    from flows.campaign import lynx_campaign
    from tests.flows.test_campaign_flow import write_campaign

    flow_env(gpu_batch_size=1)
    real, calls = tasks.gpu.run_in_process, []

    def first_hand_off_breaks(batch, gpu_flow):  # as a Prefect API error in one batch's hand-off
        calls.append(batch.job_ids)
        if len(calls) == 1:
            raise RuntimeError("the Prefect API answered 503")
        return real(batch, gpu_flow)

    monkeypatch.setattr(tasks.gpu, "run_in_process", first_hand_off_breaks)
    subjects = {"astronaut": str(photos["astronaut"]), "tom": str(photos["hanks"])}
    campaign = write_campaign(tmp_path, "handoff", subjects, ["a person smiling"])
    state = lynx_campaign(str(campaign), return_state=True)
    assert state.is_failed() and state.message.startswith("1 of 2 jobs failed: job ")
    outcomes = outcomes_of(state)

    assert len(calls) == 2
    by_job = {o.job_id: o for o in outcomes}
    broken, fine = by_job[calls[0][0]], by_job[calls[1][0]]
    assert (broken.status, broken.error_stage) == ("failed", "gpu")
    assert broken.error_text == "GPU hand-off failed: RuntimeError: the Prefect API answered 503"
    assert fine.status == "completed" and fine.master_key
    assert services().tracker.get_job(broken.job_id).status is JobStatus.FAILED


def test_reading_a_campaign_is_retried_after_a_transient_error(flow_env, photos, tmp_path, monkeypatch):
    import tasks.campaign
    from tests.flows.test_campaign_flow import write_campaign

    flow_env(task_retries=1)
    real, calls = tasks.campaign.read_campaign_spec, []

    def flaky(campaign_file, name):  # the artifact store did not answer the first time
        calls.append(1)
        if len(calls) == 1:
            raise ServiceUnavailableError("cannot reach S3 at minio:9000", setting="LYNX_S3_ENDPOINT")
        return real(campaign_file, name)

    monkeypatch.setattr(tasks.campaign, "read_campaign_spec", flaky)
    path = write_campaign(tmp_path, "flaky", {"ghost": str(tmp_path / "missing.jpg")}, ["a person"])
    [outcome] = run_campaign(str(path))
    assert len(calls) == 2
    assert (outcome.status, outcome.error_stage) == ("failed", "submit")  # no photo: nothing more runs
