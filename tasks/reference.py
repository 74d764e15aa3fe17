"""Stage "reference": identity tokens and reference features of the subject's face.

Both depend only on the face (and, for reference features, the seed) and on the weights, not on
the prompt: they are computed once per subject and reused by all of the subject's jobs, in this run
from memory and in later runs from the artifact store (cache keys include the weight fingerprints,
so new weights never reuse old features). The unconditional reference (the DiT's features of a
grey image) is the same for every subject; a worker process computes it once per seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from lynx.db.models import ArtifactKind
from lynx.jobs import GpuJobSpec
from tasks.cache import CachedKind, cache_key, get_or_compute, memory
from tasks.face import load_embedding, load_png
from tasks.model import GpuJob, LoadedModel, ModelHandle, start_job
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import run_stage


def _save(value: Any, path: Path) -> None:
    value.save(path)


def _load_identity(path: Path):
    from lynx_model import IdentityTokens

    return IdentityTokens.load(path)


def _load_reference(path: Path):
    from lynx_model import ReferenceFeatures

    return ReferenceFeatures.load(path)


# Kept on the CPU between uses; moved to the model's device when a job needs them.
IDENTITY_TOKENS = CachedKind(
    "identity_tokens", ArtifactKind.IDENTITY_TOKENS, ".safetensors", _save, _load_identity, memory_items=64
)
REFERENCE_FEATURES = CachedKind(
    "reference_features",
    ArtifactKind.REFERENCE_FEATURES,
    ".safetensors",
    _save,
    _load_reference,
    memory_items=4,
)
# Not stored: the grey-image features are the same for every subject and cheap next to a video.
UNCOND_REFERENCE = "uncond_reference"


def fetch(key: str, load: Any) -> Any:
    """Read one stored input through a private scratch file (biometric inputs leave no copy)."""
    import tempfile

    svc = services()
    with tempfile.TemporaryDirectory(dir=svc.workdir("inputs")) as scratch:
        local = Path(scratch) / Path(key).name
        svc.store.get_file(key, local)
        return load(local)


def identity_tokens(model: LoadedModel, spec: GpuJobSpec):
    face = spec.face
    key = cache_key("identity/1", face.embedding_key, model.adapter_fingerprint)

    def compute():
        embedding = fetch(face.embedding_key, load_embedding)["embedding"]
        return model.pipe.encode_identity(embedding).to(device="cpu")

    return get_or_compute(IDENTITY_TOKENS, key, compute, job_id=spec.job_id).value


def _on_cpu(tensors: list) -> list:
    return [tensor.to("cpu") for tensor in tensors]


def reference_features(model: LoadedModel, spec: GpuJobSpec):
    """The subject's reference features; the grey-image half is computed once per worker process."""
    face, seed = spec.face, spec.settings.seed
    key = cache_key("reference/1", face.ref_crop_key, seed, model.base_fingerprint, model.adapter_fingerprint)

    def compute():
        crop = fetch(face.ref_crop_key, load_png)
        uncond_key = cache_key(
            "uncond-reference/1", model.base_fingerprint, model.adapter_fingerprint, crop.shape[:2], seed
        )
        uncond = memory.get(UNCOND_REFERENCE, uncond_key)
        features = model.pipe.encode_reference(crop, seed, uncond=uncond)
        if uncond is None:
            memory.put(UNCOND_REFERENCE, uncond_key, _on_cpu(features.uncond), limit=4)
        services().tracker.record_compute_event(
            UNCOND_REFERENCE, uncond_key, reused=uncond is not None, job_id=spec.job_id
        )
        features.cond, features.uncond = _on_cpu(features.cond), _on_cpu(features.uncond)
        return features

    return get_or_compute(REFERENCE_FEATURES, key, compute, job_id=spec.job_id).value


def encode_subject(job: GpuJob, recorder: Any) -> GpuJob:
    model = job.model
    job.identity = identity_tokens(model, job.spec)
    if model.variant == "full":
        job.reference = reference_features(model, job.spec)
    recorder.metrics.update(variant=model.variant, reference=job.reference is not None)
    return job


@task(name="reference", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def encode_reference(handle: ModelHandle, spec: GpuJobSpec) -> GpuJob:
    """Identity tokens and (full variant) reference features of the job's subject, once per subject."""
    job = start_job(handle, spec)
    inputs = [spec.face.embedding_key, spec.face.ref_crop_key]
    return run_stage(job, "reference", lambda recorder: encode_subject(job, recorder), inputs=inputs)
