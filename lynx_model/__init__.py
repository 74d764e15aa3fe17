"""Lynx on the diffusers Wan2.1 DiT: pure PyTorch + diffusers (no Prefect, database or S3 here).

Public API (imported lazily, so ``import lynx_model.errors`` stays cheap)::

    from lynx_model import LynxPipeline
    pipe = LynxPipeline.from_pretrained(base_model_path, torch_dtype=torch.bfloat16)
    pipe.load_lynx_adapter(adapter_path)          # lynx_full or lynx_lite, as released
    out = pipe(prompt=..., face_embeds=..., ref_image=..., seed=42)
    out.frames
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LynxPipeline": "pipeline",
    "LynxPipelineOutput": "pipeline",
    "DEFAULT_NEGATIVE_PROMPT": "pipeline",
    "REFERENCE_PROMPT": "pipeline",
    "IdentityTokens": "conditioning",
    "ReferenceFeatures": "conditioning",
    "PromptEmbeddings": "conditioning",
    "SamplingCheckpoint": "sampling",
    "LynxResampler": "resampler",
    "LynxIdentityAdapterLayers": "adapters",
    "LynxReferenceAdapterLayers": "adapters",
    "LynxAdapter": "adapters",
    "AdapterSpec": "adapters",
    "load_adapters": "adapters",
    "save_adapters": "adapters",
    "AdapterState": "attention",
    "StackedAdapterState": "attention",
    "StepCache": "step_cache",
    "LynxIdentityAttnProcessor": "attention",
    "LynxReferenceAttnProcessor": "attention",
    "LynxModelError": "errors",
    "WeightsError": "errors",
    "ModelInputError": "errors",
    "CheckpointMismatchError": "errors",
}

__all__ = [
    "AdapterSpec",
    "AdapterState",
    "CheckpointMismatchError",
    "DEFAULT_NEGATIVE_PROMPT",
    "IdentityTokens",
    "LynxAdapter",
    "LynxIdentityAdapterLayers",
    "LynxIdentityAttnProcessor",
    "LynxModelError",
    "LynxPipeline",
    "LynxPipelineOutput",
    "LynxReferenceAdapterLayers",
    "LynxReferenceAttnProcessor",
    "LynxResampler",
    "ModelInputError",
    "PromptEmbeddings",
    "REFERENCE_PROMPT",
    "ReferenceFeatures",
    "SamplingCheckpoint",
    "StackedAdapterState",
    "StepCache",
    "WeightsError",
    "load_adapters",
    "save_adapters",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .adapters import (
        AdapterSpec,
        LynxAdapter,
        LynxIdentityAdapterLayers,
        LynxReferenceAdapterLayers,
        load_adapters,
        save_adapters,
    )
    from .attention import (
        AdapterState,
        LynxIdentityAttnProcessor,
        LynxReferenceAttnProcessor,
        StackedAdapterState,
    )
    from .conditioning import IdentityTokens, PromptEmbeddings, ReferenceFeatures
    from .errors import CheckpointMismatchError, LynxModelError, ModelInputError, WeightsError
    from .pipeline import DEFAULT_NEGATIVE_PROMPT, REFERENCE_PROMPT, LynxPipeline, LynxPipelineOutput
    from .resampler import LynxResampler
    from .sampling import SamplingCheckpoint
    from .step_cache import StepCache
