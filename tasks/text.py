"""Stage "text": UMT5 embeddings of the prompt and of the negative prompt.

The text encoder (5.7 B parameters at full size) runs once per distinct prompt and once for the
negative prompt that every job of a campaign shares; the embeddings are stored so later GPU runs
reuse them too. Compute events: 'prompt_embeds' per prompt, 'negative_prompt_embeds' per negative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from lynx.db.models import ArtifactKind
from tasks.cache import CachedKind, cache_key, get_or_compute
from tasks.model import GpuJob, LoadedModel
from tasks.policy import retry_on_transient
from tasks.tracking import run_stage


def _save(value: Any, path: Path) -> None:
    from lynx_model import PromptEmbeddings

    PromptEmbeddings(value).save(path)


def _load(path: Path):
    from lynx_model import PromptEmbeddings

    return PromptEmbeddings.load(path).prompt_embeds


PROMPT_EMBEDS = CachedKind("prompt_embeds", ArtifactKind.PROMPT_EMBEDS, ".safetensors", _save, _load, 64)
NEGATIVE_PROMPT_EMBEDS = CachedKind(
    "negative_prompt_embeds", ArtifactKind.PROMPT_EMBEDS, ".safetensors", _save, _load, 8
)


def text_embeddings(model: LoadedModel, kind: CachedKind, text: str, job_id: int):
    """``[1, 512, text_dim]`` embeddings of ``text`` (on the CPU), from the cache when possible."""

    def compute():
        embeds, _ = model.pipe.encode_prompt(text, do_classifier_free_guidance=False)
        return embeds.to("cpu")

    key = cache_key("text/1", text, model.base_fingerprint)
    return get_or_compute(kind, key, compute, job_id=job_id).value


def encode_job_text(job: GpuJob, recorder: Any) -> GpuJob:
    from lynx_model import DEFAULT_NEGATIVE_PROMPT

    settings = job.spec.settings
    negative = DEFAULT_NEGATIVE_PROMPT if settings.negative_prompt is None else settings.negative_prompt
    job.prompt_embeds = text_embeddings(job.model, PROMPT_EMBEDS, job.spec.prompt, job.job_id)
    job.negative_prompt_embeds = text_embeddings(job.model, NEGATIVE_PROMPT_EMBEDS, negative, job.job_id)
    return job


@task(name="text", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def encode_text(job: GpuJob) -> GpuJob:
    """Prompt and negative-prompt embeddings of the job, once per distinct text."""
    return run_stage(job, "text", lambda recorder: encode_job_text(job, recorder))
