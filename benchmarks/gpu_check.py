"""One prepared GPU check: what Lynx costs per DiT forward at the released 14B shapes, and what the
speed switches buy, in one command that fits in 8 minutes on one H100 80 GB. Nothing is downloaded:
every weight is random, in the released shapes.

    PYTHONPATH=. python benchmarks/gpu_check.py              # on the GPU machine; prints a markdown table
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run    # tiny shapes on the CPU (what the test runs)

What it measures, per forward at 32,760 video tokens (81 frames at 480x832) and 512 text tokens:
time and peak memory of plain Wan and of Wan + Lynx full (identity branch with 16 tokens + 16
registers and reference branch with 256 tokens, in every block) with PyTorch SDPA, flash-attn (when
installed), ``compile_repeated_blocks`` (inductor), batched guidance (the three passes as one
forward of batch 3, reported per pass), FP8 weight storage (layerwise casting) and First Block
Cache (a step whose blocks after the first are skipped).

Only a few 14B blocks fit a quick run, so each configuration runs with ``--blocks`` K1 and K2 blocks
(default 2 and 4) and is extrapolated to 40: t(40) = t(K1) + (t(K2) - t(K1)) / (K2 - K1) x (40 - K1),
i.e. the per-block slope times 40 plus what does not repeat (embeddings, output head). Peak memory is
extrapolated the same way (the weights grow per block, the activations of one block are freed before
the next runs). MFU = analytic FLOPs of the 40-block forward (benchmarks/model.py) / extrapolated
time / 989 TFLOP/s (H100 SXM dense bf16).

Also printed: the activation-memory estimate of ``lynx_model.memory`` beside the measured growth of
the peak from batch 1 to batch 2, and the largest difference between bf16 and fp32 latents after a
short UniPC sampling of the medium benchmark config (4 blocks x 512, 2,304 tokens, Lynx full).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import UniPCMultistepScheduler, WanTransformer3DModel  # noqa: E402
from diffusers.hooks import FirstBlockCacheConfig  # noqa: E402
from model import DiTSize, adapter_flops, forward_flops  # noqa: E402

from lynx_model import AdapterState, LynxAdapter  # noqa: E402
from lynx_model.attention import StackedAdapterState  # noqa: E402
from lynx_model.memory import activation_bytes  # noqa: E402
from lynx_model.pipeline import wan_flow_sigmas  # noqa: E402

H100_BF16_PEAK = 989e12
IDENTITY_TOKENS, REGISTERS, REFERENCE_TOKENS = 16, 16, 256


@dataclass(frozen=True)
class Shape:
    heads: int
    head_dim: int
    ffn: int
    text_dim: int
    text_tokens: int
    latent: tuple[int, int, int]  # frames, height, width of the latent (patch 1x2x2)
    total_blocks: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens(self) -> int:
        frames, height, width = self.latent
        return frames * (height // 2) * (width // 2)


RELEASED = Shape(40, 128, 13824, 4096, 512, (21, 60, 104), 40)
TINY = Shape(2, 32, 160, 64, 32, (3, 8, 8), 40)
MEDIUM = Shape(4, 128, 1376, 4096, 512, (4, 48, 48), 4)  # benchmarks/model.py's medium config


def build(shape: Shape, blocks: int, device, dtype, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = WanTransformer3DModel(
            num_attention_heads=shape.heads,
            attention_head_dim=shape.head_dim,
            in_channels=16,
            out_channels=16,
            text_dim=shape.text_dim,
            freq_dim=256,
            ffn_dim=shape.ffn,
            num_layers=blocks,
        )
        adapter = LynxAdapter(
            "full",
            num_blocks=blocks,
            hidden_dim=shape.width,
            identity_dim=shape.width,
            num_registers=REGISTERS,
        )
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for module, fp32 in ((transformer, keep), (adapter, ())):
        for name, param in module.named_parameters():
            param.data = param.data.to(torch.float32 if any(k in name for k in fp32) else dtype)
    return transformer.eval().requires_grad_(False), adapter.eval().requires_grad_(False)


def inputs(shape: Shape, blocks: int, device, dtype, batch: int = 1, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device, dtype)

    return {
        "hidden_states": randn(batch, 16, *shape.latent),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": randn(batch, shape.text_tokens, shape.text_dim),
    }, AdapterState(
        randn(1, IDENTITY_TOKENS, shape.width),
        [randn(1, REFERENCE_TOKENS, shape.width) for _ in range(blocks)],
    )


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """One transformer of K blocks, timed plain (stock processors) or with the Lynx ones."""

    def __init__(self, shape, blocks, device, dtype, repeats):
        self.shape, self.blocks, self.device, self.dtype, self.repeats = shape, blocks, device, dtype, repeats
        self.transformer, self.adapter = build(shape, blocks, device, dtype)
        self.inputs, self.state = inputs(shape, blocks, device, dtype)

    def _run(self, lynx: bool, inputs=None, state=None, context: str | None = None):
        transformer = self.transformer
        activated = (
            self.adapter.activated(transformer, state or self.state, self.dtype) if lynx else nullcontext()
        )
        cached = transformer.cache_context(context) if context else nullcontext()
        with torch.no_grad(), activated, cached:
            transformer(**(inputs or self.inputs), return_dict=False)

    def measure(self, lynx: bool, **kwargs) -> tuple[float, int | None]:
        """(median seconds per forward, peak bytes incl. weights) after one warm-up forward."""
        if lynx:
            self.adapter.install(self.transformer)
        else:
            LynxAdapter.uninstall(self.transformer)
        self._run(lynx, **kwargs)
        times = []
        for _ in range(self.repeats):
            synchronize(self.device)
            start = time.perf_counter()
            self._run(lynx, **kwargs)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        peak = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._run(lynx, **kwargs)
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        return statistics.median(times), peak

    def batched_guidance(self, lynx: bool) -> tuple[float, int | None]:
        """The three guidance passes as one forward of batch 3; time reported per pass."""
        batch = {k: torch.cat([v] * 3) for k, v in self.inputs.items()}
        state = StackedAdapterState([self.state, self.state, self.state], videos=1)
        seconds, peak = self.measure(lynx, inputs=batch, state=state)
        return seconds / 3, peak

    def cache_hit(self, lynx: bool) -> tuple[float, int | None]:
        """A step First Block Cache serves from its residual: only the first block runs."""
        self.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        try:
            return self.measure(lynx, context="cond")
        finally:
            self.transformer.disable_cache()

    def release(self) -> None:
        del self.transformer, self.adapter
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def extrapolate(shape: Shape, k1: int, v1: float, k2: int, v2: float) -> float:
    return v1 + (v2 - v1) / (k2 - k1) * (shape.total_blocks - k1)


def configurations(device, dtype) -> list[tuple[str, str | None]]:
    """(name, why it is skipped or None)."""
    cuda = device.type == "cuda"
    flash = importlib.util.find_spec("flash_attn") is not None
    half = dtype in (torch.bfloat16, torch.float16)
    return [
        ("SDPA", None),
        ("flash-attn", None if cuda and flash and half else "needs CUDA, half precision and flash-attn"),
        ("batched guidance (per pass)", None),
        ("First Block Cache hit", None),
        ("compiled (compile_repeated_blocks)", None),
        ("FP8 weights (layerwise casting, eager)", None if cuda else "CUDA only"),
    ]


def run_configuration(bench: Bench, name: str, lynx: bool, compile_backend: str):
    transformer = bench.transformer
    if name == "flash-attn":
        transformer.set_attention_backend("flash")
        try:
            return bench.measure(lynx)
        finally:
            transformer.set_attention_backend("native")
    if name.startswith("batched"):
        return bench.batched_guidance(lynx)
    if name.startswith("First Block"):
        return bench.cache_hit(lynx)
    if name.startswith("compiled"):
        transformer.compile_repeated_blocks(fullgraph=True, backend=compile_backend)
        return bench.measure(lynx)
    if name.startswith("FP8"):
        if not lynx:  # the first of the two rows: cast once, the adapter layers too
            bench.adapter.install(transformer)
            transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=bench.dtype)
        return bench.measure(lynx)
    return bench.measure(lynx)


def measure_all(shape: Shape, blocks: tuple[int, int], device, dtype, repeats, compile_backend):
    results: dict[tuple[str, bool], dict[int, tuple[float, int | None]]] = {}
    skipped = {name: why for name, why in configurations(device, dtype) if why}
    for k in blocks:
        bench = None
        for name, why in configurations(device, dtype):
            if why:
                continue
            # compile and FP8 change the model for good: each gets a fresh one
            if bench is None or name.startswith(("compiled", "FP8")):
                if bench is not None:
                    bench.release()
                    torch._dynamo.reset()
                bench = Bench(shape, k, device, dtype, repeats)
            for lynx in (False, True):
                results.setdefault((name, lynx), {})[k] = run_configuration(
                    bench, name, lynx, compile_backend
                )
                print(f"  measured {name}, {'Lynx' if lynx else 'plain'}, {k} blocks", file=sys.stderr)
        bench.release()
        torch._dynamo.reset()
    return results, skipped


def activation_check(shape: Shape, device, dtype, repeats: int) -> tuple[int, int | None]:
    """(estimated, measured) growth of the peak from one video to two, plain forward, 2 blocks."""
    config = type("Config", (), {})()
    config.num_attention_heads, config.attention_head_dim = shape.heads, shape.head_dim
    config.ffn_dim, config.num_layers, config.patch_size = shape.ffn, 2, (1, 2, 2)
    estimate = activation_bytes(config, shape.tokens, text_tokens=shape.text_tokens, dtype=dtype)
    if device.type != "cuda":
        return estimate, None
    bench = Bench(shape, 2, device, dtype, repeats=1)
    peaks = []
    for batch in (1, 2):
        batch_inputs, _ = inputs(shape, 2, device, dtype, batch=batch)
        peaks.append(bench.measure(False, inputs=batch_inputs)[1])
    bench.release()
    return estimate, peaks[1] - peaks[0]


def precision_check(device, steps: int, shape: Shape = MEDIUM) -> tuple[float, float]:
    """Largest |bf16 - fp32| of the latents after ``steps`` UniPC steps of three-pass Lynx guidance,
    and the largest |latent| for scale."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        transformer, adapter = build(shape, shape.total_blocks, device, dtype, seed=3)
        adapter.install(transformer)
        batch, cond = inputs(shape, shape.total_blocks, device, dtype, seed=4)
        _, uncond = inputs(shape, shape.total_blocks, device, dtype, seed=5)
        negative = inputs(shape, shape.total_blocks, device, dtype, seed=6)[0]["encoder_hidden_states"]
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        scheduler.set_timesteps(steps, device=device, sigmas=wan_flow_sigmas(steps))
        latents = torch.randn(1, 16, *shape.latent, generator=torch.Generator().manual_seed(7)).to(device)
        text = batch["encoder_hidden_states"]
        for t in scheduler.timesteps:
            preds = []
            for words, state in ((text, cond), (negative, uncond), (negative, cond)):
                with torch.no_grad(), adapter.activated(transformer, state, dtype):
                    preds.append(
                        transformer(
                            hidden_states=latents.to(dtype),
                            timestep=t.expand(1),
                            encoder_hidden_states=words,
                            return_dict=False,
                        )[0].float()
                    )
            e_c, e_u, e_i = preds
            noise = e_u + 2.0 * (e_i - e_u) + 5.0 * (e_c - e_i)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        results[dtype] = latents.float().cpu()
        del transformer, adapter
    diff = (results[torch.bfloat16] - results[torch.float32]).abs().max().item()
    return diff, results[torch.float32].abs().max().item()


def print_table(shape, blocks, results, skipped, dtype, device) -> None:
    size = DiTSize(layers=shape.total_blocks, width=shape.width, ffn=shape.ffn, text_dim=shape.text_dim)
    flops = forward_flops(size, shape.tokens, shape.text_tokens)
    plain_flops = flops["linear"] + flops["attention"]
    extra = adapter_flops(size, shape.tokens, "full", shape.width, REGISTERS)["per_step"]
    k1, k2 = blocks
    print(
        f"\n## GPU check: {shape.total_blocks} blocks x {shape.width} wide (ffn {shape.ffn}), "
        f"{shape.tokens:,} video + {shape.text_tokens} text tokens, {str(dtype).replace('torch.', '')}, "
        f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}; measured with {k1} and {k2} blocks, "
        f"extrapolated to {shape.total_blocks}\n"
    )
    print(
        "| configuration | plain forward | Lynx forward | Lynx / plain | plain peak | Lynx peak | Lynx MFU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for name, _ in configurations(device, dtype):
        if name in skipped:
            print(f"| {name} | n/a ({skipped[name]}) | | | | | |")
            continue
        row = {}
        for lynx in (False, True):
            (t1, m1), (t2, m2) = results[(name, lynx)][k1], results[(name, lynx)][k2]
            seconds = extrapolate(shape, k1, t1, k2, t2)
            memory = extrapolate(shape, k1, m1, k2, m2) if m1 is not None else None
            row[lynx] = (seconds, memory)
        baseline = baseline or row[False][0]
        mfu = (plain_flops + extra) / row[True][0] / H100_BF16_PEAK

        def gib(value):
            return f"{value / 2**30:,.1f} GiB" if value is not None else "n/a (CPU)"

        print(
            f"| {name} | {row[False][0]:,.3f} s | {row[True][0]:,.3f} s | {row[True][0] / row[False][0]:.3f} "
            f"| {gib(row[False][1])} | {gib(row[True][1])} | {100 * mfu:.1f} % |"
        )
    print(
        f"\nFLOPs per 40-block forward: plain {plain_flops / 1e12:,.0f} TFLOP, "
        f"Lynx +{extra / 1e12:,.1f} TFLOP. "
        "MFU counts them against the H100's 989 TFLOP/s dense bf16 peak (not meaningful on a CPU). "
        "First Block Cache hit: the time of a step whose later blocks are served from the cache; "
        "batched guidance: one third of a batch-3 forward."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script runs"
    )
    parser.add_argument(
        "--blocks", type=int, nargs=2, default=None, help="K1 K2 >= 2 (default 2 4; dry run 2 3)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forwards per row (default 5; dry run 1)"
    )
    parser.add_argument("--precision-steps", type=int, default=None, help="UniPC steps (default 10; dry 2)")
    args = parser.parse_args()
    if args.dry_run:
        device, dtype, shape, compile_backend = torch.device("cpu"), torch.float32, TINY, "eager"
        blocks, repeats, steps = tuple(args.blocks or (2, 3)), args.repeats or 1, args.precision_steps or 2
        precision_shape = replace(TINY, total_blocks=2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here (use --dry-run to check the script on a CPU)")
        device, dtype, shape, compile_backend = torch.device("cuda"), torch.bfloat16, RELEASED, "inductor"
        blocks, repeats, steps = tuple(args.blocks or (2, 4)), args.repeats or 5, args.precision_steps or 10
        precision_shape = MEDIUM
    started = time.perf_counter()
    results, skipped = measure_all(shape, blocks, device, dtype, repeats, compile_backend)
    print_table(shape, blocks, results, skipped, dtype, device)

    estimate, measured = activation_check(shape, device, dtype, repeats)
    shown = f"{measured / 2**30:,.2f} GiB measured" if measured is not None else "not measured on a CPU"
    print(
        f"\nActivation memory per extra video (lynx_model.memory): {estimate / 2**30:,.2f} GiB "
        f"estimated, {shown}."
    )

    diff, scale = precision_check(device, steps, precision_shape)
    print(
        f"bf16 vs fp32 latents after {steps} UniPC steps of three-pass Lynx guidance "
        f"({precision_shape.total_blocks} blocks x {precision_shape.width}, "
        f"{precision_shape.tokens:,} tokens): "
        f"max |diff| {diff:.3g} (max |latent| {scale:.3g})."
    )
    print(f"\nTotal time: {time.perf_counter() - started:,.0f} s")
    if not math.isfinite(diff):
        raise SystemExit("gpu_check: bf16 latents are not finite")


if __name__ == "__main__":
    main()
