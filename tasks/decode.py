"""Stage "decode": latents -> frames -> the lossless intermediate video in the artifact store.

The intermediate (FFV1 in Matroska, bit-exact RGB) is what the CPU side delivers from; its key,
frame count and rate are recorded on the stage row, which is how the calling flow finds them
(nothing but keys crosses from a GPU flow run to its caller).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from lynx.db.models import ArtifactKind
from lynx.media.intermediate import write_lossless
from tasks.model import GpuJob
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import run_stage


def intermediate_key(job: GpuJob) -> str:
    return f"intermediates/job-{job.job_id}/attempt-{job.spec.attempt}.mkv"


def decode_job(job: GpuJob, recorder: Any) -> GpuJob:
    svc = services()
    started = time.monotonic()
    frames = job.model.pipe.decode_latents(job.latents, output_type="np")[0]
    # Model time is the VAE decode only; encoding, upload and the tracking row are orchestration.
    job.timings["decode"] = time.monotonic() - started
    fps = job.model.pipe.default_fps
    with tempfile.TemporaryDirectory(dir=svc.workdir("decode")) as scratch:
        video = write_lossless(
            frames, Path(scratch) / "intermediate.mkv", fps, ffmpeg_binary=svc.settings.ffmpeg_binary
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
    job.latents = None  # only now: a retry after a failed upload decodes them again
    return job


@task(name="decode", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def decode(job: GpuJob) -> GpuJob:
    """VAE-decode one video and store it losslessly (stage row 'decode', artifact kind 'frames')."""
    return run_stage(job, "decode", lambda recorder: decode_job(job, recorder))
