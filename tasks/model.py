"""The model on a GPU worker, and a job's in-memory state between the GPU stages.

Loading Wan2.1-14B with the Lynx adapters takes minutes, so a GPU flow run loads it once for its
whole batch (``load_model``). A process keeps the one model it loaded last: in the embedded
default, where several batches run in the same process, later batches with the same settings find
it loaded; a worker process that switches variant drops the old model before loading the new one.

Tensors (identity tokens, reference features, text embeddings, latents) live in ``GpuJob`` while
one job passes through the stages of one flow run; only their stored forms leave the process.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NONE

from lynx.errors import ConfigurationError
from lynx.faces.embedders import ARCFACE_IR_SE50_NAME
from lynx.jobs import GpuBatchRequest, GpuJobSpec, Variant
from lynx.model_loading import settings_for_variant
from lynx.settings import LynxSettings
from tasks.services import services
from tasks.tracking import error_text, run_stage

if TYPE_CHECKING:
    import torch

    from lynx_model import IdentityTokens, LynxPipeline, ReferenceFeatures

# The released adapters take 512-d embeddings of this recogniser (LYNX_SPEC section 2).
OFFICIAL_EMBEDDING_MODEL = ARCFACE_IR_SE50_NAME
OFFICIAL_EMBEDDING_DIM = 512


@dataclass(frozen=True)
class LoadedModel:
    pipe: LynxPipeline
    variant: Variant
    base_fingerprint: str | None
    adapter_fingerprint: str | None
    loras: tuple[dict[str, Any], ...] = ()

    @property
    def version(self) -> str:
        """What the deliverables' provenance calls the model: base and adapter weight fingerprints."""
        return f"base {self.base_fingerprint or 'unknown'}, adapter {self.adapter_fingerprint or 'unknown'}"

    @property
    def embedding_dim(self) -> int:
        return int(self.pipe.resampler.config.embedding_dim)


@dataclass(frozen=True)
class ModelHandle:
    """The batch's model, or why it could not be loaded (every job of the batch then fails)."""

    model: LoadedModel | None = None
    error: str | None = None


@dataclass
class GpuJob:
    """One job on its way through the GPU stages of one flow run."""

    spec: GpuJobSpec
    model: LoadedModel | None = None
    identity: IdentityTokens | None = None
    reference: ReferenceFeatures | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    cache_stats: dict[str, Any] | None = None
    intermediate_key: str | None = None
    error_stage: str | None = None
    error_text: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def job_id(self) -> int:
        return self.spec.job_id

    @property
    def active(self) -> bool:
        return self.error_stage is None

    @property
    def videos(self) -> int:
        """Videos the job samples and decodes: its candidates."""
        return self.spec.settings.candidates

    def as_failed(self, stage: str, text: str) -> GpuJob:
        return replace(self, error_stage=stage, error_text=text, latents=None)


_lock = threading.Lock()
_loaded: dict[tuple[Any, ...], LoadedModel] = {}


def _identity(settings: LynxSettings) -> tuple[Any, ...]:
    return (
        settings.resolved_base_model_path,
        settings.resolved_adapter_path,
        settings.model_variant,
        settings.model_dtype,
        settings.device,
        settings.cpu_offload,
        settings.vae_tiling,
        settings.attention_backend,
        tuple(settings.resolved_loras),
        settings.step_cache,
        settings.batched_guidance,
        settings.compile,
        settings.fp8,
    )


def loaded_model(settings: LynxSettings) -> tuple[LoadedModel, bool]:
    """The process's model for ``settings`` (loaded now if needed) and whether it was already loaded."""
    from lynx.model_loading import load_lynx_pipeline

    key = _identity(settings)
    with _lock:
        if key in _loaded:
            return _loaded[key], True
        _loaded.clear()  # one model per process: drop the old one before loading another
        gc.collect()
        pipe = load_lynx_pipeline(settings)
        if pipe.variant is None:
            raise ConfigurationError(
                f"{settings.resolved_adapter_path} holds no Lynx adapters", setting="LYNX_ADAPTER_PATH"
            )
        pipe.set_progress_bar_config(disable=True)  # workers report progress as a Prefect artifact
        loras = tuple(lora.as_record() for lora in pipe.loras)
        _loaded[key] = LoadedModel(pipe, pipe.variant, pipe.base_fingerprint, pipe.adapter_fingerprint, loras)
        return _loaded[key], False


def check_embedding(model: LoadedModel, spec: GpuJobSpec) -> None:
    """Refuse face embeddings the identity adapter cannot take (wrong size, or the wrong recogniser)."""
    face = spec.face
    if face.embedding_dim != model.embedding_dim:
        raise ConfigurationError(
            f"the identity adapter takes {model.embedding_dim}-d face embeddings but the face stage used "
            f"{face.embedding_model!r} ({face.embedding_dim}-d); choose a recogniser with "
            f"{model.embedding_dim}-d output",
            setting="LYNX_EMBEDDING_BACKEND",
        )
    if model.embedding_dim == OFFICIAL_EMBEDDING_DIM and face.embedding_model != OFFICIAL_EMBEDDING_MODEL:
        raise ConfigurationError(
            f"512-d identity adapters (the released Lynx weights) were trained on "
            f"{OFFICIAL_EMBEDDING_MODEL} embeddings, not {face.embedding_model!r}; "
            f"set LYNX_EMBEDDING_BACKEND={OFFICIAL_EMBEDDING_MODEL}",
            setting="LYNX_EMBEDDING_BACKEND",
        )


def load_batch_model(batch: GpuBatchRequest) -> ModelHandle:
    """Load the model of the batch's variant once; a failure is kept to fail every job with it."""
    svc = services()
    started = time.monotonic()
    try:
        model, reused = loaded_model(settings_for_variant(svc.settings, batch.variant))
    except Exception as err:  # missing weights, bad settings: every job of the batch fails with it
        return ModelHandle(error=error_text(err))
    svc.tracker.record_compute_event(
        "model_load",
        model.version,
        reused=reused,
        job_id=batch.jobs[0].job_id,
        duration_s=time.monotonic() - started,
    )
    return ModelHandle(model=model)


@task(name="load-model", cache_policy=NONE, persist_result=False)
def load_model(batch: GpuBatchRequest) -> ModelHandle:
    """Load Wan2.1 + Lynx adapters once for the batch (compute event 'model_load')."""
    return load_batch_model(batch)


def start_job(handle: ModelHandle, spec: GpuJobSpec) -> GpuJob:
    """A job's GPU state; it fails at stage 'model' when the model is missing or cannot take its face."""
    job = GpuJob(spec, model=handle.model)

    def check(recorder: Any) -> GpuJob:
        if handle.model is None:
            raise ConfigurationError(handle.error or "the model could not be loaded")
        check_embedding(handle.model, spec)
        recorder.metrics.update(variant=handle.model.variant, model=handle.model.version)
        return job

    return run_stage(job, "model", check)
