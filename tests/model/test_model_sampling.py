"""Sampling checkpoints: a generation resumed from any checkpoint ends with the uninterrupted one's
latents bit for bit (also after a real SIGKILL), and a checkpoint of another generation is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lynx_model import ModelInputError
from lynx_model.errors import CheckpointMismatchError
from lynx_model.sampling import SamplingCheckpoint, SolverState

from .conftest import NEGATIVE, PROMPT, SIZE, generate

STEPS = 7


def with_checkpoints(pipe, every=2, **kwargs):
    """Latents of an uninterrupted generation and the checkpoints it handed out."""
    saved: list[SamplingCheckpoint] = []
    latents = generate(
        pipe, num_inference_steps=STEPS, checkpoint_callback=saved.append, checkpoint_steps=every, **kwargs
    )
    return latents, saved


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_a_generation_resumed_from_any_checkpoint_ends_bit_for_bit_like_the_uninterrupted_one(
    variant, full_pipe, lite_pipe, face, ref_image, tmp_path
):
    pipe = full_pipe if variant == "full" else lite_pipe
    ref = ref_image if variant == "full" else None
    uninterrupted = generate(pipe, face, ref, num_inference_steps=STEPS)
    latents, saved = with_checkpoints(pipe, face=face, ref_image=ref)
    # handing out checkpoints changes nothing; they come every 2 steps and after the last one
    assert torch.equal(latents, uninterrupted)
    assert [c.steps_done for c in saved] == [2, 4, 6, 7] and saved[-1].finished
    for checkpoint in saved:
        loaded = SamplingCheckpoint.load(checkpoint.save(tmp_path / f"step-{checkpoint.steps_done}.st"))
        steps_run: list[int] = []
        resumed = generate(
            pipe,
            face,
            ref,
            num_inference_steps=STEPS,
            resume_from=loaded,
            progress_callback=lambda i, n, t, seen=steps_run: seen.append(i),
        )
        assert torch.equal(resumed, uninterrupted), f"resumed at step {checkpoint.steps_done}"
        assert steps_run == list(range(checkpoint.steps_done, STEPS))


def test_a_generation_of_several_seeds_resumes_bit_for_bit(full_pipe, face, ref_image, tmp_path):
    seeds = [5, 11]
    uninterrupted, saved = with_checkpoints(full_pipe, face=face, ref_image=ref_image, seed=seeds)
    assert uninterrupted.shape[0] == 2
    loaded = SamplingCheckpoint.load(saved[1].save(tmp_path / "seeds.safetensors"))
    assert loaded.seed == seeds
    resumed = generate(full_pipe, face, ref_image, num_inference_steps=STEPS, seed=seeds, resume_from=loaded)
    assert torch.equal(resumed, uninterrupted)
    with pytest.raises(CheckpointMismatchError, match=r"made with seed \[5, 11\], this call uses \[5, 12\]"):
        generate(full_pipe, face, ref_image, num_inference_steps=STEPS, seed=[5, 12], resume_from=loaded)


def test_the_solver_memory_is_what_makes_the_resume_exact(full_pipe, face, ref_image):
    """Control: the same checkpoint without UniPC's history (as a resume that kept only the latents)
    ends elsewhere, so the bit-for-bit comparison above can fail."""
    uninterrupted, saved = with_checkpoints(full_pipe, face=face, ref_image=ref_image)
    checkpoint = saved[1]
    order = len(checkpoint.solver.model_outputs)
    checkpoint.solver = SolverState([None] * order, [None] * order, 0, None, None)
    forgetful = generate(full_pipe, face, ref_image, num_inference_steps=STEPS, resume_from=checkpoint)
    assert not torch.equal(forgetful, uninterrupted)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"seed": 8}, "made with seed 7, this call uses 8"),
        ({"num_inference_steps": 8}, "of a 7-step schedule, this generation runs 8 steps"),
        (
            {"guidance_scale": 4.0},
            "made with guidance=[5.0, 2.0, 1.0, 1.0], this call has [4.0, 2.0, 1.0, 1.0]",
        ),
        (
            {"prompt": "a man reading"},
            "made from other prompt, negative prompt, identity or reference inputs",
        ),
        ({"height": 48}, "latents of shape [1, 16, 2, 4, 6], this generation [1, 16, 2, 6, 6]"),
    ],
)
def test_a_checkpoint_of_another_generation_is_refused_before_any_step(
    full_pipe, face, ref_image, change, message
):
    _, saved = with_checkpoints(full_pipe, face=face, ref_image=ref_image)
    steps_run = []
    args = {"num_inference_steps": STEPS, "resume_from": saved[0], **change}
    with pytest.raises(CheckpointMismatchError) as raised:
        generate(full_pipe, face, ref_image, progress_callback=lambda *a: steps_run.append(a), **args)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not steps_run


def test_a_checkpoint_of_another_scheduler_setting_is_refused(full_pipe, face, ref_image):
    _, saved = with_checkpoints(full_pipe, face=face, ref_image=ref_image)
    config = dict(full_pipe.scheduler.config)
    full_pipe.scheduler.register_to_config(flow_shift=5.0)
    try:
        with pytest.raises(CheckpointMismatchError, match="made with scheduler="):
            generate(full_pipe, face, ref_image, num_inference_steps=STEPS, resume_from=saved[0])
    finally:
        full_pipe.scheduler.register_to_config(flow_shift=config["flow_shift"])


def test_files_that_are_not_checkpoints_are_refused_naming_the_file(full_pipe, face, tmp_path):
    _, saved = with_checkpoints(full_pipe, face=face)
    path = saved[0].save(tmp_path / "checkpoint.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    identity = full_pipe.encode_identity(face).save(tmp_path / "identity.safetensors")
    for bad, message in [
        (truncated, "is not a readable sampling checkpoint"),
        (identity, "holds identity_tokens, not sampling_checkpoint"),
        (tmp_path / "missing.safetensors", "sampling checkpoint not found"),
    ]:
        with pytest.raises(ModelInputError, match=message) as raised:
            SamplingCheckpoint.load(bad)
        assert str(bad) in str(raised.value)


def test_checkpoint_steps_must_be_positive_with_a_callback(full_pipe, face):
    with pytest.raises(ModelInputError, match="checkpoint_steps must be at least 1"):
        generate(full_pipe, face, checkpoint_callback=lambda checkpoint: None)


CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch

    from lynx_model import LynxPipeline
    from lynx_model.testing import tiny_face_embedding, tiny_reference_image

    base, adapter, out, block_at, args = sys.argv[1:6]
    pipe = LynxPipeline.from_pretrained(base, torch_dtype=torch.float32)
    pipe.load_lynx_adapter(adapter)
    pipe.set_progress_bar_config(disable=True)

    def store(checkpoint):  # written whole, then renamed into place
        partial = Path(out) / f".step-{checkpoint.steps_done}.partial"
        checkpoint.save(partial)
        os.replace(partial, Path(out) / f"step-{checkpoint.steps_done}.safetensors")

    def progress(index, total, timestep):
        if index + 1 == int(block_at):
            sys.stdin.read()  # the parent never writes: it kills this process while it waits here

    pipe(
        face_embeds=tiny_face_embedding(seed=3),
        ref_image=tiny_reference_image(seed=3, size=64),
        checkpoint_callback=store,
        checkpoint_steps=2,
        progress_callback=progress,
        **json.loads(args),
    )
    (Path(out) / "finished").touch()
    """
)


def test_a_generation_killed_with_sigkill_mid_sampling_resumes_bit_exactly(
    tiny_models, full_pipe, face, ref_image, tmp_path
):
    args = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        seed=7,
        output_type="latent",
        **SIZE,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-c", CHILD, str(tiny_models.base), str(tiny_models.full), str(tmp_path), "5"]
    child = subprocess.Popen([*command, json.dumps(args)], stdin=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "step-4.safetensors").exists():
            assert child.poll() is None, f"the sampling process ended early ({child.returncode})"
            assert time.monotonic() < deadline, "no checkpoint of step 4 within 180 s"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # in step 5 of 7, checkpoints of steps 2 and 4 stored
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "finished").exists()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2.safetensors", "step-4.safetensors"]

    resumed = generate(
        full_pipe,
        face,
        ref_image,
        num_inference_steps=STEPS,
        resume_from=SamplingCheckpoint.load(tmp_path / "step-4.safetensors"),
    )
    uninterrupted = generate(full_pipe, face, ref_image, num_inference_steps=STEPS)
    assert torch.equal(resumed, uninterrupted)
