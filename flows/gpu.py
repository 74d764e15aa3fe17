"""Flow ``lynx-gpu``: the GPU stages of a batch of jobs, with the model loaded once.

Deployed on the GPU work pool as ``lynx-gpu/gpu-stages``; the ``lynx`` and ``lynx-campaign`` flows
start it with ``run_deployment`` (or call it in-process in the embedded default). A process
worker starts a fresh process per flow run and loading the 14B model takes minutes, so one run
takes a whole batch: the load is paid once and GPU time goes to sampling. A job that fails here
fails alone; the others of the batch go on. A stage past its timeout fails its job naming the
setting. When the run (or the run that started it) is being cancelled, sampling stops at the next
step, its jobs end cancelled and so does the run.
"""

from __future__ import annotations

from prefect import flow
from prefect.states import Cancelled

from lynx.jobs import GpuBatchRequest
from tasks.decode import decode
from tasks.model import GpuJob, ModelHandle, load_model
from tasks.reference import encode_reference
from tasks.sample import sample
from tasks.text import encode_text
from tasks.tracking import ENDED_HOOKS, RunCancelling, cancel_flow_run_jobs, mark_cancelled, stage_call


@flow(name="lynx-gpu", on_cancellation=[cancel_flow_run_jobs], **ENDED_HOOKS, log_prints=True)
def lynx_gpu(batch: GpuBatchRequest) -> list[int]:
    """Reference -> text -> sample -> decode for every job of the batch; returns the job ids.

    Results are read back from the tracking database by the caller (the decode stage's row holds
    the key of each job's lossless video), so nothing needs to be persisted as a flow result.
    """
    # Step 1: load Wan2.1 + the Lynx adapters once for the whole batch
    model = stage_call(load_model, "model", batch, on_timeout=lambda text: ModelHandle(error=text))
    try:
        for spec in batch.jobs:
            # Step 2: identity tokens + reference features (once per subject, then from the cache)
            job = stage_call(encode_reference, "reference", model, spec, ticket=GpuJob(spec, model.model))
            # Step 3: prompt embeddings (once per distinct prompt; the negative prompt once)
            job = stage_call(encode_text, "text", job)
            # Step 4: denoise (each candidate), with a progress artifact that moves with the steps;
            # it stops at the next step when this run is being cancelled
            videos = spec.settings.candidates
            job = stage_call(sample, "sample", job, videos=videos)
            # Step 5: decode to frames and store them as a lossless intermediate video (per candidate)
            stage_call(decode, "decode", job, videos=videos)
    except RunCancelling as err:  # the rest of the batch is cancelled with it
        mark_cancelled(batch.job_ids)
        return Cancelled(message=str(err))
    return batch.job_ids
