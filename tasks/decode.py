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


def intermediate_key(job: GpuJob) -> str:
    return f"intermediates/job-{job.job_id}/attempt-{job.spec.attempt}.mkv"


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
    svc = services()
    started = time.monotonic()
    frames = job.model.pipe.decode_latents(job.latents, output_type="np")[0]
    # Model time is the VAE decode only; encoding, upload and the tracking row are orchestration.
    job.timings["decode"] = time.monotonic() - started
    fps = job.model.pipe.default_fps
    started = time.monotonic()
    stream, upscaled = delivery_upscale(frames, svc.settings, fps)
    if upscaled is not None:
        job.timings["upscale"] = time.monotonic() - started  # loading the generator (once per process)
        stream = _timed(stream, job.timings, "upscale")
    with tempfile.TemporaryDirectory(dir=svc.workdir("decode")) as scratch:
        video = write_lossless(
            stream, Path(scratch) / "intermediate.mkv", fps, ffmpeg_binary=svc.settings.ffmpeg_binary
        )
        stored = svc.store.put_file(video.path, key=intermediate_key(job), content_type="video/x-matroska")
    svc.tracker.record_artifact(stored, kind=ArtifactKind.FRAMES, job_id=job.job_id)
    job.intermediate_key = stored.key
    recorder.output_keys.append(stored.key)
    recorder.metrics.update(
        frames=video.frames,
        fps=fps,
        width=video.width,
        height=video.height,
        variant=job.model.variant,
        model_version=job.model.version,
        model_seconds=job.timings.get("sample", 0.0) + job.timings["decode"],
    )
    if upscaled is not None:
        recorder.metrics.update(
            upscaling=upscaled.label,
            upscaled=upscaled.model_dump(mode="json"),
            upscale_seconds=job.timings["upscale"],
        )
    job.latents = None  # only now: a retry after a failed upload decodes them again
    return job


@task(name="decode", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def decode(job: GpuJob) -> GpuJob:
    """VAE-decode one video and store it losslessly (stage row 'decode', artifact kind 'frames')."""
    decoded = run_stage(job, "decode", lambda recorder: decode_job(job, recorder))
    if decoded.active:  # only once its row is closed does the stored video count (lynx.ledger)
        drop_checkpoints(decoded.job_id)
    return decoded
