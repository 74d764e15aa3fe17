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
from tasks.model import GpuJob
from tasks.policy import retry_on_transient
from tasks.services import Services, services
from tasks.tracking import run_stage

if TYPE_CHECKING:
    from lynx_model.sampling import SamplingCheckpoint

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

    def __init__(self, svc: Services, job_id: int, scratch: Path) -> None:
        self.svc, self.job_id, self.scratch = svc, job_id, scratch
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
            ledger.store_checkpoint(svc.tracker, svc.store, self.job_id, path, steps)
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


def stored_checkpoint(svc: Services, job_id: int, scratch: Path) -> SamplingCheckpoint | None:
    """The job's newest stored checkpoint that verifies and reads back, or None."""
    from lynx_model import ModelInputError
    from lynx_model.sampling import SamplingCheckpoint

    path = scratch / "resume.safetensors"
    row = ledger.latest_checkpoint(svc.tracker, svc.store, job_id, path)
    if row is None:
        return None
    try:
        return SamplingCheckpoint.load(path)
    except ModelInputError as err:
        log.warning("job %s: %s; sampling from step 0", job_id, err)
        ledger.drop_checkpoints(svc.tracker, svc.store, job_id)
        return None
    finally:
        path.unlink(missing_ok=True)


def denoise(job: GpuJob, resume: SamplingCheckpoint | None, **options: Any) -> tuple[Any, int]:
    """The job's latents, resumed from ``resume`` when it fits; returns them and the step started at."""
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
        seed=settings.seed,
        output_type="latent",
        progress=False,
        **options,
    )
    if resume is not None:
        run_logger().info("resuming job %s at step %s/%s", job.job_id, resume.steps_done, resume.total_steps)
        try:
            return job.model.pipe(**arguments, resume_from=resume).frames, resume.steps_done
        except CheckpointMismatchError as err:  # raised before any step: start over
            run_logger().warning("job %s: %s; sampling from step 0", job.job_id, err)
            svc = services()
            ledger.drop_checkpoints(svc.tracker, svc.store, job.job_id)
    return job.model.pipe(**arguments).frames, 0


def sample_job(job: GpuJob, recorder: Any) -> GpuJob:
    svc = services()
    steps = job.spec.settings.steps
    every = svc.settings.sample_checkpoint_steps
    progress = SamplingProgress(job.job_id, steps)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=svc.workdir("checkpoints")) as scratch:
        resume = stored_checkpoint(svc, job.job_id, Path(scratch))
        writer = CheckpointWriter(svc, job.job_id, Path(scratch)) if every else None
        options: dict[str, Any] = {"progress_callback": progress}
        if writer is not None:
            options.update(checkpoint_callback=writer, checkpoint_steps=every)
        try:
            job.latents, start = denoise(job, resume, **options)
        finally:
            if writer is not None:
                writer.close()
    job.timings["sample"] = time.monotonic() - started
    svc.tracker.record_compute_event(
        "sample",
        f"job-{job.job_id}",
        reused=start == steps,
        job_id=job.job_id,
        duration_s=job.timings["sample"],
    )
    recorder.metrics.update(
        steps=steps,
        resumed_at=start,
        steps_run=steps - start,
        checkpoints=writer.stored if writer is not None else [],
        latent_shape=list(job.latents.shape),
    )
    if writer is not None and writer.failed:
        recorder.metrics["checkpoint_failures"] = writer.failed
    return job


@task(name="sample", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def sample(job: GpuJob) -> GpuJob:
    """Denoise one video (stage row 'sample', progress artifact 'sampling-job-<id>')."""
    return run_stage(job, "sample", lambda recorder: sample_job(job, recorder))
