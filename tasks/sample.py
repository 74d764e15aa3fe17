"""Stage "sample": the denoising loop of the DiT with the Lynx adapters, reported as it goes.

A Prefect progress artifact per job (key ``sampling-job-<id>``) moves with the denoising steps,
so the UI shows how far each video is; updates are sent at most every ``PROGRESS_INTERVAL`` seconds
(and at the last step), not once per step of a fast model.

A job with N candidates (``GenerationSettings.candidates``) samples N videos with seeds seed ..
seed + N - 1. They share the job's identity tokens, reference features and text embeddings (encoded
once by the earlier stages) and run as batches of the pipeline (a list of seeds: each video exactly
its one-seed call's), as many per batch as ``candidate_batch_size`` allows:

- on CUDA, the free accelerator memory once the weights are resident (``torch.cuda.mem_get_info``;
  with LYNX_CPU_OFFLOAD the DiT's weights, moved in for each forward, are counted as taken) over
  the pipeline's estimate of what each extra video's activations take
  (``LynxPipeline.activation_bytes_per_video``, guidance passes one after another, the reference
  shared), with 10 % headroom, at least 1;
- on the CPU, one at a time: the matmuls of one video already keep every core busy, a batch would
  only add memory;
- LYNX_CANDIDATE_BATCH caps it (and sets it on the CPU).

Batches run one after another, so the candidates that do not fit in memory at once still share
the encodings. Their latents are kept stacked, ``[N, C, F, H, W]``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from lynx.jobs import GenerationSettings
from lynx.settings import LynxSettings
from tasks.model import GpuJob, LoadedModel
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

    def of_videos(self, first: int, count: int, total: int):
        """The pipeline callback of a batch of ``count`` of the job's ``total`` videos, starting at
        video ``first``: each of its steps advances the artifact by ``count`` video-steps."""

        def callback(step_index: int, num_steps: int, timestep: float) -> None:
            self(first * num_steps + (step_index + 1) * count - 1, total * num_steps, timestep)

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


def candidate_batch_size(model: LoadedModel, settings: GenerationSettings, lynx: LynxSettings) -> int:
    """How many of a job's candidates to sample in one pipeline call (see the module docstring)."""
    import torch

    from lynx_model.memory import videos_that_fit

    pipe = model.pipe
    device = pipe._execution_device
    cap = lynx.candidate_batch
    if device.type != "cuda":
        return cap or 1
    free, _ = torch.cuda.mem_get_info(device)
    if lynx.cpu_offload:  # the DiT is moved onto the GPU for each forward: its weights are not free memory
        free -= sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    per_video = pipe.activation_bytes_per_video(settings.height, settings.width, settings.frames)
    fits = videos_that_fit(max(free, 0), per_video)
    return min(fits, cap) if cap else fits


def sample_job(job: GpuJob, recorder: Any) -> GpuJob:
    import torch

    svc = services()
    settings = job.spec.settings
    seeds = settings.candidate_seeds
    size = 1
    if len(seeds) > 1:
        size = candidate_batch_size(job.model, settings, svc.settings)
    batches = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    progress = SamplingProgress(job.job_id, settings.steps * len(seeds))
    started = time.monotonic()
    latents, seconds = [], []
    for batch in batches:
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
            seed=batch if len(batch) > 1 else batch[0],
            output_type="latent",
            progress=False,
            progress_callback=progress.of_videos(seeds.index(batch[0]), len(batch), len(seeds)),
        )
        latents.append(output.frames)
        seconds.append(round(time.monotonic() - begun, 3))
    job.latents = latents[0] if len(latents) == 1 else torch.cat(latents)
    job.timings["sample"] = time.monotonic() - started
    svc.tracker.record_compute_event(
        "sample", f"job-{job.job_id}", reused=False, job_id=job.job_id, duration_s=job.timings["sample"]
    )
    recorder.metrics.update(steps=settings.steps, latent_shape=[1, *job.latents.shape[1:]])
    if len(seeds) > 1:
        recorder.metrics.update(candidates=len(seeds), seeds=seeds, batches=batches, batch_seconds=seconds)
    return job


@task(name="sample", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def sample(job: GpuJob) -> GpuJob:
    """Denoise the job's video or its candidates (stage row 'sample', progress 'sampling-job-<id>')."""
    return run_stage(job, "sample", lambda recorder: sample_job(job, recorder))
