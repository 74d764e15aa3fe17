"""Stage "decode": latents -> frames -> the lossless intermediate video in the artifact store.

The intermediate (FFV1 in Matroska, bit-exact RGB) is what the CPU side delivers from; its key,
frame count and rate are recorded on the stage row, which is how the calling flow finds them
(nothing but keys crosses from a GPU flow run to its caller). Once it is stored, the job's sampling
checkpoints are deleted: the intermediate is what a re-run of the job starts from (``lynx.ledger``).

With LYNX_DELIVER_UPSCALER=realesrgan the frames are enlarged to LYNX_DELIVER_HEIGHT here, on the
GPU worker, before the intermediate is written: the deliver stage runs on the CPU pool, where the
learned upscaler takes minutes to hours per video. The row records what was done (``upscaling``,
``upscaled``) so the deliver stage's manifest still names it, and ``upscale_seconds`` apart from
``model_seconds``.

A job with several candidates gets one intermediate per candidate (``...-seed-<seed>.mkv``), each
decoded on its own (the VAE holds one video at a time); the row lists them under ``candidates``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from lynx import ledger
from lynx.db.models import ArtifactKind
from lynx.errors import InputError
from lynx.media.deliver import learned_upscale
from lynx.media.frames import to_uint8_frames
from lynx.media.intermediate import write_lossless
from lynx.media.spec import DeliverySpec, Upscaled
from lynx.settings import LynxSettings
from tasks.model import GpuJob
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import run_stage

log = logging.getLogger(__name__)


def intermediate_key(job: GpuJob, seed: int | None = None) -> str:
    """Where the job's decoded video goes; a candidate of a job with several has its seed in the name."""
    stem = f"intermediates/job-{job.job_id}/attempt-{job.spec.attempt}"
    return f"{stem}.mkv" if seed is None else f"{stem}-seed-{seed}.mkv"


def delivery_upscale(
    frames: np.ndarray, settings: LynxSettings, fps: float
) -> tuple[Iterable[np.ndarray], Upscaled | None]:
    """The decoded ``[F, H, W, 3]`` frames through Real-ESRGAN if the delivery settings ask for it.

    Lazy: one upscaled frame at a time. Otherwise the frames come back as they are.
    """
    if settings.deliver_upscaler != "realesrgan":
        return frames, None
    # Audio, logo and classifier are the deliver stage's files: not needed here, maybe not present.
    spec = DeliverySpec.from_settings(settings, source_fps=fps, audio=None, watermark=None, safety_model=None)
    return learned_upscale(to_uint8_frames(frames), (frames.shape[2], frames.shape[1]), spec)


def _timed(frames: Iterable[np.ndarray], timings: dict[str, float], name: str) -> Iterator[np.ndarray]:
    """The frames, adding the time spent making each to ``timings[name]`` (not the encode's)."""
    frames = iter(frames)
    while True:
        started = time.monotonic()
        frame = next(frames, None)
        timings[name] += time.monotonic() - started
        if frame is None:
            return
        yield frame


def drop_checkpoints(job_id: int) -> None:
    """The video is stored: the job's sampling checkpoints go (best effort; retention covers leftovers)."""
    svc = services()
    try:
        ledger.drop_checkpoints(svc.tracker, svc.store, job_id)
    except Exception:
        log.warning("job %s: sampling checkpoints not deleted", job_id, exc_info=True)


def decode_job(job: GpuJob, recorder: Any) -> GpuJob:
    seeds = job.spec.settings.candidate_seeds
    job.timings["decode"] = 0.0
    stored = [
        decode_one(job, job.latents[index : index + 1], seed if len(seeds) > 1 else None)
        for index, seed in enumerate(seeds)
    ]
    video, upscaled = stored[0][1], stored[0][2]
    job.intermediate_key = stored[0][0]
    recorder.output_keys += [key for key, _, _ in stored]
    recorder.metrics.update(
        frames=video.frames,
        fps=job.model.pipe.default_fps,
        width=video.width,
        height=video.height,
        variant=job.model.variant,
        model_version=job.model.version,
        model_seconds=job.timings.get("sample", 0.0) + job.timings["decode"],
        # what the deliver stage's manifest names besides the weights: LoRAs and the step cache
        loras=list(job.model.loras),
        step_cache=job.cache_stats,
    )
    if len(seeds) > 1:
        recorder.metrics["candidates"] = [
            {"seed": seed, "key": key} for seed, (key, _, _) in zip(seeds, stored, strict=True)
        ]
    if upscaled is not None:
        recorder.metrics.update(
            upscaling=upscaled.label,
            upscaled=upscaled.model_dump(mode="json"),
            upscale_seconds=job.timings["upscale"],
        )
    job.latents = None  # only now: a retry after a failed upload decodes them again
    return job


def decode_one(job: GpuJob, latents: Any, seed: int | None) -> tuple[str, Any, Upscaled | None]:
    """Decode one video's latents and store it; returns its key, what was written and the upscale."""
    svc = services()
    started = time.monotonic()
    frames = job.model.pipe.decode_latents(latents, output_type="np")[0]
    # Model time is the VAE decode only; encoding, upload and the tracking row are orchestration.
    job.timings["decode"] += time.monotonic() - started
    fps = job.model.pipe.default_fps
    started = time.monotonic()
    stream, upscaled = delivery_upscale(frames, svc.settings, fps)
    if upscaled is not None:
        # loading the generator (once per process), then each frame made
        job.timings["upscale"] = job.timings.get("upscale", 0.0) + time.monotonic() - started
        stream = _timed(stream, job.timings, "upscale")
    with tempfile.TemporaryDirectory(dir=svc.workdir("decode")) as scratch:
        video = write_lossless(
            stream, Path(scratch) / "intermediate.mkv", fps, ffmpeg_binary=svc.settings.ffmpeg_binary
        )
        stored = svc.store.put_file(
            video.path, key=intermediate_key(job, seed), content_type="video/x-matroska"
        )
    try:
        svc.tracker.record_artifact(stored, kind=ArtifactKind.FRAMES, job_id=job.job_id)
    except InputError:  # the subject was erased meanwhile: its video must not stay
        svc.store.delete(stored.key)
        raise
    return stored.key, video, upscaled


@task(name="decode", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def decode(job: GpuJob) -> GpuJob:
    """VAE-decode the job's video (or each candidate) and store it losslessly (stage row 'decode',
    artifact kind 'frames')."""
    decoded = run_stage(job, "decode", lambda recorder: decode_job(job, recorder))
    if decoded.active:  # only once its row is closed does the stored video count (lynx.ledger)
        drop_checkpoints(decoded.job_id)
    return decoded
