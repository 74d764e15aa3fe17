"""torch.compile of the DiT's repeated blocks with the Lynx processors installed."""

from __future__ import annotations

import pytest
import torch

from .conftest import generate, load


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _generations(pipe, face, ref_image, seed=7):
    """One video with the guidance passes one after another, and with them batched."""
    return [
        generate(pipe, face, ref_image, num_inference_steps=2, seed=seed, batched_guidance=batched)
        for batched in (False, True)
    ]


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_compiled_blocks_have_no_graph_break_and_no_recompile_between_generations(
    variant, tiny_models, face, ref_image, fresh_dynamo
):
    pipe = load(tiny_models.base, tiny_models.full if variant == "full" else tiny_models.lite)
    ref_image = ref_image if variant == "full" else None
    eager = _generations(pipe, face, ref_image)
    # fullgraph: a graph break is an error. The "eager" backend traces with Dynamo exactly as
    # inductor would, without spending minutes compiling kernels on a CPU.
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    first = _generations(pipe, face, ref_image)  # traces: one and three passes, two batch sizes
    for compiled, reference in zip(first, eager, strict=True):
        torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-5)
    # a new generation (new seed, new identity tokens, new branch keys and values) reuses the graphs
    other_face = torch.randn(512, generator=torch.Generator().manual_seed(5))
    with torch.compiler.set_stance("fail_on_recompile"):
        again = _generations(pipe, other_face, ref_image, seed=8)
    assert (again[0] - first[0]).abs().max() > 1e-3


@pytest.mark.slow
def test_inductor_compiled_blocks_give_the_same_video(tiny_models, face, ref_image, fresh_dynamo):
    pipe = load(tiny_models.base, tiny_models.full)
    eager = generate(pipe, face, ref_image, num_inference_steps=2)
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    compiled = generate(pipe, face, ref_image, num_inference_steps=2)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
