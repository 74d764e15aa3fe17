"""Stage "sample": the denoising loop of the DiT with the Lynx adapters, reported and checkpointed as it goes.

A Prefect progress artifact per job (key ``sampling-job-<id>``) moves with the denoising steps,
so the UI shows how far each video is; updates are sent at most every ``PROGRESS_INTERVAL`` seconds
(and at the last step), not once per step of a fast model.

Every LYNX_SAMPLE_CHECKPOINT_STEPS steps (and after the last) the loop's state is stored as a
sampling checkpoint (``lynx_model.sampling``) under a key of the job, by a background thread: the
loop only waits for the copy of a few tensors to host memory. A job sampled again (a retried task,
a re-submitted or re-run job, any attempt) starts from its newest checkpoint that verifies
(``lynx.ledger``) and logs ``resuming job N at step k/K``; the result is the uninterrupted run's,
bit for bit on the same hardware. The decode stage drops the checkpoints once the video is stored.

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
A job's candidate batches are checkpointed and resumed each on its own.

Cancelling the run (or the run that started it) stops the loop at the next step boundary: after
each step the loop reads the run's state (at most every ``CANCEL_CHECK_INTERVAL`` seconds), and when
it is Cancelling the stage raises ``RunCancelling`` once the newest checkpoint is stored; the job
ends cancelled and a re-run resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from lynx import ledger
from lynx.jobs import GenerationSettings
from lynx.settings import LynxSettings
from tasks.model import GpuJob, LoadedModel
from tasks.policy import retry_on_transient
from tasks.services import Services, services
from tasks.tracking import CancelWatch, RunCancelling, run_stage

if TYPE_CHECKING:
    from lynx_model.sampling import SamplingCheckpoint

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
# Seconds between two reads of the run's state by the denoising loop (at most once per step).
CANCEL_CHECK_INTERVAL = 1.0


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


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The running task's Prefect logger (its lines show in the UI), or this module's outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


class CheckpointWriter:
    """The pipeline's ``checkpoint_callback``: stores a job's checkpoints from a background thread.

    The pipeline hands over CPU copies and goes on with the next step; this thread writes the file
    and stores it (``ledger.store_checkpoint``). When a checkpoint arrives while the previous one is
    still being stored, only the newest waits: the denoising loop never waits for the store. A
    failed write is logged and sampling goes on (a resume finds the previous checkpoint).
    ``close()`` waits for the last one.
    """

    def __init__(self, svc: Services, job_id: int, scratch: Path, *, batch: str = "") -> None:
        self.svc, self.job_id, self.scratch, self.batch = svc, job_id, scratch, batch
        self.stored: list[int] = []  # steps of the checkpoints stored, in order
        self.failed = 0
        self._pending: SamplingCheckpoint | None = None
        self._closing = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"checkpoints-job-{job_id}", daemon=True)
        self._thread.start()

    def __call__(self, checkpoint: SamplingCheckpoint) -> None:
        with self._wake:
            self._pending = checkpoint
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                checkpoint, self._pending = self._pending, None
            if checkpoint is None:
                return
            self._write(checkpoint)

    def _write(self, checkpoint: SamplingCheckpoint) -> None:
        path = self.scratch / f"write-{checkpoint.steps_done}.safetensors"
        try:
            checkpoint.save(path)
            svc, steps = self.svc, checkpoint.steps_done
            ledger.store_checkpoint(svc.tracker, svc.store, self.job_id, path, steps, batch=self.batch)
            self.stored.append(checkpoint.steps_done)
        except Exception:
            self.failed += 1
            log.warning(
                "job %s: checkpoint of step %s not stored (sampling goes on)",
                self.job_id,
                checkpoint.steps_done,
                exc_info=True,
            )
        finally:
            path.unlink(missing_ok=True)


def stored_checkpoint(
    svc: Services, job_id: int, scratch: Path, *, batch: str = ""
) -> SamplingCheckpoint | None:
    """The newest stored checkpoint of the job (of its candidate ``batch``) that verifies and reads
    back, or None."""
    from lynx_model import ModelInputError
    from lynx_model.sampling import SamplingCheckpoint

    path = scratch / "resume.safetensors"
    row = ledger.latest_checkpoint(svc.tracker, svc.store, job_id, path, batch=batch)
    if row is None:
        return None
    try:
        return SamplingCheckpoint.load(path)
    except ModelInputError as err:
        log.warning("job %s: %s; sampling from step 0", job_id, err)
        ledger.drop_checkpoints(svc.tracker, svc.store, job_id, batch=batch)
        return None
    finally:
        path.unlink(missing_ok=True)


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


def denoise(
    job: GpuJob, seed: int | list[int], resume: SamplingCheckpoint | None, batch_tag: str = "", **options: Any
) -> tuple[Any, int]:
    """Latents of the job's videos of ``seed`` (one, or a batch of candidates), resumed from ``resume``
    when it fits; returns them and the step started at."""
    from lynx_model.errors import CheckpointMismatchError

    settings = job.spec.settings
    arguments = dict(
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
        **options,
    )
    if resume is not None:
        run_logger().info("resuming job %s at step %s/%s", job.job_id, resume.steps_done, resume.total_steps)
        try:
            return job.model.pipe(**arguments, resume_from=resume), resume.steps_done
        except CheckpointMismatchError as err:  # raised before any step: start over
            run_logger().warning("job %s: %s; sampling from step 0", job.job_id, err)
            svc = services()
            ledger.drop_checkpoints(svc.tracker, svc.store, job.job_id, batch=batch_tag)
    return job.model.pipe(**arguments), 0


def merged_cache_stats(per_batch: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The step cache's counts of a job's candidate batches, added up (one batch: as it is)."""
    if not per_batch:
        return None
    merged = dict(per_batch[0])
    for name in ("block_forwards", "skipped_block_forwards"):
        merged[name] = sum(stats[name] for stats in per_batch)
    return merged


def batch_tag(batch: list[int], seeds: list[int]) -> str:
    """The key segment of a candidate batch's checkpoints ("" for a job of one video, as before)."""
    return "" if len(seeds) == 1 else f"seeds-{batch[0]}-{batch[-1]}"


def sample_batch(
    job: GpuJob, batch: list[int], tag: str, progress: Any, every: int, scratch: Path
) -> tuple[Any, int, list[int], int]:
    """Sample one batch of the job's videos with checkpoints; returns the pipeline's output, the
    start step, the steps checkpointed and the failed checkpoint writes."""
    svc = services()
    resume = stored_checkpoint(svc, job.job_id, scratch, batch=tag)
    writer = CheckpointWriter(svc, job.job_id, scratch, batch=tag) if every else None
    options: dict[str, Any] = {"progress_callback": progress}
    if writer is not None:
        options.update(checkpoint_callback=writer, checkpoint_steps=every)
    try:
        output, start = denoise(job, batch if len(batch) > 1 else batch[0], resume, tag, **options)
    finally:
        if writer is not None:
            writer.close()
    return output, start, (writer.stored if writer is not None else []), (writer.failed if writer else 0)


def stop_when_cancelled(callback: Any, cancelling: CancelWatch, job_id: int) -> Any:
    """The progress callback, raising ``RunCancelling`` after a step when the run is being cancelled:
    the pipeline stops at that step boundary and the checkpoint writer finishes storing the newest
    checkpoint (``sample_batch`` closes it), which a re-run resumes from."""

    def step(step_index: int, num_steps: int, timestep: float) -> None:
        callback(step_index, num_steps, timestep)
        if cancelling():
            raise RunCancelling(
                f"job {job_id}: the flow run was cancelled at step {step_index + 1}/{num_steps}"
            )

    return step


def sample_job(job: GpuJob, recorder: Any) -> GpuJob:
    import torch

    svc = services()
    settings = job.spec.settings
    steps = settings.steps
    every = svc.settings.sample_checkpoint_steps
    seeds = settings.candidate_seeds
    size = 1
    if len(seeds) > 1:
        size = candidate_batch_size(job.model, settings, svc.settings)
    batches = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    progress = SamplingProgress(job.job_id, steps * len(seeds))
    cancelling = CancelWatch(every=CANCEL_CHECK_INTERVAL)
    started = time.monotonic()
    latents, seconds, starts, stored, failed, cache_stats = [], [], [], [], 0, []
    with tempfile.TemporaryDirectory(dir=svc.workdir("checkpoints")) as scratch:
        for batch in batches:
            begun = time.monotonic()
            callback = stop_when_cancelled(
                progress.of_videos(seeds.index(batch[0]), len(batch), len(seeds)), cancelling, job.job_id
            )
            out, start, saved, failures = sample_batch(
                job, batch, batch_tag(batch, seeds), callback, every, Path(scratch)
            )
            latents.append(out.frames)
            if out.cache_stats is not None:
                cache_stats.append(out.cache_stats)
            starts.append(start)
            stored += saved
            failed += failures
            seconds.append(round(time.monotonic() - begun, 3))
    job.latents = latents[0] if len(latents) == 1 else torch.cat(latents)
    job.cache_stats = merged_cache_stats(cache_stats)
    job.timings["sample"] = time.monotonic() - started
    steps_run = sum(steps - start for start in starts)  # denoising steps (of a whole batch) this run made
    svc.tracker.record_compute_event(
        "sample",
        f"job-{job.job_id}",
        reused=steps_run == 0,
        job_id=job.job_id,
        duration_s=job.timings["sample"],
    )
    recorder.metrics.update(
        steps=steps,
        resumed_at=min(starts),
        steps_run=steps_run,
        checkpoints=stored,
        latent_shape=[1, *job.latents.shape[1:]],
    )
    if failed:
        recorder.metrics["checkpoint_failures"] = failed
    if len(seeds) > 1:
        recorder.metrics.update(candidates=len(seeds), seeds=seeds, batches=batches, batch_seconds=seconds)
    if job.cache_stats is not None:
        recorder.metrics.update(step_cache=job.cache_stats)
    return job


@task(name="sample", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def sample(job: GpuJob) -> GpuJob:
    """Denoise the job's video or its candidates (stage row 'sample', progress 'sampling-job-<id>')."""
    return run_stage(job, "sample", lambda recorder: sample_job(job, recorder))
