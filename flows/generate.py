"""Flow ``lynx`` (deployment ``lynx/generate``): one photo + one prompt -> published deliverables.

    prefect deployment run lynx/generate --param image=photos/alice.jpg --param prompt="..."
    prefect deployment run lynx/generate --param image='["a.jpg", "b.jpg"]' --param prompt="..."

The CPU stages run here; the GPU stages run as their own flow (``lynx-gpu``) on the GPU pool when
a Prefect server and LYNX_GPU_DEPLOYMENT are configured, in-process otherwise.
"""

from __future__ import annotations

from prefect import flow

from flows.gpu import lynx_gpu
from lynx.jobs import GenerationRequest, GenerationSettings, JobOutcome, SubjectSpec
from tasks.deliver import deliver_stage
from tasks.face import face_stage
from tasks.gpu import run_gpu_batch
from tasks.jobs import submit_jobs
from tasks.policy import configured
from tasks.report import report_job
from tasks.states import job_state
from tasks.tracking import ENDED_HOOKS, CancelWatch, cancel_flow_run_jobs, stage_call


@flow(name="lynx", on_cancellation=[cancel_flow_run_jobs], **ENDED_HOOKS, log_prints=True)
def lynx(
    image: str | list[str],
    prompt: str,
    settings: GenerationSettings | None = None,
    subject_id: str | None = None,
    consent_reference: str | None = None,
    campaign: str | None = None,
) -> JobOutcome:
    """Generate one identity-preserving video of the person in ``image`` doing what ``prompt`` says.

    ``image`` is a path on the machine running the flow (uploaded first) or an artifact-store key,
    or a list of them: several photos of the same person, fused into one identity.
    ``subject_id`` names the person across jobs (their face is then analysed once); without it
    every run registers a new subject.

    Ends Failed when the job failed, with its one-line reason (the outcome is reported and stored
    first, and readable from the state: ``tasks.states.outcomes_of``), Cancelled when cancelled.
    """
    photos = [image] if isinstance(image, str) else list(image)
    request = GenerationRequest(
        subject=SubjectSpec(id=subject_id, photos=photos, consent_reference=consent_reference),
        prompt=prompt,
        settings=settings or GenerationSettings(),
        campaign=campaign,
    )
    # Step 1: upload the photo, register subject and job (a completed job is not redone)
    [ticket] = configured(submit_jobs, "submit")([request])
    # Step 2: face: detect, align, embed
    ticket = stage_call(face_stage, "face", ticket)
    # Step 3: GPU stages (reference, text, sample, decode) as a lynx-gpu flow run
    [ticket] = run_gpu_batch([ticket], gpu_flow=lynx_gpu)
    # Step 4: deliver: upscale, encode, verify, publish
    stage_call(deliver_stage, "deliver", ticket)
    # Step 5: the outcome, with a link to the deliverable; the run ends Failed if the job failed
    outcome = configured(report_job, "report")(ticket)
    return job_state(outcome, cancelling=CancelWatch(every=0)())
