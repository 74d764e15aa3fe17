"""Runs the public Lynx reference implementation (bytedance/lynx) on given weights and inputs.

Started by ``benchmarks/reference_parity.py`` with the Python of a separate environment that has
the reference's pins (diffusers 0.33.1, transformers 4.50.2), with ``--reference`` pointing at a
checkout of the reference. It imports nothing from this project. Its steps mirror the reference's
``LynxWanInfer`` / ``LynxLiteWanInfer`` (``load_pipeline_and_models`` then ``generate_t2v``) with
``output_type="latent"``, minus face detection (the embedding and the aligned crop are inputs) and
the NSFW checks. Deviations, all forced by running tiny fp32 weights on a CPU:

- full: ``init_ref_adapter_modules`` is called with ``dtype=torch.float32``; the reference's
  loader omits the argument, which leaves the reference layers in bf16 and fails in fp32;
- lite: ``init_image_proj_modules`` hard-codes ``hidden_size=5120`` for the identity layers; the
  driver repeats its lines with the DiT's own width (the resampler sizes stay as published).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", required=True, help="checkout of bytedance/lynx")
    parser.add_argument("--variant", choices=["full", "lite"], required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--inputs", required=True, help="npz with face_embeds, ref_image")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--num-frames", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance-scale", type=float, required=True)
    parser.add_argument("--guidance-scale-i", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    return parser.parse_args()


def lite_init_image_proj_modules(pipe, model_dir, device, dtype):
    """The reference's LynxLiteWanPipeline.init_image_proj_modules with the DiT's width instead of 5120."""
    from modules.common.resampler import Resampler
    from modules.lite.attention_processor import register_ip_adapter_wan
    from safetensors.torch import load_file

    pipe.resampler = Resampler(
        depth=4,
        dim=1280,
        dim_head=64,
        embedding_dim=512,
        ff_mult=4,
        heads=20,
        num_queries=16,
        output_dim=2048,
    )
    pipe.resampler.to(device=device, dtype=dtype)
    pipe.resampler.eval()
    pipe.resampler.load_state_dict(load_file(os.path.join(model_dir, "resampler.safetensors"), device="cpu"))
    state_dicts = load_file(os.path.join(model_dir, "ip_layers.safetensors"), device="cpu")
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    pipe.transformer, ip_layers = register_ip_adapter_wan(
        pipe.transformer, cross_attention_dim=2048, hidden_size=width, layers=2, dtype=dtype
    )
    ip_layers.load_state_dict(state_dicts)


def load_reference_pipeline(pipeline_cls, base: str, dtype):
    """The reference's load_pipeline_and_models, up to the adapters (LynxWanInfer / LynxLiteWanInfer)."""
    from diffusers import UniPCMultistepScheduler

    pipe = pipeline_cls.from_pretrained(base, torch_dtype=dtype)
    pipe.scheduler = UniPCMultistepScheduler.from_pretrained(base, subfolder="scheduler", torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    args = parse_args()
    sys.path.insert(0, args.reference)
    from PIL import Image

    inputs = np.load(args.inputs)
    face = inputs["face_embeds"].astype(np.float32)
    dtype, device = torch.float32, "cpu"
    result: dict[str, np.ndarray] = {}
    generation = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "num_frames": args.num_frames,
        "guidance_scale": args.guidance_scale,
        "generator": torch.Generator().manual_seed(args.seed),
        "output_type": "latent",
    }

    if args.variant == "full":
        from modules.full.lynx_pipeline import LynxWanPipeline

        pipe = load_reference_pipeline(LynxWanPipeline, args.base, dtype)
        pipe.init_image_proj_modules(args.adapter, device=device, dtype=dtype)
        pipe.init_ref_adapter_modules(args.adapter, dtype=dtype)
        pipe.to(device)

        # LynxWanInfer.generate_t2v
        arcface_embed = torch.from_numpy(face).to(device=pipe.device, dtype=pipe.dtype)[None, None, :]
        with torch.no_grad():
            ip_cond = pipe.resampler(arcface_embed)
            ip_uncond = pipe.resampler(arcface_embed * 0)
            aligned = Image.fromarray(inputs["ref_image"])
            ref_generator = torch.Generator().manual_seed(args.seed + 1)
            ref_buffer = pipe.encode_reference_images([aligned], generator=ref_generator)
            ref_generator = torch.Generator().manual_seed(args.seed + 1)
            ref_buffer_uncond = pipe.encode_reference_images([aligned], drop=True, generator=ref_generator)
        latents = pipe(
            **generation,
            guidance_scale_i=args.guidance_scale_i,
            attention_kwargs={
                "ip_hidden_states": [ip_cond],
                "ip_scale": 1.0,
                "ref_buffer": ref_buffer,
                "ref_scale": 1.0,
            },
            attention_kwargs_uncond={
                "ip_hidden_states": [ip_uncond],
                "ip_scale": 1.0,
                "ref_buffer": ref_buffer_uncond,
                "ref_scale": 1.0,
            },
        ).frames
        result["identity_cond"] = ip_cond.numpy()
        result["identity_uncond"] = ip_uncond.numpy()
        n = len(pipe.transformer.blocks)
        result["reference_cond_first"] = ref_buffer["blocks.0.attn1.processor"][0].numpy()
        result["reference_cond_last"] = ref_buffer[f"blocks.{n - 1}.attn1.processor"][0].numpy()
        result["reference_uncond_last"] = ref_buffer_uncond[f"blocks.{n - 1}.attn1.processor"][0].numpy()
    else:
        from modules.lite.lynx_lite_pipeline import LynxLiteWanPipeline

        pipe = load_reference_pipeline(LynxLiteWanPipeline, args.base, dtype)
        lite_init_image_proj_modules(pipe, args.adapter, device, dtype)
        pipe.to(device)
        with torch.no_grad():
            tokens = pipe.encode_face_embedding(face, True, device=device, dtype=dtype)
        result["identity_uncond"], result["identity_cond"] = tokens[:1].numpy(), tokens[1:].numpy()
        latents = pipe(**generation, face_embeds=face, ip_scale=1.0).frames
        # the reference samples a batch of [uncond, cond] copies that stay identical; keep one
        if not torch.equal(latents[0], latents[1]):
            raise SystemExit("reference lite: the two latent copies diverged")
        latents = latents[:1]

    result["latents"] = latents.float().numpy()
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
