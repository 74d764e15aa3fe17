"""Stage "sample": the denoising loop of the DiT with the Lynx adapters, reported as it goes.

A Prefect progress artifact per job (key ``sampling-job-<id>``) moves with the denoising steps,
so the UI shows how far each video is; updates are sent at most every ``PROGRESS_INTERVAL`` seconds
(and at the last step), not once per step of a fast model.

A job with N candidates (``GenerationSettings.candidates``) samples N videos with seeds seed ..
seed + N - 1. They share the job's identity tokens, reference features and text embeddings (encoded
once by the earlier stages) and run one after another through the same pipeline call: the
pipeline samples one seed per call, so there is no batch to fit in memory (one video's activations
at a time, as for a single candidate). Their latents are kept stacked, ``[N, C, F, H, W]``.
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

    def of_candidate(self, index: int, candidates: int):
        """The pipeline callback for candidate ``index``: its steps count as a share of the whole."""

        def callback(step_index: int, num_steps: int, timestep: float) -> None:
            self(index * num_steps + step_index, candidates * num_steps, timestep)

        return callback

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
    import torch

    settings = job.spec.settings
    seeds = settings.candidate_seeds
    progress = SamplingProgress(job.job_id, settings.steps * len(seeds))
    started = time.monotonic()
    latents, seconds = [], []
    for index, seed in enumerate(seeds):
        begun = time.monotonic()
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
            seed=seed,
            output_type="latent",
            progress=False,
            progress_callback=progress.of_candidate(index, len(seeds)),
        )
        latents.append(output.frames)
        seconds.append(round(time.monotonic() - begun, 3))
    job.latents = latents[0] if len(latents) == 1 else torch.cat(latents)
    job.timings["sample"] = time.monotonic() - started
    services().tracker.record_compute_event(
        "sample", f"job-{job.job_id}", reused=False, job_id=job.job_id, duration_s=job.timings["sample"]
    )
    recorder.metrics.update(steps=settings.steps, latent_shape=list(latents[0].shape))
    if len(seeds) > 1:
        recorder.metrics.update(candidates=len(seeds), seeds=seeds, candidate_seconds=seconds)
    return job


@task(name="sample", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def sample(job: GpuJob) -> GpuJob:
    """Denoise the job's video or its candidates (stage row 'sample', progress 'sampling-job-<id>')."""
    return run_stage(job, "sample", lambda recorder: sample_job(job, recorder))
