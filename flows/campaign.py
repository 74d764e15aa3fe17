"""Flow ``lynx-campaign``: subjects x prompts from a campaign file, fanned out in GPU batches.

Re-runnable: jobs completed by an earlier run are skipped while their deliverables verify, failed
and cancelled ones are retried (attempt + 1) from what they left (a stored decoded video is
delivered again, sampling resumes from its last checkpoint; see ``lynx.ledger``). Faces, identity
tokens and reference features are computed once per subject, text embeddings once per prompt; the
table artifact ``campaign-<name>-<hash>`` summarises every job.
"""

from __future__ import annotations

from prefect import flow, unmapped
from prefect.states import Failed

from flows.gpu import lynx_gpu
from lynx.jobs import JobOutcome
from tasks.campaign import read_campaign
from tasks.deliver import deliver_stage
from tasks.face import face_stage
from tasks.gpu import decoded_earlier, gpu_batches, run_gpu_batch
from tasks.jobs import submit_jobs
from tasks.policy import configured
from tasks.report import report_campaign
from tasks.services import services
from tasks.states import campaign_state
from tasks.tracking import ENDED_HOOKS, CancelWatch, cancel_flow_run_jobs, stage_call


@flow(name="lynx-campaign", on_cancellation=[cancel_flow_run_jobs], **ENDED_HOOKS, log_prints=True)
def lynx_campaign(
    campaign_file: str | None = None, name: str | None = None, reruns: int = 0
) -> list[JobOutcome]:
    """Run (or re-run) a campaign: ``campaign_file`` is a YAML/JSON file on the worker or an
    artifact-store key; with only ``name``, the spec stored by its last run is used. ``reruns``:
    how many crashed runs came before this one (set by the automation `lynx: re-run crashed
    campaigns`); past LYNX_CAMPAIGN_RERUN_ATTEMPTS the run ends Failed at once, naming the setting.

    Ends Completed only when every job completed or is held for review, else Failed ("3 of 20 jobs
    failed: <first reason>"); the outcomes are readable either way (``tasks.states.outcomes_of``)."""
    # Step 0: a re-run after a crash (the automation's) stays within its limit
    limit = services().settings.campaign_rerun_attempts
    if reruns > limit:
        return Failed(
            message=f"campaign run crashed {reruns} times; not re-run again "
            f"(setting: LYNX_CAMPAIGN_RERUN_ATTEMPTS={limit}); run it again once the cause is fixed"
        )
    if reruns:
        print(f"re-run {reruns} of at most {limit} after a crashed run: finished work is skipped")
    # Step 1: read and validate the campaign
    spec = configured(read_campaign, "submit")(campaign_file, name)
    # Step 2: upload photos, register subjects and jobs (completed skipped, failed retried)
    tickets = configured(submit_jobs, "submit")(spec.requests(), spec.model_dump(mode="json"))
    # Step 3: face stage for every job (computed once per subject, reused by its other jobs)
    tickets = [stage_call(face_stage, "face", ticket) for ticket in tickets]
    # Step 4: GPU batches of LYNX_GPU_BATCH_SIZE, as many at once as the GPU pool's limit allows
    gpu_runs = run_gpu_batch.map(gpu_batches(tickets), gpu_flow=unmapped(lynx_gpu))
    # Step 5: deliver the jobs decoded by an earlier run now, and each batch's jobs as soon as its
    # GPU run is done (later batches keep running)
    for job in decoded_earlier(tickets):
        stage_call(deliver_stage, "deliver", job)
    for run in gpu_runs:
        for job in run.result():
            stage_call(deliver_stage, "deliver", job)
    # Step 6: summary table of every job (this run's and earlier runs'); the run's state says it too
    outcomes = configured(report_campaign, "report")(spec.name, tickets)
    return campaign_state(outcomes, cancelling=CancelWatch(every=0)())
