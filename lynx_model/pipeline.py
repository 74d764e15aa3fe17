"""``LynxPipeline``: identity-preserving text-to-video with Lynx adapters on a Wan2.1 DiT.

The pipeline is a diffusers ``DiffusionPipeline`` over the stock Wan components (tokenizer, UMT5
text encoder, Wan VAE, ``WanTransformer3DModel``, UniPC scheduler); a Lynx adapter adds two
components, the ``resampler`` and the ``lynx_adapter`` whose attention processors carry the
identity and reference branches (``lynx_model.attention``). Loading follows diffusers' adapter
convention (``load_ip_adapter`` / ``unload_ip_adapter``), and Wan LoRAs load through diffusers'
``WanLoraLoaderMixin``:

    pipe = LynxPipeline.from_pretrained(base_dir, torch_dtype=torch.bfloat16)
    pipe.load_lynx_adapter(adapter_dir)                        # lynx_full or lynx_lite, as released
    out = pipe(prompt="a woman walks on the beach", face_embeds=embedding, ref_image=crop, seed=42)
    pipe.save_pretrained(out_dir)                              # LynxPipeline.from_pretrained(out_dir)

Besides the one-call ``__call__`` it exposes each stage, so a batch flow can encode prompts,
identities and references once and reuse them:

    prompts = pipe.encode_prompt("a woman walks on the beach")
    identity = pipe.encode_identity(face_embedding)            # IdentityTokens
    reference = pipe.encode_reference(face_crop_256, seed=42)  # ReferenceFeatures (full only)
    latents = pipe(prompt_embeds=prompts[0], negative_prompt_embeds=prompts[1], identity=identity,
                   reference=reference, seed=42, output_type="latent").frames
    frames = pipe.decode_latents(latents)                      # float32 [B, F, H, W, 3] in [0, 1]
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .adapters import AdapterSpec, LynxAdapter, load_adapters, save_adapters
from .attention import AdapterState, StackedAdapterState
from .checkpoint import SafetensorsHeader, fingerprint, read_header
from .conditioning import IdentityTokens, ReferenceFeatures
from .errors import LynxModelError, ModelInputError, WeightsError
from .lora import LoadedLora
from .memory import activation_bytes, dit_tokens
from .resampler import LynxResampler
from .sampling import SamplingCheckpoint, scheduler_settings, tensor_digest
from .step_cache import StepCache

# The negative prompt the Lynx reference inference uses by default (Wan's, in English).
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, blurred background, static, subtitles, style, works, paintings, images, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)
# The text the DiT sees while reference features are extracted.
REFERENCE_PROMPT = "image of a face"
# Side of the aligned face crop the Ref-adapter was trained on.
REFERENCE_SIZE = 256
# Release defaults: (frames, frames per second) per variant.
VARIANT_DEFAULTS = {"full": (81, 16), "lite": (121, 24), None: (81, 16)}
_BASE_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder")

ProgressCallback = Callable[[int, int, float], None]
CheckpointCallback = Callable[[SamplingCheckpoint], None]


def wan_flow_sigmas(num_inference_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Unshifted flow sigmas of original Wan2.1 and of the Lynx reference (diffusers 0.33).

    They run from 1 - 1/N down towards 0; diffusers 0.42's UniPC starts its flow schedule at 1.0
    instead, which moves the timesteps slightly and the sampled latents with them (by 6e-2 in the
    parity run). The scheduler applies its ``flow_shift`` to these.
    """
    return np.linspace(1.0 - 1.0 / num_train_timesteps, 0.0, num_inference_steps + 1)[:-1].copy()


@dataclass
class LynxPipelineOutput(BaseOutput):
    """``frames``: per video ``[F, H, W, 3]`` float32 in [0, 1] ("np"), a list of PIL images ("pil"),
    or the latents ``[B, 16, F', H/8, W/8]`` in normalised DiT space ("latent"). ``seed``: the seed
    used, or the list of per-video seeds when a list was passed. ``cache_stats``: with a step cache,
    its kind and the DiT block-forwards it skipped (``lynx_model.step_cache``)."""

    frames: Any
    seed: int | list[int]
    cache_stats: dict[str, Any] | None = None


def _component_dtypes(dtype: torch.dtype | dict[str, torch.dtype] | None) -> dict[str, torch.dtype]:
    """Per-component dtypes for DiffusionPipeline.from_pretrained. The VAE and the resampler stay fp32
    unless named explicitly: both run once per video and are the most precision-sensitive parts."""
    if dtype is None:
        dtype = torch.float32
    if not isinstance(dtype, dict):
        return {"default": dtype, "vae": torch.float32, "resampler": torch.float32}
    dtypes = dict(dtype)
    default = dtypes.setdefault("default", torch.float32)
    dtypes.setdefault("lynx_adapter", dtypes.get("transformer", default))
    return dtypes


def check_base_folder(base: Path) -> None:
    """Fail fast, naming the file, before minutes are spent loading a broken 14B folder."""
    if not base.is_dir():
        raise WeightsError(f"base model folder not found: {base}", path=base, role="base")
    for name in _BASE_COMPONENTS:
        if not (base / name).is_dir():
            raise WeightsError(
                f"{base} is not a Wan2.1 diffusers folder: missing {name}/", path=base / name, role="base"
            )
    for name in _WEIGHT_COMPONENTS:
        folder = base / name
        files = sorted(folder.glob("*.safetensors"))
        for index in folder.glob("*.safetensors.index.json"):
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, AttributeError):
                raise WeightsError(f"{index} is not a safetensors index", path=index, role="base") from None
            for shard in sorted(shards):
                if not (folder / shard).is_file():
                    raise WeightsError(
                        f"missing weights shard {folder / shard}", path=folder / shard, role="base"
                    )
        if not files:
            raise WeightsError(f"no *.safetensors weights in {folder}", path=folder, role="base")
        for path in files:
            read_header(path, role="base")


def _component_headers(folder: Path) -> list[SafetensorsHeader]:
    index = next(iter(folder.glob("*.safetensors.index.json")), None)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [read_header(folder / shard, role="base") for shard in shards]
    return [read_header(path, role="base") for path in sorted(folder.glob("*.safetensors"))]


def _expected_state(name: str, folder: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names and shapes the component's class expects, from its config alone (on the meta device),
    and the tied names a checkpoint may leave out."""
    try:
        with torch.device("meta"):
            if name == "text_encoder":
                model = UMT5EncoderModel(UMT5Config.from_pretrained(folder, local_files_only=True))
            else:
                cls = WanTransformer3DModel if name == "transformer" else AutoencoderKLWan
                model = cls.from_config(cls.load_config(folder, local_files_only=True))
    except Exception as err:  # a damaged config: diffusers/transformers raise many kinds
        config = folder / "config.json"
        raise WeightsError(f"could not read {config}: {_first_line(err)}", path=config, role="base") from err
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}, set(tied)


def check_base_weights(base: Path) -> None:
    """Match every base weight file against what its component's class expects (headers only).

    diffusers and transformers only warn about missing keys and leave those parameters random or on
    the meta device, which would sample wrong videos without an error; a file of another component,
    an old conversion or a renamed key fails here instead, naming the file.
    """
    for name in _WEIGHT_COMPONENTS:
        folder = base / name
        expected, optional = _expected_state(name, folder)
        headers = _component_headers(folder)
        found: dict[str, SafetensorsHeader] = {}
        for header in headers:
            for key in header.tensors:
                found[key] = header
        for key, header in found.items():
            if key in expected and tuple(header.shape(key)) != expected[key]:
                raise WeightsError(
                    f"{header.path} has the wrong shape for {key}: {list(header.shape(key))}, "
                    f"expected {list(expected[key])} from {folder / 'config.json'}",
                    path=header.path,
                    role="base",
                )
        missing = sorted(set(expected) - set(found) - optional)
        if missing:
            unexpected = sorted(set(found) - set(expected))
            where = headers[0].path if len(headers) == 1 else folder
            detail = f"missing {len(missing)} of {len(expected)} {name} weights, e.g. {_some(missing)}"
            if unexpected:
                detail += f"; it holds {len(unexpected)} unknown ones, e.g. {_some(unexpected)}"
            message = f"{where} is not a matching {name} checkpoint: {detail}"
            raise WeightsError(message, path=where, role="base")


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3])


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _face_embedding_tensor(face_embeds: Any, embedding_dim: int) -> torch.Tensor:
    if torch.is_tensor(face_embeds):
        embeds = face_embeds.detach().float().cpu()
    else:
        embeds = torch.from_numpy(np.asarray(face_embeds, dtype=np.float32))
    if embeds.ndim == 1:
        embeds = embeds[None]
    if embeds.ndim == 2:
        embeds = embeds[None]  # several embeddings of one face become several input tokens
    if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != embedding_dim:
        raise ModelInputError(
            f"face_embeds must be one {embedding_dim}-d embedding (shape [{embedding_dim}]), "
            f"got {list(embeds.shape)}"
        )
    if not torch.isfinite(embeds).all():
        raise ModelInputError("face_embeds contains NaN or infinite values")
    return embeds


def _reference_pixels(ref_image: Any) -> torch.Tensor:
    """A face crop (PIL or uint8 array ``[H, W, 3]``) as a one-frame video in [-1, 1], ``[1, 3, 1, H, W]``."""
    if isinstance(ref_image, PIL.Image.Image):
        array = np.asarray(ref_image.convert("RGB"))
    else:
        array = np.asarray(ref_image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ModelInputError(f"ref_image must be an RGB image [H, W, 3], got shape {list(array.shape)}")
    if array.shape[0] % 16 or array.shape[1] % 16:
        raise ModelInputError(
            f"ref_image sides must be multiples of 16 (256x256 expected), got {array.shape[:2]}"
        )
    if array.dtype != np.uint8:
        raise ModelInputError(f"ref_image must hold uint8 pixels, got {array.dtype}")
    pixels = torch.from_numpy(array.copy()).float() / 255.0 * 2 - 1
    return pixels.permute(2, 0, 1)[None, :, None]


def _seed_list(seed: Any) -> list[int] | None:
    """The per-video seeds of a list ``seed`` (None for one int seed)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return None
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence) or not seed:
        raise ModelInputError(f"seed must be an int or a non-empty list of ints, got {seed!r}")
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seed):
        raise ModelInputError(f"seed must be an int or a non-empty list of ints, got {list(seed)!r}")
    return [int(s) for s in seed]


def _videos_per_prompt(seeds: list[int] | None, num_prompts: int, requested: int | None) -> int:
    if requested is not None and (not isinstance(requested, int) or requested < 1):
        raise ModelInputError(f"num_videos_per_prompt must be a positive int, got {requested!r}")
    if seeds is None:
        return requested or 1
    per_prompt = requested or len(seeds) // num_prompts
    if per_prompt < 1 or len(seeds) != num_prompts * per_prompt:
        raise ModelInputError(
            f"{len(seeds)} seeds do not fit {num_prompts} prompt(s) x {requested or 'n'} video(s) "
            "per prompt: pass one seed per video"
        )
    return per_prompt


def _reference_list(reference: Any, batch_size: int) -> list[ReferenceFeatures]:
    """One shared ``ReferenceFeatures`` (broadcast over the batch) or one per video."""
    if reference is None:
        return []
    if isinstance(reference, ReferenceFeatures):
        return [reference]
    references = list(reference)
    if len(references) not in (1, batch_size) or not all(
        isinstance(r, ReferenceFeatures) for r in references
    ):
        raise ModelInputError(
            f"reference must be one ReferenceFeatures or a list of {batch_size} (one per video), "
            f"got {len(references)} item(s)"
        )
    return references


def _stack_reference(per_video: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-block features of several videos along the batch dimension (one video: as is)."""
    if len(per_video) == 1:
        return per_video[0]
    return [torch.cat(layers, dim=0) for layers in zip(*per_video, strict=True)]


class LynxPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""Text-to-video with identity (ID-adapter) and reference (Ref-adapter) conditioning.

    Components: ``tokenizer``, ``text_encoder`` (UMT5), ``vae`` (``AutoencoderKLWan``),
    ``transformer`` (``WanTransformer3DModel``), ``scheduler`` (UniPC, flow prediction) and, once an
    adapter is loaded, ``resampler`` (``LynxResampler``) and ``lynx_adapter`` (``LynxAdapter``, whose
    processors are installed on the transformer). Without them it is a plain Wan2.1 pipeline.

    Config: ``sigma_schedule`` ("wan": the timesteps of original Wan2.1 and of the Lynx reference;
    "scheduler": the scheduler's own, as diffusers' ``WanPipeline``).
    """

    model_cpu_offload_seq = "text_encoder->resampler->transformer->vae"
    _optional_components = ["resampler", "lynx_adapter"]
    # its processors live inside the transformer and move with it
    _exclude_from_cpu_offload = ["lynx_adapter"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        transformer: WanTransformer3DModel,
        scheduler: UniPCMultistepScheduler,
        resampler: LynxResampler | None = None,
        lynx_adapter: LynxAdapter | None = None,
        sigma_schedule: str = "wan",
    ) -> None:
        super().__init__()
        if (lynx_adapter is None) != (resampler is None):
            raise ModelInputError("pass both resampler and lynx_adapter, or neither (plain Wan)")
        if sigma_schedule not in ("wan", "scheduler"):
            raise ModelInputError(f"sigma_schedule must be 'wan' or 'scheduler', not {sigma_schedule!r}")
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            resampler=resampler,
            lynx_adapter=lynx_adapter,
        )
        self.register_to_config(sigma_schedule=sigma_schedule)
        if lynx_adapter is not None:
            lynx_adapter.install(transformer)
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._base_fingerprint: str | None = None
        # "auto": the guidance passes of a step run as one batched forward on CUDA
        self.batched_guidance: bool | Literal["auto"] = "auto"
        self._compute_dtype: torch.dtype | None = None
        self._step_cache: StepCache | None = None
        # LoRA files whose weights are in the transformer (lynx_model.lora.load_loras), for provenance
        self.loras: list[LoadedLora] = []
        self._loras_fused = False

    @property
    def sigma_schedule(self) -> str:
        return self.config.sigma_schedule

    @sigma_schedule.setter
    def sigma_schedule(self, value: Literal["wan", "scheduler"]) -> None:
        if value not in ("wan", "scheduler"):
            raise ModelInputError(f"sigma_schedule must be 'wan' or 'scheduler', not {value!r}")
        self.register_to_config(sigma_schedule=value)

    # ------------------------------------------------------------------------------------------
    # loading and saving
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> LynxPipeline:
        """Load a local Wan2.1 diffusers folder, or a folder ``save_pretrained`` wrote (with its adapter).

        DiffusionPipeline's arguments (``torch_dtype`` or ``dtype``, ``device_map``, ...), with two
        differences: only local folders (nothing is downloaded), and a single ``torch_dtype`` applies
        to the DiT, the text encoder and the adapter layers while the VAE and the resampler stay
        float32 (they run once per video and are the most precision-sensitive; name them in a dict,
        e.g. ``{"transformer": torch.bfloat16, "default": torch.float32}``, to choose otherwise).
        Modules diffusers keeps in float32 (rope, time embedder, norms, modulation tables) stay so.
        Every weight file is checked against its component's config first (headers only).

        Raises:
            WeightsError: naming the missing, truncated or mismatched file.
        """
        for old in ("adapter_path", "device"):
            if old in kwargs:  # DiffusionPipeline would only warn and ignore them
                raise ModelInputError(
                    f"from_pretrained takes no {old}= any more: load the adapter with "
                    "pipe.load_lynx_adapter(folder), place the pipeline with device_map= or pipe.to(device)"
                )
        base = Path(pretrained_model_name_or_path)
        check_base_folder(base)
        check_base_weights(base)
        dtype = kwargs.pop("torch_dtype", None)  # diffusers before 0.42 called it torch_dtype
        dtype = kwargs.pop("dtype", None) if dtype is None else dtype
        kwargs["dtype"] = _component_dtypes(dtype)
        kwargs.setdefault("local_files_only", True)
        try:
            pipe = super().from_pretrained(str(base), **kwargs)
        except LynxModelError:
            raise
        except Exception as err:  # diffusers / transformers raise many kinds; users need one line
            raise WeightsError(f"could not load {base}: {_first_line(err)}", path=base, role="base") from err
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        return pipe

    def load_lynx_adapter(
        self,
        adapter_path: str | Path,
        *,
        variant: Literal["auto", "full", "lite"] = "auto",
        torch_dtype: torch.dtype | None = None,
        resampler_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Load a released ``lynx_full`` / ``lynx_lite`` folder (three or two safetensors files, no
        config) and install its processors; an adapter already loaded is unloaded first.

        The variant is read from the files (``variant`` makes a mismatch an error), every size from
        tensor shapes, all checked against the transformer before anything big is read. The layers
        go to the transformer's device in ``torch_dtype`` (default: the transformer's compute
        dtype), the resampler in ``resampler_dtype``.

        Raises:
            WeightsError: naming the missing, truncated or mismatched file.
        """
        config = self.transformer.config
        spec = AdapterSpec.from_folder(
            adapter_path,
            num_blocks=config.num_layers,
            hidden_dim=config.num_attention_heads * config.attention_head_dim,
            variant=variant,
        )
        if self.lynx_adapter is not None:
            self.unload_lynx_adapter()
        device = get_module_execution_device(self.transformer)
        resampler, adapter = load_adapters(
            spec, device=device, dtype=torch_dtype or self.compute_dtype, resampler_dtype=resampler_dtype
        )
        adapter.install(self.transformer)
        self.register_modules(resampler=resampler, lynx_adapter=adapter)

    def unload_lynx_adapter(self) -> None:
        """Remove the adapter: diffusers' stock processors go back and the pipeline is plain Wan again."""
        if self.lynx_adapter is not None:
            LynxAdapter.uninstall(self.transformer)
        self.register_modules(resampler=None, lynx_adapter=None)

    def save_lynx_adapter(self, adapter_directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write the loaded adapter in the released layout (resampler, ip_layers, ref_layers)."""
        adapter = self._require_adapter("save_lynx_adapter")
        return save_adapters(adapter_directory, self.resampler, adapter, dtype=dtype)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the whole pipeline (``model_index.json`` names ``LynxPipeline``) so that
        ``LynxPipeline.from_pretrained(save_directory)`` loads it back with its adapter. The
        transformer is saved without the Lynx processors: its folder is a plain Wan transformer."""
        adapter = self.lynx_adapter
        with adapter.detached(self.transformer) if adapter is not None else nullcontext():
            super().save_pretrained(save_directory, **kwargs)

    def fuse_lora(self, *args, **kwargs) -> None:
        super().fuse_lora(*args, **kwargs)
        self._loras_fused = True

    def unfuse_lora(self, *args, **kwargs) -> None:
        super().unfuse_lora(*args, **kwargs)
        self._loras_fused = False

    def unload_lora_weights(self, *args, **kwargs) -> None:
        """diffusers' unload; fused LoRA weights stay in the transformer (and in ``self.loras``)."""
        super().unload_lora_weights(*args, **kwargs)
        if not self._loras_fused:
            self.loras = []

    # ------------------------------------------------------------------------------------------
    # facts about the loaded model
    # ------------------------------------------------------------------------------------------
    @property
    def variant(self) -> Literal["full", "lite"] | None:
        return self.lynx_adapter.variant if self.lynx_adapter is not None else None

    @property
    def default_num_frames(self) -> int:
        return VARIANT_DEFAULTS[self.variant][0]

    @property
    def default_fps(self) -> int:
        return VARIANT_DEFAULTS[self.variant][1]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the DiT computes in (its weights' dtype, unless they are stored in FP8)."""
        return self._compute_dtype or self.transformer.dtype

    @property
    def base_model_path(self) -> Path | None:
        name = self.name_or_path
        return Path(name) if name else None

    @property
    def adapter_fingerprint(self) -> str | None:
        return self.lynx_adapter.fingerprint if self.lynx_adapter is not None else None

    @property
    def base_fingerprint(self) -> str | None:
        """Identifies the base weights (reference features depend on them); None if not loaded from disk."""
        if self._base_fingerprint is None and self.base_model_path is not None:
            files = [
                p for name in _WEIGHT_COMPONENTS for p in (self.base_model_path / name).glob("*.safetensors")
            ]
            self._base_fingerprint = fingerprint(files) if files else None
        return self._base_fingerprint

    def activation_bytes_per_video(
        self,
        height: int = 480,
        width: int = 832,
        num_frames: int | None = None,
        *,
        guidance_passes: int = 1,
        per_video_reference: bool = False,
    ) -> int:
        """Estimated accelerator memory each video of a batch adds (activations, not weights).

        ``guidance_passes``: passes run in one batched forward (1 when they run one after another).
        ``per_video_reference``: each video has its own reference features (a list of seeds with
        ``ref_image``); a shared reference costs nothing per video. See ``lynx_model.memory``.
        """
        config = self.transformer.config
        tokens = dit_tokens(
            config,
            height,
            width,
            num_frames or self.default_num_frames,
            self.vae_scale_factor_temporal,
            self.vae_scale_factor_spatial,
        )
        reference_tokens = 0
        if per_video_reference:
            patch = config.patch_size
            reference_tokens = (REFERENCE_SIZE // self.vae_scale_factor_spatial) ** 2 // (patch[1] * patch[2])
        return activation_bytes(
            config,
            tokens,
            dtype=self.compute_dtype,
            passes_per_forward=guidance_passes,
            reference_tokens=reference_tokens,
        )

    # ------------------------------------------------------------------------------------------
    # speed switches: step cache, FP8 weights (torch.compile: pipe.transformer.compile_repeated_blocks)
    # ------------------------------------------------------------------------------------------
    def enable_step_cache(self, kind: str, **options: Any) -> None:
        """Reuse block computations across denoising steps with one of diffusers' cache hooks.

        ``kind``: "first-block" (``FirstBlockCacheConfig``, option ``threshold``) or "taylorseer"
        (``TaylorSeerCacheConfig`` in its lite mode: whole blocks skipped on predicted steps,
        options ``cache_interval``, ``disable_cache_before_step``, ...). Each guidance pass keeps
        its own cache state; the block-forwards skipped are counted in ``out.cache_stats``.
        """
        self.disable_step_cache()
        self._step_cache = StepCache(kind, options)
        self._step_cache.enable(self.transformer)

    def disable_step_cache(self) -> None:
        if self._step_cache is not None:
            self._step_cache.disable(self.transformer)
        self._step_cache = None

    @property
    def step_cache(self) -> StepCache | None:
        return self._step_cache

    def enable_fp8(self) -> None:
        """Store the DiT's (and the adapter layers') linear weights in float8 (e4m3) and compute in
        the current dtype, with diffusers' layerwise casting: about half the weight memory of bf16.
        CUDA only."""
        device = get_module_execution_device(self.transformer)
        if device.type != "cuda":
            raise ModelInputError(f"FP8 weights need a CUDA device; the transformer is on {device}")
        self._store_weights_in_fp8()

    def _store_weights_in_fp8(self) -> None:
        # Lynx processors are transformer submodules: their linear layers are cast like the DiT's,
        # and their keys/values are made in the compute dtype (see LynxAdapter.activated)
        compute = self.compute_dtype
        self.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
        self._compute_dtype = compute

    # ------------------------------------------------------------------------------------------
    # stage 1: text
    # ------------------------------------------------------------------------------------------
    def _text_embeddings(self, prompts: list[str], max_sequence_length: int, device, dtype) -> torch.Tensor:
        # UMT5 states of the real tokens, zero-padded to max_sequence_length (no mask downstream):
        # diffusers' own Wan prompt encoding, unchanged
        return WanPipeline._get_t5_prompt_embeds(
            self, prompts, max_sequence_length=max_sequence_length, device=device, dtype=dtype
        )

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        do_classifier_free_guidance: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """UMT5 embeddings ``[B, 512, text_dim]`` of the prompt and of the negative prompt.

        ``negative_prompt=None`` uses ``DEFAULT_NEGATIVE_PROMPT`` (WanPipeline's default is "");
        pass "" for an empty one. Wrap the result in ``PromptEmbeddings`` to store it.
        """
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if prompt_embeds is None:
            if prompts is None:
                raise ModelInputError("pass prompt or prompt_embeds")
            prompt_embeds = self._text_embeddings(prompts, max_sequence_length, device, dtype)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
            negatives = [negative] * batch_size if isinstance(negative, str) else list(negative)
            if len(negatives) != batch_size:
                raise ModelInputError(f"{len(negatives)} negative prompts for {batch_size} prompts")
            negative_prompt_embeds = self._text_embeddings(negatives, max_sequence_length, device, dtype)
        return prompt_embeds, negative_prompt_embeds

    # ------------------------------------------------------------------------------------------
    # stage 2: identity
    # ------------------------------------------------------------------------------------------
    def _require_adapter(self, what: str) -> LynxAdapter:
        if self.lynx_adapter is None:
            raise ModelInputError(
                f"{what} needs a Lynx adapter; load one with pipe.load_lynx_adapter(folder)"
            )
        return self.lynx_adapter

    @torch.no_grad()
    def encode_identity(self, face_embeds: Any) -> IdentityTokens:
        """Identity tokens for one face embedding (512-d ArcFace, as numpy array or tensor ``[512]``).

        ``uncond`` is the resampler applied to an all-zero embedding (the unconditional identity).
        """
        adapter = self._require_adapter("encode_identity")
        embeds = _face_embedding_tensor(face_embeds, self.resampler.config.embedding_dim)
        device = get_module_execution_device(self.resampler)
        embeds = embeds.to(device=device, dtype=self.resampler.dtype)
        cond = self.resampler(embeds)
        uncond = self.resampler(torch.zeros_like(embeds))
        return IdentityTokens(cond, uncond, adapter.variant, adapter.fingerprint)

    # ------------------------------------------------------------------------------------------
    # stage 3: reference
    # ------------------------------------------------------------------------------------------
    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and 1/std, shaped and placed like ``like``."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def _normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_statistics(latents)
        return (latents - mean) * inv_std

    def _denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        # written as diffusers' WanPipeline writes it, so decoded frames match it bit for bit
        mean, inv_std = self._latent_statistics(latents)
        return latents / inv_std + mean

    def _capture_features(self, pixels: torch.Tensor, seed: int, text: torch.Tensor) -> list[torch.Tensor]:
        """Every block's attn1 input for the VAE sample of ``pixels``, read with forward pre-hooks."""
        device = self._execution_device
        generator = torch.Generator("cpu").manual_seed(seed + 1)
        vae_device = get_module_execution_device(self.vae)
        posterior = self.vae.encode(pixels.to(device=vae_device, dtype=self.vae.dtype)).latent_dist
        latents = self._normalize_latents(posterior.sample(generator=generator))
        captured: dict[int, torch.Tensor] = {}
        blocks = self.transformer.blocks
        hooks = [
            block.attn1.register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0]))
            for i, block in enumerate(blocks)
        ]
        # one plain forward: no step cache (a cached block would capture nothing), compiled blocks
        # run eagerly (the hooks would recompile them), adapter branches off
        try:
            with self._uncached(), torch.compiler.set_stance("force_eager"):
                self.transformer(
                    hidden_states=latents.to(device=device, dtype=self.compute_dtype),
                    timestep=torch.zeros(latents.shape[0], dtype=torch.long, device=device),
                    encoder_hidden_states=text.to(self.compute_dtype),
                    return_dict=False,
                )
        finally:
            for hook in hooks:
                hook.remove()
        return [captured[i] for i in range(len(blocks))]

    @contextmanager
    def _uncached(self) -> Iterator[None]:
        step_cache = self._step_cache
        if step_cache is None:
            yield
            return
        step_cache.disable(self.transformer)
        try:
            yield
        finally:
            step_cache.enable(self.transformer)

    @torch.no_grad()
    def encode_reference(
        self, ref_image: Any, seed: int, *, uncond: list[torch.Tensor] | None = None
    ) -> ReferenceFeatures:
        """Reference features of a 256x256 face crop (PIL image or uint8 array), full variant only.

        The crop is VAE-encoded as one frame (sampled with a CPU generator seeded ``seed + 1``), run
        through the frozen DiT at timestep 0 with the text "image of a face", and every block's
        attn1 input is kept. ``uncond`` repeats this on a mid-grey image (zeros in [-1, 1]); it is
        the same for every face of a size and seed, so a batch may pass the ``uncond`` of an
        earlier result instead of computing it again.
        """
        adapter = self._require_adapter("encode_reference")
        if adapter.reference is None:
            raise ModelInputError(
                "the lite adapter has no reference branch: pass ref_image/reference only to full"
            )
        pixels = _reference_pixels(ref_image)
        text = self._text_embeddings([REFERENCE_PROMPT], 512, self._execution_device, self.compute_dtype)
        cond = self._capture_features(pixels, seed, text)
        if uncond is None:
            uncond = self._capture_features(torch.zeros_like(pixels), seed, text)
        return ReferenceFeatures(cond, uncond, seed, self.base_fingerprint, adapter.fingerprint)

    def _references_for_seeds(self, ref_image: Any, seeds: list[int]) -> list[ReferenceFeatures]:
        """Reference features of one crop for each seed (each distinct seed encoded once)."""
        by_seed: dict[int, ReferenceFeatures] = {}
        for seed in seeds:
            if seed not in by_seed:
                by_seed[seed] = self.encode_reference(ref_image, seed)
        return [by_seed[seed] for seed in seeds]

    # ------------------------------------------------------------------------------------------
    # stage 4: decode
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: Literal["np", "pil", "pt"] = "np"):
        """Decode normalised DiT latents ``[B, 16, F', H', W']`` to frames.

        "np": float32 ``[B, F, H, W, 3]`` in [0, 1] (index ``[0]`` for one video's ``[F, H, W, 3]``);
        "pil": a list per video of PIL images; "pt": float ``[B, F, 3, H, W]`` in [0, 1].
        """
        vae_device = get_module_execution_device(self.vae)
        latents = self._denormalize_latents(latents.to(device=vae_device, dtype=self.vae.dtype))
        video = self.vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    # ------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------
    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        num_frames: int,
        seed: int | Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Initial noise ``[B, 16, F', H/8, W/8]``, float32, drawn on the CPU as the reference does.

        An int ``seed`` (or ``generator``) draws the whole batch from one generator; a list of
        seeds draws video i from its own generator seeded ``seed[i]``, so that a video of a batch
        starts from exactly the noise of a one-video call with its seed.
        """
        if isinstance(seed, Sequence):
            if len(seed) != batch_size:
                raise ModelInputError(f"{len(seed)} seeds for {batch_size} videos")
            generator = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
        elif generator is None:
            generator = torch.Generator("cpu").manual_seed(seed)
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        device = device or self._execution_device
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _check_identity(self, identity: IdentityTokens) -> None:
        adapter = self.lynx_adapter
        expected_dim = adapter.config.identity_dim
        if identity.variant != adapter.variant or identity.token_dim != expected_dim:
            raise ModelInputError(
                f"identity tokens were made for a {identity.variant} adapter ({identity.token_dim}-d), "
                f"this pipeline runs {adapter.variant} ({expected_dim}-d)"
            )
        if (
            identity.adapter_fingerprint
            and adapter.fingerprint
            and identity.adapter_fingerprint != adapter.fingerprint
        ):
            raise ModelInputError(
                f"identity tokens come from other adapter weights ({identity.adapter_fingerprint}, "
                f"loaded: {adapter.fingerprint}); encode the face again with this pipeline"
            )

    def _check_reference(self, reference: ReferenceFeatures) -> None:
        num_blocks = len(self.transformer.blocks)
        hidden_dim = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        if reference.num_layers != num_blocks or reference.hidden_dim != hidden_dim:
            raise ModelInputError(
                f"reference features have {reference.num_layers} layers x {reference.hidden_dim}, "
                f"the DiT has {num_blocks} x {hidden_dim}"
            )
        base = self.base_fingerprint
        if reference.base_fingerprint and base and reference.base_fingerprint != base:
            raise ModelInputError(
                f"reference features come from other base weights ({reference.base_fingerprint}, "
                f"loaded: {base}); "
                "encode the reference again with this pipeline"
            )

    def _check_inputs(self, prompt, prompt_embeds, height, width, ref_given, callback_inputs) -> None:
        if (prompt is None) == (prompt_embeds is None):
            raise ModelInputError("pass exactly one of prompt and prompt_embeds")
        if height % 16 or width % 16:
            raise ModelInputError(f"height and width must be multiples of 16, got {height}x{width}")
        if ref_given and self.variant != "full":
            raise ModelInputError(
                f"ref_image/reference need the full adapter; this pipeline runs {self.variant or 'plain Wan'}"
            )
        unknown = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ModelInputError(
                f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, not {unknown}"
            )

    @contextmanager
    def _progress(self, enabled: bool, total: int):
        config = dict(getattr(self, "_progress_bar_config", {}))
        saved = config.copy()
        if not enabled:
            config["disable"] = True
        self._progress_bar_config = config
        try:
            with self.progress_bar(total=total) as bar:
                yield bar
        finally:
            self._progress_bar_config = saved

    def _use_batched_guidance(self, requested: bool | None) -> bool:
        choice = self.batched_guidance if requested is None else requested
        if choice == "auto":
            return get_module_execution_device(self.transformer).type == "cuda"
        return bool(choice)

    def _predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        state: AdapterState | None,
        cache_name: str,
        *,
        step_index: int | None = None,
        attention_kwargs: dict | None = None,
        passes: int = 1,
    ) -> torch.Tensor:
        adapter = self.lynx_adapter
        activated = (
            adapter.activated(self.transformer, state, self.compute_dtype) if adapter else nullcontext()
        )
        counting = self._step_cache.counting(passes) if self._step_cache is not None else nullcontext()
        context = self.transformer.cache_context(cache_name, step_index=step_index, timestep=timestep[0])
        with activated, context, counting:
            return self.transformer(
                hidden_states=latents,
                timestep=timestep,
                encoder_hidden_states=text,
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]

    def _noise_prediction(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        passes: list[GuidancePass],
        combine: Callable[[list[torch.Tensor]], torch.Tensor],
        *,
        batched: bool,
        step_index: int,
        attention_kwargs: dict | None,
    ) -> torch.Tensor:
        """The guided noise prediction of one step: the passes one after another, or as one forward
        of the passes stacked along the batch (each with its own identity and reference inputs)."""
        model_input = latents.to(self.compute_dtype)
        videos = latents.shape[0]
        if batched and len(passes) > 1:
            state = _stacked_state([p.state for p in passes], videos)
            if state is not False:
                out = self._predict(
                    model_input.repeat(len(passes), 1, 1, 1, 1),
                    t.expand(videos * len(passes)),
                    torch.cat([p.text for p in passes]),
                    state,
                    "guidance",
                    step_index=step_index,
                    attention_kwargs=attention_kwargs,
                    passes=len(passes),
                )
                return combine(list(out.chunk(len(passes))))
        predictions = [
            self._predict(
                model_input,
                t.expand(videos),
                p.text,
                p.state,
                p.name,
                step_index=step_index,
                attention_kwargs=attention_kwargs,
            )
            for p in passes
        ]
        return combine(predictions)

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        face_embeds: Any = None,
        ref_image: Any = None,
        height: int = 480,
        width: int = 832,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_id: float | None = 2.0,
        ip_scale: float = 1.0,
        ref_scale: float = 1.0,
        seed: int | Sequence[int] | None = None,
        *,
        num_videos_per_prompt: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        identity: IdentityTokens | None = None,
        reference: ReferenceFeatures | Sequence[ReferenceFeatures] | None = None,
        output_type: Literal["np", "pil", "pt", "latent"] = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        batched_guidance: bool | None = None,
        progress_callback: ProgressCallback | None = None,
        progress: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        resume_from: SamplingCheckpoint | None = None,
        checkpoint_callback: CheckpointCallback | None = None,
        checkpoint_steps: int = 0,
    ):
        r"""Generate videos of the person in ``face_embeds`` / ``ref_image`` doing what ``prompt`` says.

        Guidance: full runs three DiT passes per step, e = e_u + g_i (e_i - e_u) + g (e_c - e_i) with
        e_c = (text, identity, reference), e_i = (negative text, identity, reference) and
        e_u = (negative text, unconditional identity and reference); ``guidance_scale_id=None`` gives
        classic two-pass guidance. Lite runs two passes, e_u + g (e_c - e_u). ``guidance_scale <= 1``
        turns guidance off (one pass).

        Args:
            face_embeds / identity: the face (512-d embedding) or its precomputed ``IdentityTokens``.
            ref_image / reference: full only; a 256x256 aligned face crop or its ``ReferenceFeatures``
                (one shared by every video, or a list with one per video); None leaves the
                reference branch off.
            num_frames: 4k+1 frames; None uses the release default (81 full, 121 lite).
            seed: initial noise comes from a CPU generator seeded ``seed`` (float32); the reference
                VAE sample from one seeded ``seed + 1``. None draws a random seed (returned). A list
                of seeds makes one video per seed along the batch (best-of-N candidates): video i
                gets exactly the noise and reference sample of a call with ``seed=seeds[i]``, while
                text and identity are shared.
            num_videos_per_prompt: videos per prompt (default 1, or ``len(seed) / len(prompts)``
                for a list of seeds). With an int seed, one generator draws the whole batch's noise,
                as ``WanPipeline`` does with a generator.
            generator: overrides the noise generator of an int seed (the reference still uses
                ``seed + 1``).
            attention_kwargs: passed to the transformer, as in ``WanPipeline`` (``{"scale": s}``
                scales the loaded LoRAs).
            batched_guidance: run the guidance passes of a step as one forward of 2 or 3 times the
                batch (same result within float rounding, more memory, faster on a GPU); None
                follows ``pipe.batched_guidance`` ("auto": on for CUDA).
            output_type: "np" (float32 [0, 1]), "pil", "pt", or "latent" (normalised DiT latents).
            progress_callback: called after every step as ``(step_index, num_steps, timestep)``.
            progress: show the tqdm bar (configure it with ``set_progress_bar_config``).
            resume_from: a ``SamplingCheckpoint`` of this same generation (same inputs, seed, size,
                steps and settings; anything else raises ``CheckpointMismatchError`` before any step):
                the loop goes on after its last step and ends with the latents an uninterrupted call
                gives (bit for bit on the same device and dtype).
            checkpoint_callback: receives a ``SamplingCheckpoint`` (CPU copies) after every
                ``checkpoint_steps`` steps and after the last one; hand it to another thread to store.

        Returns ``LynxPipelineOutput(frames, seed, cache_stats)``.
        """
        # 1. check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        ref_given = ref_image is not None or reference is not None
        self._check_inputs(
            prompt, prompt_embeds, height, width, ref_given, callback_on_step_end_tensor_inputs
        )
        num_frames = num_frames or self.default_num_frames
        if num_frames % self.vae_scale_factor_temporal != 1:
            raise ModelInputError(f"num_frames must be 4k+1 (e.g. 81, 121), got {num_frames}")
        if checkpoint_callback is not None and checkpoint_steps < 1:
            raise ModelInputError(
                f"checkpoint_steps must be at least 1 with a checkpoint_callback, got {checkpoint_steps}"
            )
        if resume_from is not None and seed is None:
            seed = resume_from.seed
        if seed is None:
            seed = random.randrange(2**31)
        seeds = _seed_list(seed)
        if seeds is not None and generator is not None:
            raise ModelInputError("pass either a list of seeds or a generator, not both")
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        do_guidance = guidance_scale > 1.0
        device = self._execution_device
        compute_dtype = self.compute_dtype

        # 2. text
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=do_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        num_prompts = prompt_embeds.shape[0]
        num_videos_per_prompt = _videos_per_prompt(seeds, num_prompts, num_videos_per_prompt)
        batch_size = num_prompts * num_videos_per_prompt
        # prompt-major order, as WanPipeline: [p0 v0, p0 v1, ..., p1 v0, ...]
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        prompt_embeds = prompt_embeds.to(device=device, dtype=compute_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=compute_dtype)

        # 3. identity and reference, computed once for the whole generation
        cond_state = uncond_state = None
        reference_cond = reference_uncond = None
        if self.lynx_adapter is not None:
            if identity is None:
                if face_embeds is None:
                    raise ModelInputError("pass face_embeds (or precomputed identity tokens)")
                identity = self.encode_identity(face_embeds)
            self._check_identity(identity)
            if reference is None and ref_image is not None:
                reference = self._references_for_seeds(ref_image, seeds or [seed])
            references = _reference_list(reference, batch_size)
            for item in references:
                self._check_reference(item)
            reference_cond = _stack_reference([r.cond for r in references]) if references else None
            reference_uncond = _stack_reference([r.uncond for r in references]) if references else None
            cond_state = AdapterState(identity.cond, reference_cond, ip_scale=ip_scale, ref_scale=ref_scale)
            uncond_state = AdapterState(
                identity.uncond, reference_uncond, ip_scale=ip_scale, ref_scale=ref_scale
            )
        passes, combine = _guidance(
            prompt_embeds,
            negative_prompt_embeds if do_guidance else None,
            cond_state,
            uncond_state,
            guidance_scale,
            guidance_scale_id if self.variant == "full" else None,
        )
        batched = self._use_batched_guidance(batched_guidance)

        # 4. timesteps
        if self.sigma_schedule == "wan" and self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = wan_flow_sigmas(num_inference_steps, self.scheduler.config.num_train_timesteps)
            self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.scheduler.set_begin_index(0)

        # 5. initial noise: float32 from a CPU generator, as the reference does
        if latents is None:
            latents = self.prepare_latents(
                batch_size, height, width, num_frames, seeds or seed, generator=generator, device=device
            )
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        conditions = None
        if resume_from is not None or checkpoint_callback is not None:
            inputs = [prompt_embeds, negative_prompt_embeds]
            if identity is not None:
                inputs += [identity.cond, identity.uncond]
            if reference_cond is not None:  # the first block's features stand for the reference
                inputs += [reference_cond[0], reference_uncond[0]]
            conditions = {
                "initial_noise": tensor_digest([latents]),
                "inputs": tensor_digest(inputs),
                "guidance": [
                    guidance_scale,
                    guidance_scale_id if len(passes) == 3 else None,
                    ip_scale,
                    ref_scale,
                ],
                "weights": [
                    self.variant,
                    self.base_fingerprint,
                    self.adapter_fingerprint,
                    str(compute_dtype),
                ],
                "scheduler": {**scheduler_settings(self.scheduler), "sigma_schedule": self.sigma_schedule},
            }
        start = 0
        if resume_from is not None:
            resume_from.check(shape=tuple(latents.shape), seed=seed, conditions=conditions)
            start = resume_from.restore(self.scheduler)
            latents = resume_from.latents.to(device=device, dtype=torch.float32)

        # 6. denoising loop
        num_steps = len(timesteps)
        self._num_timesteps = num_steps
        if self._step_cache is not None:
            self._step_cache.start()
        try:
            with self._progress(progress, num_steps) as bar:
                bar.update(start)
                for i, t in enumerate(timesteps):
                    if self.interrupt or i < start:
                        continue
                    noise_pred = self._noise_prediction(
                        latents,
                        t,
                        passes,
                        combine,
                        batched=batched,
                        step_index=i,
                        attention_kwargs=attention_kwargs,
                    )
                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                    done = i + 1
                    if checkpoint_callback is not None and (
                        done % checkpoint_steps == 0 or done == num_steps
                    ):
                        state = SamplingCheckpoint.capture(self.scheduler, latents, done, seed, conditions)
                        checkpoint_callback(state)

                    if callback_on_step_end is not None:
                        scope = {
                            "latents": latents,
                            "prompt_embeds": prompt_embeds,
                            "negative_prompt_embeds": negative_prompt_embeds,
                        }
                        outputs = callback_on_step_end(
                            self, i, t, {k: scope[k] for k in callback_on_step_end_tensor_inputs}
                        )
                        latents = outputs.pop("latents", latents)
                        if "prompt_embeds" in outputs or "negative_prompt_embeds" in outputs:
                            prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                            negative_prompt_embeds = outputs.pop(
                                "negative_prompt_embeds", negative_prompt_embeds
                            )
                            passes, combine = _guidance(
                                prompt_embeds,
                                negative_prompt_embeds if do_guidance else None,
                                cond_state,
                                uncond_state,
                                guidance_scale,
                                guidance_scale_id if self.variant == "full" else None,
                            )
                    if progress_callback is not None:
                        progress_callback(i, num_steps, float(t))
                    bar.update()

            # 7. decode
            if output_type == "latent":
                frames = latents
            else:
                frames = self.decode_latents(latents, output_type=output_type)
        finally:
            cache_stats = self._step_cache.stats() if self._step_cache is not None else None
            self.maybe_free_model_hooks()  # also resets the step cache's state for the next call
        used = list(seeds) if seeds is not None else seed
        if not return_dict:
            return (frames, used)
        return LynxPipelineOutput(frames=frames, seed=used, cache_stats=cache_stats)


@dataclass
class GuidancePass:
    """One transformer evaluation of a guidance step: its name (the cache context), text and adapter state."""

    name: str
    text: torch.Tensor
    state: AdapterState | None


def _guidance(text, negative_text, cond_state, uncond_state, guidance_scale, guidance_scale_id):
    """The passes of one step and how their predictions combine (LYNX_SPEC 5)."""
    cond = GuidancePass("cond", text, cond_state)
    if negative_text is None:
        return [cond], lambda predictions: predictions[0]
    uncond = GuidancePass("uncond", negative_text, uncond_state)
    three_pass = (
        guidance_scale_id is not None
        and cond_state is not None
        and (cond_state.identity_on or cond_state.reference_on)
    )
    if three_pass:
        identity = GuidancePass("identity", negative_text, cond_state)

        def combine(predictions):
            e_c, e_u, e_i = predictions
            return e_u + guidance_scale_id * (e_i - e_u) + guidance_scale * (e_c - e_i)

        return [cond, uncond, identity], combine

    def combine_two(predictions):
        e_c, e_u = predictions
        return e_u + guidance_scale * (e_c - e_u)

    return [cond, uncond], combine_two


def _stacked_state(states: list[AdapterState | None], videos: int) -> AdapterState | None | Literal[False]:
    """One state for passes stacked along the batch; None without adapters, False if they cannot stack."""
    if all(state is None for state in states):
        return None
    try:
        return StackedAdapterState(states, videos)
    except ValueError:
        return False
