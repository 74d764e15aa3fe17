"""Stage "sample": the denoising loop of the DiT with the Lynx adapters, reported as it goes.

A Prefect progress artifact per job (key ``sampling-job-<id>``) moves with the denoising steps,
so the UI shows how far each video is; updates are sent at most every ``PROGRESS_INTERVAL`` seconds
(and at the last step), not once per step of a fast model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from tasks.model import GpuJob
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import run_stage

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0


class SamplingProgress:
    """The pipeline's ``progress_callback``, turned into a Prefect progress artifact (0-100 %).

    Best effort: the artifact only shows how far a video is, so an API error is logged once and
    later updates are skipped; the sampling goes on.
    """

    def __init__(self, job_id: int, steps: int) -> None:
        self.job_id = job_id
        self.artifact_id = None
        try:
            self.artifact_id = create_progress_artifact(
                progress=0.0,
                key=f"sampling-job-{job_id}",
                description=f"Job {job_id}: denoising steps done out of {steps}",
            )
        except Exception:
            log.warning("job %s: no progress artifact (the sampling goes on)", job_id, exc_info=True)
        self._last = time.monotonic()

    def __call__(self, step_index: int, num_steps: int, timestep: float) -> None:
        if self.artifact_id is None:
            return
        now = time.monotonic()
        last_step = step_index + 1 == num_steps
        if last_step or now - self._last >= PROGRESS_INTERVAL:
            try:
                update_progress_artifact(self.artifact_id, progress=100.0 * (step_index + 1) / num_steps)
            except Exception:
                log.warning(
                    "job %s: progress artifact not updated (the sampling goes on)", self.job_id, exc_info=True
                )
                self.artifact_id = None
            self._last = now


def sample_job(job: GpuJob, recorder: Any) -> GpuJob:
    settings = job.spec.settings
    progress = SamplingProgress(job.job_id, settings.steps)
    started = time.monotonic()
    output = job.model.pipe(
        prompt_embeds=job.prompt_embeds,
        negative_prompt_embeds=job.negative_prompt_embeds,
        identity=job.identity,
        reference=job.reference,
        height=settings.height,
        width=settings.width,
        num_frames=settings.frames,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        guidance_scale_id=settings.guidance_scale_id,
        ip_scale=settings.ip_scale,
        ref_scale=settings.ref_scale,
        seed=settings.seed,
        output_type="latent",
        progress=False,
        progress_callback=progress,
    )
    job.latents = output.frames
    job.timings["sample"] = time.monotonic() - started
    services().tracker.record_compute_event(
        "sample", f"job-{job.job_id}", reused=False, job_id=job.job_id, duration_s=job.timings["sample"]
    )
    recorder.metrics.update(steps=settings.steps, latent_shape=list(job.latents.shape))
    return job


@task(name="sample", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def sample(job: GpuJob) -> GpuJob:
    """Denoise one video (stage row 'sample', progress artifact 'sampling-job-<id>')."""
    return run_stage(job, "sample", lambda recorder: sample_job(job, recorder))
