"""What the Lynx adapters cost: per-forward time and peak memory of the Lynx transformer against the
plain Wan transformer (same weights, same inputs, measured side by side in one run), plus analytic
FLOPs per forward and per video for the released 14B configuration.

    PYTHONPATH=. python benchmarks/model.py                 # medium CPU config, 320 and 2304 tokens
    PYTHONPATH=. python benchmarks/model.py --tiny          # ... and whole generations of the tiny models
    PYTHONPATH=. python benchmarks/model.py --speedups      # ... and batched guidance, cache hit, compiled
    PYTHONPATH=. python benchmarks/model.py --device cuda --dtype bfloat16 --layers 40 --width 5120 \\
        --tokens 32760                                       # the real thing, on an 80 GB GPU

The Lynx forward is measured in the steady state of a generation: the identity and reference
keys/values are projected on the first call of a generation and reused by every later step (that
first call is reported separately, after a one-time warm-up of the Lynx path on a throwaway
state). The plain forward runs the same module with diffusers' stock processors put back.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.hooks import FirstBlockCacheConfig  # noqa: E402

from lynx_model import AdapterState, LynxAdapter, StackedAdapterState  # noqa: E402

TEXT_TOKENS = 512
IDENTITY_TOKENS = 16
REFERENCE_TOKENS = 256  # a 256x256 crop: 32x32 latent, 2x2 patches


# ----------------------------------------------------------------------------------------------
# analytic FLOPs (one multiply-add = 2 FLOPs; norms, activations and modulation ignored)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiTSize:
    layers: int = 40
    width: int = 5120
    ffn: int = 13824
    text_dim: int = 4096
    patch_values: int = 16 * 1 * 2 * 2  # latent channels x patch


def forward_flops(size: DiTSize, tokens: int, text_tokens: int = TEXT_TOKENS) -> dict[str, float]:
    d, s, t = size.width, tokens, text_tokens
    linear_per_block = (
        4 * 2 * s * d * d  # attn1 q, k, v, out
        + 2 * 2 * s * d * d  # attn2 q, out
        + 2 * 2 * t * d * d  # attn2 k, v on the text
        + 2 * 2 * s * d * size.ffn  # feed-forward
    )
    attention_per_block = 4 * s * s * d + 4 * s * t * d
    embed = (
        2 * s * size.patch_values * d + 2 * t * (size.text_dim * d + d * d) + 2 * s * d * size.patch_values
    )
    return {"linear": size.layers * linear_per_block + embed, "attention": size.layers * attention_per_block}


def adapter_flops(
    size: DiTSize, tokens: int, variant: str, identity_dim: int, registers: int
) -> dict[str, float]:
    """Extra FLOPs of the adapter branches in one forward; 'once' is spent per conditioning, not per step."""
    d, s = size.width, tokens
    n = IDENTITY_TOKENS + registers
    blocks = size.layers if variant == "full" else math.ceil(size.layers / 2)
    per_step = blocks * 4 * s * n * d
    once = blocks * 2 * 2 * n * identity_dim * d
    if variant == "full":
        per_step += size.layers * 4 * s * REFERENCE_TOKENS * d
        once += size.layers * 2 * 2 * REFERENCE_TOKENS * d * d
    return {"per_step": per_step, "once": once}


def resampler_flops(dim=1280, depth=4, queries=16, output_dim=5120, embed=512, ff_mult=4) -> float:
    per_layer = (
        2 * queries * dim * dim * 2
        + 2 * (1 + queries) * dim * 2 * dim
        + 2 * queries * dim * dim * ff_mult * 2
    )
    return 2 * embed * dim + depth * per_layer + 2 * queries * dim * output_dim


def print_flops() -> None:
    size = DiTSize()
    tokens = 21 * 60 * 104 // 4  # 81 frames 480x832 -> 21 x 60 x 104 latents -> 32,760 tokens
    steps = 50
    base = forward_flops(size, tokens)
    plain = base["linear"] + base["attention"]
    ref_pass = sum(forward_flops(size, REFERENCE_TOKENS).values())
    print(
        f"\n## Analytic FLOPs, Wan2.1-14B ({size.layers} blocks x {size.width}), "
        f"81 frames 480x832 = {tokens:,} tokens"
    )
    print(
        f"plain DiT forward: {plain / 1e12:,.0f} TFLOP ({base['linear'] / 1e12:,.0f} linear + "
        f"{base['attention'] / 1e12:,.0f} attention)"
    )
    rows = []
    for variant, identity_dim, passes in (("full", 5120, 3), ("lite", 2048, 2)):
        extra = adapter_flops(size, tokens, variant, identity_dim, registers=16 if variant == "full" else 0)
        lynx = plain + extra["per_step"]
        once = extra["once"] * 2 + 2 * resampler_flops(output_dim=identity_dim)  # cond + uncond
        if variant == "full":
            once += 2 * ref_pass  # reference features: face and grey
        video = steps * passes * lynx + once
        rows.append((variant, lynx, extra["per_step"] / plain, video, passes))
        print(
            f"{variant}: forward {lynx / 1e12:,.0f} TFLOP "
            f"(+{100 * extra['per_step'] / plain:.2f} % over plain); "
            f"per video ({steps} steps x {passes} passes + once-per-video work {once / 1e12:,.1f} TFLOP): "
            f"{video / 1e15:,.0f} PFLOP = {video / 989e12 / 60:.1f} min at an H100's 989 TFLOP/s bf16 peak"
        )
    wan = steps * 2 * plain
    print(f"plain Wan2.1 with classic guidance: {wan / 1e15:,.0f} PFLOP per video")


# ----------------------------------------------------------------------------------------------
# measured
# ----------------------------------------------------------------------------------------------
def _rss_high_water_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or process RSS high-water on Linux.

    On the CPU this relies on freed tensors going back to the OS, which ``main`` arranges by
    restarting itself with glibc's mmap threshold lowered (MALLOC_MMAP_THRESHOLD_).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _rss_high_water_reset()
            self.start = _memory_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = _memory_kib("VmHWM") * 1024 - self.start


def _place(module, device, dtype, keep_fp32=()):
    # parameter by parameter, so that the layers diffusers keeps in fp32 stay fp32 (and rope stays fp64)
    for name, param in module.named_parameters():
        param.data = param.data.to(dtype=torch.float32 if any(k in name for k in keep_fp32) else dtype)
    return module.to(device).eval()


def build(args, device, dtype):
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        num_attention_heads=args.width // 128,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=args.ffn or int(args.width * 2.7) // 8 * 8,
        num_layers=args.layers,
    )
    transformer = _place(transformer, device, dtype, WanTransformer3DModel._keep_in_fp32_modules)
    adapter = LynxAdapter(
        "full", num_blocks=args.layers, hidden_dim=args.width, identity_dim=args.width, num_registers=16
    )
    return transformer, _place(adapter, device, dtype)


def measure(args) -> None:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    transformer, adapters = build(args, device, dtype)
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(1, TEXT_TOKENS, 4096, generator=generator).to(device, dtype)
    identity = torch.randn(1, IDENTITY_TOKENS, args.width, generator=generator).to(device, dtype)
    reference = [
        torch.randn(1, REFERENCE_TOKENS, args.width, generator=generator).to(device, dtype)
        for _ in range(args.layers)
    ]
    timestep = torch.tensor([500.0], device=device)

    print(
        f"\n## Measured: {args.layers} blocks x {args.width} wide, {args.dtype}, {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(
        "| tokens | plain forward | Lynx forward | time ratio | plain peak mem | Lynx peak mem | mem ratio "
        "| first Lynx forward (projects K/V) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        frames, side = _latent_shape(tokens)
        latents = torch.randn(1, 16, frames, side, side, generator=generator).to(device, dtype)
        inputs = {"hidden_states": latents, "timestep": timestep, "encoder_hidden_states": text}
        bench = SideBySide(transformer, adapters, AdapterState(identity, reference), inputs, device)
        bench.forward(lynx=False)
        # one-time warm-up (first use of the Lynx code paths and their kernels) on a throwaway
        # state, so that the "first" column holds only what every generation pays: the projection
        bench.forward(lynx=True, state=AdapterState(identity, reference))
        first = bench.forward(lynx=True)  # a generation's first call also projects the branch keys/values
        times = {False: [], True: []}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for lynx in (False, True):
                times[lynx].append(bench.forward(lynx))
        peaks = {lynx: bench.peak_memory(lynx) for lynx in (False, True)}
        # best of N: the least disturbed run of each (other processes share the CPU)
        plain_t, lynx_t = min(times[False]), min(times[True])
        print(
            f"| {tokens:,} | {plain_t * 1e3:,.0f} ms | {lynx_t * 1e3:,.0f} ms | {lynx_t / plain_t:.3f} "
            f"| {peaks[False] / 2**20:,.0f} MiB | {peaks[True] / 2**20:,.0f} MiB "
            f"| {peaks[True] / max(peaks[False], 1):.3f} | {first * 1e3:,.0f} ms |"
        )


class SideBySide:
    """One transformer, run with diffusers' stock processors (plain) or with the Lynx ones (lynx)."""

    def __init__(self, transformer, adapter: LynxAdapter, state: AdapterState, inputs: dict, device) -> None:
        self.transformer, self.adapter, self.state = transformer, adapter, state
        self.inputs, self.device = inputs, device

    def _processors(self, lynx: bool) -> None:
        if lynx:
            self.adapter.install(self.transformer)
        else:
            LynxAdapter.uninstall(self.transformer)

    def _run(self, lynx: bool, state: AdapterState | None, inputs: dict | None = None, context=None) -> None:
        # the Lynx branch keys/values are projected when a state is first handed over: timed here
        activated = self.adapter.activated(self.transformer, state or self.state) if lynx else nullcontext()
        cached = self.transformer.cache_context(context) if context else nullcontext()
        with torch.no_grad(), activated, cached:
            self.transformer(**(inputs or self.inputs), return_dict=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, lynx: bool, state: AdapterState | None = None, **kwargs) -> float:
        self._processors(lynx)
        start = time.perf_counter()
        self._run(lynx, state, **kwargs)
        return time.perf_counter() - start

    def peak_memory(self, lynx: bool) -> int:
        self._processors(lynx)
        with PeakMemory(self.device) as peak:
            self._run(lynx, None)
        return peak.peak

    def batched_guidance(self) -> float:
        """Lynx, the three guidance passes as one forward of batch 3: seconds per pass."""
        batch = {key: torch.cat([value] * 3) for key, value in self.inputs.items()}
        state = StackedAdapterState([self.state] * 3, videos=1)
        self.forward(True, state, inputs=batch)  # projects the stacked keys/values once
        return self.forward(True, state, inputs=batch) / 3

    def cache_hit(self) -> float:
        """Lynx, a step First Block Cache serves from its residual (only the first block runs)."""
        self.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        try:
            self.forward(True, context="cond")  # fills the cache
            return self.forward(True, context="cond")
        finally:
            self.transformer.disable_cache()


def measure_speedups(args, device, dtype) -> None:
    """Batched guidance, a step cache hit and compiled blocks, side by side with plain and Lynx."""
    transformer, adapter = build(args, device, dtype)
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(1, TEXT_TOKENS, 4096, generator=generator).to(device, dtype)
    identity = torch.randn(1, IDENTITY_TOKENS, args.width, generator=generator).to(device, dtype)
    reference = [
        torch.randn(1, REFERENCE_TOKENS, args.width, generator=generator).to(device, dtype)
        for _ in range(args.layers)
    ]
    timestep = torch.tensor([500.0], device=device)
    print(
        f"\n## Speed switches: {args.layers} blocks x {args.width} wide, {args.dtype}, {device}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats} (compiled: inductor, after compiling)"
    )
    print(
        "| tokens | plain | Lynx | Lynx, batched guidance (per pass) | Lynx, cache hit | Lynx, compiled "
        "| compile time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for tokens in args.tokens:
        frames, side = _latent_shape(tokens)
        latents = torch.randn(1, 16, frames, side, side, generator=generator).to(device, dtype)
        inputs = {"hidden_states": latents, "timestep": timestep, "encoder_hidden_states": text}
        bench = SideBySide(transformer, adapter, AdapterState(identity, reference), inputs, device)
        bench.forward(False), bench.forward(True)
        best = {name: math.inf for name in ("plain", "lynx", "batched", "cached")}
        for _ in range(args.repeats):
            best["plain"] = min(best["plain"], bench.forward(False))
            best["lynx"] = min(best["lynx"], bench.forward(True))
            best["batched"] = min(best["batched"], bench.batched_guidance())
            best["cached"] = min(best["cached"], bench.cache_hit())
        rows.append((tokens, bench, best))
    transformer.compile_repeated_blocks(fullgraph=True)
    for tokens, bench, best in rows:
        start = time.perf_counter()
        bench.forward(True)  # compiles (and recompiles for each new shape)
        compile_time = time.perf_counter() - start
        compiled = min(bench.forward(True) for _ in range(args.repeats))
        lynx = best["lynx"]

        def cell(seconds: float, lynx: float = lynx) -> str:
            return f"{seconds * 1e3:,.0f} ms ({seconds / lynx:.2f})"

        print(
            f"| {tokens:,} | {best['plain'] * 1e3:,.0f} ms | {lynx * 1e3:,.0f} ms | {cell(best['batched'])} "
            f"| {cell(best['cached'])} | {cell(compiled)} | {compile_time:,.0f} s |"
        )
    torch._dynamo.reset()


def measure_tiny(repeats: int) -> None:
    """Wall time of a whole tiny generation (the tiny models the tests and the demo use)."""
    import tempfile

    from lynx_model import LynxPipeline
    from lynx_model.testing import tiny_face_embedding, tiny_reference_image, write_tiny_models

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        paths = write_tiny_models(root, variant="full")
        written = time.perf_counter() - start
        start = time.perf_counter()
        pipe = LynxPipeline.from_pretrained(paths.base, torch_dtype=torch.float32)
        pipe.load_lynx_adapter(paths.full)
        loaded = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        face, crop = tiny_face_embedding(), tiny_reference_image()
        size = {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 4, "seed": 42}
        identity, reference = pipe.encode_identity(face), pipe.encode_reference(crop, seed=42)
        runs = {
            "to latents": lambda: pipe(
                prompt="a woman", face_embeds=face, ref_image=crop, output_type="latent", **size
            ),
            "to decoded frames": lambda: pipe(prompt="a woman", face_embeds=face, ref_image=crop, **size),
            "denoising only": lambda: pipe(
                prompt="a woman", identity=identity, reference=reference, output_type="latent", **size
            ),
        }
        print(
            f"\n## Tiny full model, 9 frames 64x64, 4 steps x 3 passes, 256x256 reference, best of {repeats}"
        )
        print(f"write tiny folders {written:.2f} s, load {loaded:.2f} s")
        for name, run in runs.items():
            run()
            best = min(_timed(run) for _ in range(repeats))
            print(f"{name}: {best:.3f} s")


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _latent_shape(tokens: int) -> tuple[int, int]:
    """(latent frames, latent side) giving ``tokens`` after 1x2x2 patches, as square as possible."""
    for frames in range(1, 200):
        per_frame = tokens / frames
        side = math.isqrt(int(per_frame))
        if per_frame == int(per_frame) and side * side == per_frame and side <= 64:
            return frames, 2 * side
    raise SystemExit(f"pick a token count of the form frames x side^2, not {tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=None, help="default: 2.7 x width, as in Wan2.1-14B")
    parser.add_argument("--tokens", type=int, nargs="+", default=[320, 2304])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--flops-only", action="store_true")
    parser.add_argument(
        "--speedups", action="store_true", help="also time batched guidance, a cache hit and compiled blocks"
    )
    parser.add_argument("--tiny", action="store_true", help="also time whole generations of the tiny models")
    args = parser.parse_args()
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and not args.flops_only:
        # serve large allocations with mmap so that freed tensors leave the RSS (see PeakMemory)
        os.execve(
            sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    print_flops()
    if not args.flops_only:
        measure(args)
    if args.speedups:
        measure_speedups(args, torch.device(args.device), getattr(torch, args.dtype))
    if args.tiny:
        measure_tiny(args.repeats)


if __name__ == "__main__":
    main()
