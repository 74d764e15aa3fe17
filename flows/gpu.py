"""Flow ``lynx-gpu``: the GPU stages of a batch of jobs, with the model loaded once.

Deployed on the GPU work pool as ``lynx-gpu/gpu-stages``; the ``lynx`` and ``lynx-campaign`` flows
start it with ``run_deployment`` (or call it in-process in the embedded default). A process
worker starts a fresh process per flow run and loading the 14B model takes minutes, so one run
takes a whole batch: the load is paid once and GPU time goes to sampling. A job that fails here
fails alone; the others of the batch go on.
"""

from __future__ import annotations

from prefect import flow

from lynx.jobs import GpuBatchRequest
from tasks.decode import decode
from tasks.model import load_model
from tasks.policy import configured
from tasks.reference import encode_reference
from tasks.sample import sample
from tasks.text import encode_text
from tasks.tracking import cancel_flow_run_jobs


@flow(name="lynx-gpu", on_cancellation=[cancel_flow_run_jobs], log_prints=True)
def lynx_gpu(batch: GpuBatchRequest) -> list[int]:
    """Reference -> text -> sample -> decode for every job of the batch; returns the job ids.

    Results are read back from the tracking database by the caller (the decode stage's row holds
    the key of each job's lossless video), so nothing needs to be persisted as a flow result.
    """
    # Step 1: load Wan2.1 + the Lynx adapters once for the whole batch
    model = configured(load_model, "model")(batch)
    for spec in batch.jobs:
        # Step 2: identity tokens + reference features (once per subject, then from the cache)
        job = configured(encode_reference, "reference")(model, spec)
        # Step 3: prompt embeddings (once per distinct prompt; the negative prompt once)
        job = configured(encode_text, "text")(job)
        # Step 4: denoise (each candidate), with a progress artifact that moves with the steps
        videos = spec.settings.candidates
        job = configured(sample, "sample", videos=videos)(job)
        # Step 5: decode to frames and store them as a lossless intermediate video (per candidate)
        configured(decode, "decode", videos=videos)(job)
    return batch.job_ids
