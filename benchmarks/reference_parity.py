"""Parity of ``LynxPipeline`` with the public Lynx reference implementation (bytedance/lynx).

Writes tiny random weights in the released layout, samples latents with our pipeline (fp32, CPU)
and with the reference (run in its own Python environment, since it pins diffusers 0.33.1 and does
not import on 0.42), from the same weights, prompt, face embedding, reference crop and seed, for
the full and the lite adapter, and reports the largest absolute differences.

The reference needs an environment of its own and a checkout, neither part of this project::

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.13.0
    /work/refenv/bin/pip install diffusers==0.33.1 transformers==4.50.2 accelerate==1.5.2 \\
        safetensors==0.4.5 sentencepiece==0.2.0 numpy==1.26.4 ftfy==6.3.1
    # a checkout of bytedance/lynx in .reference/lynx (the CUDA-only flash_attn call in
    # modules/common/flash_attention.py replaced by per-sequence SDPA; see docs/model.md)

    python benchmarks/reference_parity.py --reference .reference/lynx --python /work/refenv/bin/python

Exit status 1 when any latent differs by more than --tolerance (default 1e-4).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lynx_model import DEFAULT_NEGATIVE_PROMPT, LynxPipeline  # noqa: E402
from lynx_model.testing import (  # noqa: E402
    TinyModelSpec,
    tiny_face_embedding,
    tiny_reference_image,
    write_tiny_models,
)

# The reference hard-codes the released resampler sizes (1280 wide, 4 layers, 20 heads, 16
# queries; tokens of 5120 for full, 2048 for lite), so the tiny adapters keep them; the DiT is tiny.
PARITY_SPEC = TinyModelSpec(
    num_layers=4,
    num_heads=4,
    head_dim=16,
    ffn_dim=128,
    text_dim=64,
    resampler_dim=1280,
    resampler_depth=4,
    resampler_heads=20,
    num_queries=16,
    full_identity_dim=5120,
    lite_identity_dim=2048,
    num_registers=4,
)
DRIVER = Path(__file__).with_name("_reference_driver.py")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", default=os.environ.get("LYNX_REFERENCE_CHECKOUT", ".reference/lynx"))
    parser.add_argument(
        "--python", default=os.environ.get("LYNX_REFERENCE_PYTHON", "/work/refenv/bin/python")
    )
    parser.add_argument("--workdir", default="/tmp/lynx-parity")
    parser.add_argument("--variants", nargs="+", default=["full", "lite"], choices=["full", "lite"])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--num-frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    return parser.parse_args()


def run_ours(variant: str, paths, inputs: dict, args) -> dict[str, np.ndarray]:
    adapter = paths.full if variant == "full" else paths.lite
    pipe = LynxPipeline.from_pretrained(paths.base, torch_dtype=torch.float32)
    pipe.load_lynx_adapter(adapter)
    pipe.set_progress_bar_config(disable=True)
    identity = pipe.encode_identity(inputs["face_embeds"])
    result = {
        "identity_cond": identity.cond.numpy(),
        "identity_uncond": identity.uncond.numpy(),
    }
    reference = None
    if variant == "full":
        reference = pipe.encode_reference(inputs["ref_image"], seed=args.seed)
        result["reference_cond_first"] = reference.cond[0].numpy()
        result["reference_cond_last"] = reference.cond[-1].numpy()
        result["reference_uncond_last"] = reference.uncond[-1].numpy()
    generation = {
        "prompt": "a woman walking in the park at sunset",
        "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
        "identity": identity,
        "reference": reference,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "guidance_scale": 5.0,
        "guidance_scale_id": 2.0,
        "seed": args.seed,
        "output_type": "latent",
    }
    out = pipe(**generation)
    result["latents"] = out.frames.numpy()
    # the same generation with both branches off, to show the size of what parity is measured against
    plain = pipe(**generation, ip_scale=0.0, ref_scale=0.0)
    result["adapter_effect"] = float(np.abs(out.frames.numpy() - plain.frames.numpy()).max())
    return result


def run_reference(variant: str, paths, inputs_file: Path, out_file: Path, args) -> dict[str, np.ndarray]:
    adapter = paths.full if variant == "full" else paths.lite
    command = [
        args.python,
        str(DRIVER),
        "--reference",
        str(Path(args.reference).resolve()),
        "--variant",
        variant,
        "--base",
        str(paths.base),
        "--adapter",
        str(adapter),
        "--inputs",
        str(inputs_file),
        "--out",
        str(out_file),
        "--prompt",
        "a woman walking in the park at sunset",
        "--negative-prompt",
        DEFAULT_NEGATIVE_PROMPT,
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--num-frames",
        str(args.num_frames),
        "--steps",
        str(args.steps),
        "--guidance-scale",
        "5.0",
        "--guidance-scale-i",
        "2.0",
        "--seed",
        str(args.seed),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
        raise SystemExit(f"the reference run for {variant} failed (exit {completed.returncode})")
    return dict(np.load(out_file))


def main() -> int:
    args = parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    workdir = Path(args.workdir)
    paths = write_tiny_models(workdir / "models", variant="both", seed=0, spec=PARITY_SPEC)
    inputs = {"face_embeds": tiny_face_embedding(seed=1), "ref_image": tiny_reference_image(seed=1)}
    inputs_file = workdir / "inputs.npz"
    np.savez(inputs_file, **inputs)

    print(
        f"tiny DiT: {PARITY_SPEC.num_layers} blocks x {PARITY_SPEC.hidden_dim} wide; "
        f"{args.num_frames} frames {args.height}x{args.width}, {args.steps} UniPC steps, "
        f"seed {args.seed}, fp32 CPU"
    )
    worst = 0.0
    for variant in args.variants:
        start = time.perf_counter()
        ours = run_ours(variant, paths, inputs, args)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = run_reference(variant, paths, inputs_file, workdir / f"reference_{variant}.npz", args)
        theirs_s = time.perf_counter() - start
        print(f"\n[{variant}] ours {ours_s:.1f} s, reference {theirs_s:.1f} s (incl. start-up)")
        effect = ours.pop("adapter_effect")
        for key in ours:
            a, b = ours[key], theirs[key]
            if a.shape != b.shape:
                raise SystemExit(f"[{variant}] {key}: shape {a.shape} (ours) vs {b.shape} (reference)")
            diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
            scale = float(np.abs(b).max())
            print(f"  {key:24s} max|diff| = {diff:.3e}   (max|value| = {scale:.3f})")
            if key == "latents":
                worst = max(worst, diff)
        print(f"  (for scale: switching the adapters off moves the latents by up to {effect:.3f})")
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"\nlargest latent difference {worst:.3e} (tolerance {args.tolerance:.0e}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
