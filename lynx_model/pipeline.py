"""``LynxPipeline``: identity-preserving text-to-video with Lynx adapters on a Wan2.1 DiT.

The pipeline is a diffusers ``DiffusionPipeline`` over the stock Wan components (tokenizer, UMT5
text encoder, Wan VAE, ``WanTransformer3DModel``, UniPC scheduler) plus the Lynx resampler; the
identity and reference branches live in attention processors installed on the transformer
(``lynx_model.attention``). Besides the one-call ``__call__`` it exposes each stage, so a batch
flow can encode prompts, identities and references once and reuse them:

    pipe = LynxPipeline.from_pretrained(base_dir, adapter_path=adapter_dir, dtype=torch.bfloat16)
    prompts = pipe.encode_prompt("a woman walks on the beach")
    identity = pipe.encode_identity(face_embedding)          # IdentityTokens
    reference = pipe.encode_reference(face_crop_256, seed=42)  # ReferenceFeatures (full only)
    latents = pipe(prompt_embeds=prompts[0], negative_prompt_embeds=prompts[1], identity=identity,
                   reference=reference, seed=42, output_type="latent").frames
    frames = pipe.decode_latents(latents)                     # float32 [B, F, H, W, 3] in [0, 1]
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .adapters import AdapterSpec, LynxAdapters, load_adapters, read_transformer_size, save_adapters
from .attention import AdapterState
from .checkpoint import SafetensorsHeader, fingerprint, read_header
from .conditioning import IdentityTokens, ReferenceFeatures
from .errors import ModelInputError, WeightsError
from .memory import activation_bytes, dit_tokens
from .resampler import LynxResampler
from .sampling import SamplingCheckpoint, scheduler_settings, tensor_digest

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
    used, or the list of per-video seeds when a list was passed."""

    frames: Any
    seed: int | list[int]


def _dtypes(dtype: torch.dtype | dict[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Per-component dtypes. The VAE and the resampler stay fp32 unless named explicitly: both run
    once per video and are the most precision-sensitive parts."""
    if not isinstance(dtype, dict):
        return {
            "transformer": dtype,
            "text_encoder": dtype,
            "adapters": dtype,
            "vae": torch.float32,
            "resampler": torch.float32,
        }
    default = dtype.get("default", torch.float32)
    dtypes = {name: dtype.get(name, default) for name in ("transformer", "text_encoder", "vae", "resampler")}
    dtypes["adapters"] = dtype.get("adapters", dtypes["transformer"])
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


def _load_component(path: Path, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except WeightsError:
        raise
    except Exception as err:  # diffusers / transformers raise many kinds; users need one line
        raise WeightsError(f"could not load {path}: {_first_line(err)}", path=path, role="base") from err


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


class LynxPipeline(DiffusionPipeline):
    r"""Text-to-video with identity (ID-adapter) and reference (Ref-adapter) conditioning.

    Components: ``tokenizer``, ``text_encoder`` (UMT5), ``vae`` (``AutoencoderKLWan``), ``transformer``
    (``WanTransformer3DModel`` with Lynx processors installed), ``scheduler`` (UniPC, flow
    prediction) and ``resampler`` (``LynxResampler``; None for a plain Wan pipeline).
    """

    model_cpu_offload_seq = "text_encoder->resampler->transformer->vae"
    _optional_components = ["resampler"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        transformer: WanTransformer3DModel,
        scheduler: UniPCMultistepScheduler,
        resampler: LynxResampler | None = None,
        adapters: LynxAdapters | None = None,
        sigma_schedule: Literal["wan", "scheduler"] = "wan",
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            resampler=resampler,
        )
        if (adapters is None) != (resampler is None):
            raise ModelInputError("pass both resampler and adapters, or neither (plain Wan)")
        self.adapters = adapters
        if adapters is not None:
            adapters.install(transformer)
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.base_model_path: Path | None = None
        self._base_fingerprint: str | None = None
        # "wan": the timesteps of original Wan and the Lynx reference; "scheduler": the scheduler's own
        self.sigma_schedule = sigma_schedule

    # ------------------------------------------------------------------------------------------
    # loading and saving
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model_path: str | Path,
        adapter_path: str | Path | None = None,
        *,
        variant: Literal["auto", "full", "lite"] = "auto",
        dtype: torch.dtype | dict[str, torch.dtype] = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> LynxPipeline:
        """Load a Wan2.1 diffusers folder and (optionally) a released Lynx adapter folder.

        Args:
            base_model_path: e.g. ``Wan2.1-T2V-14B-Diffusers`` (model_index.json, transformer/, vae/,
                text_encoder/, tokenizer/, scheduler/).
            adapter_path: ``lynx_full`` or ``lynx_lite`` as released; None gives a plain Wan pipeline.
            variant: "auto" infers full or lite from the files; naming one makes a mismatch an error.
            dtype: compute dtype of the DiT, text encoder and adapters (the VAE and the resampler
                stay fp32), or a dict per component (keys transformer, text_encoder, vae, resampler,
                adapters, default). Modules diffusers keeps in fp32 (rope, time embedder, norms,
                modulation tables) stay fp32 either way.
            device: where the components go; on an accelerator each one is loaded straight onto it
                from the memory-mapped safetensors (no full copy in host RAM); None keeps them on the
                CPU (e.g. for ``enable_model_cpu_offload``).

        Raises:
            WeightsError: naming the missing, truncated or mismatched file.
        """
        base = Path(base_model_path)
        device = torch.device(device or "cpu")
        dtypes = _dtypes(dtype)
        check_base_folder(base)
        num_blocks, hidden_dim = read_transformer_size(base / "transformer")
        check_base_weights(base)
        # headers only: a wrong adapter folder fails before the base model is loaded
        spec = None
        if adapter_path is not None:
            spec = AdapterSpec.from_folder(
                adapter_path, num_blocks=num_blocks, hidden_dim=hidden_dim, variant=variant
            )

        # On an accelerator, device_map streams each memory-mapped shard straight to the device:
        # the 14B DiT never needs a full copy in host RAM.
        placement = {"device_map": {"": device}} if device.type != "cpu" else {}

        def load_model(cls, name: str):
            return cls.from_pretrained(
                base, subfolder=name, dtype=dtypes[name], local_files_only=True, **placement
            )

        # one component after the other, each moved to the device before the next is read
        tokenizer = _load_component(
            base / "tokenizer",
            lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True),
        )
        text_encoder = _load_component(
            base / "text_encoder", lambda: load_model(UMT5EncoderModel, "text_encoder")
        )
        vae = _load_component(base / "vae", lambda: load_model(AutoencoderKLWan, "vae"))
        transformer = _load_component(
            base / "transformer", lambda: load_model(WanTransformer3DModel, "transformer")
        )
        scheduler = _load_component(
            base / "scheduler",
            lambda: UniPCMultistepScheduler.from_pretrained(
                base, subfolder="scheduler", local_files_only=True
            ),
        )
        for module in (text_encoder, vae, transformer):
            module.requires_grad_(False).eval()

        resampler = adapters = None
        if spec is not None:
            resampler, adapters = load_adapters(
                spec, device=device, dtype=dtypes["adapters"], resampler_dtype=dtypes["resampler"]
            )
        pipe = cls(
            tokenizer, text_encoder, vae, transformer, scheduler, resampler=resampler, adapters=adapters
        )
        pipe.base_model_path = base
        return pipe

    def save_pretrained(
        self, save_directory: str | Path, adapter_directory: str | Path | None = None, **kwargs
    ):
        """Write the base model as a plain Wan2.1 diffusers folder and, if given, the adapters in the
        released layout (``resampler/ip_layers/ref_layers.safetensors``)."""
        components = {name: getattr(self, name) for name in _BASE_COMPONENTS}
        detached = self.adapters.detached(self.transformer) if self.adapters is not None else nullcontext()
        with detached:
            WanPipeline(**components).save_pretrained(save_directory, **kwargs)
        if adapter_directory is not None:
            if self.adapters is None:
                raise ModelInputError("this pipeline has no adapters to save")
            save_adapters(adapter_directory, self.resampler, self.adapters)

    # ------------------------------------------------------------------------------------------
    # facts about the loaded model
    # ------------------------------------------------------------------------------------------
    @property
    def variant(self) -> Literal["full", "lite"] | None:
        return self.adapters.variant if self.adapters is not None else None

    @property
    def default_num_frames(self) -> int:
        return VARIANT_DEFAULTS[self.variant][0]

    @property
    def default_fps(self) -> int:
        return VARIANT_DEFAULTS[self.variant][1]

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
            dtype=self.transformer.dtype,
            passes_per_forward=guidance_passes,
            reference_tokens=reference_tokens,
        )

    @property
    def adapter_fingerprint(self) -> str | None:
        return self.adapters.fingerprint if self.adapters is not None else None

    @property
    def base_fingerprint(self) -> str | None:
        """Identifies the base weights (reference features depend on them); None if not loaded from disk."""
        if self._base_fingerprint is None and self.base_model_path is not None:
            files = [
                p for name in _WEIGHT_COMPONENTS for p in (self.base_model_path / name).glob("*.safetensors")
            ]
            self._base_fingerprint = fingerprint(files)
        return self._base_fingerprint

    # ------------------------------------------------------------------------------------------
    # stage 1: text
    # ------------------------------------------------------------------------------------------
    def _text_embeddings(self, prompts: list[str], max_sequence_length: int, device, dtype) -> torch.Tensor:
        # UMT5 states of the real tokens, zero-padded to max_sequence_length (no mask downstream).
        prompts = [prompt_clean(p) for p in prompts]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        lengths = tokens.attention_mask.gt(0).sum(dim=1).long()
        encoder_device = get_module_execution_device(self.text_encoder)
        states = self.text_encoder(
            tokens.input_ids.to(encoder_device), tokens.attention_mask.to(encoder_device)
        ).last_hidden_state
        states = states.to(dtype=dtype, device=device)
        padded = [
            torch.cat([s[:n], s.new_zeros(max_sequence_length - int(n), s.shape[1])])
            for s, n in zip(states, lengths, strict=True)
        ]
        return torch.stack(padded)

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

        ``negative_prompt=None`` uses ``DEFAULT_NEGATIVE_PROMPT``; pass "" for an empty one. Wrap
        the result in ``PromptEmbeddings`` to store it.
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
    def _require_adapters(self, what: str) -> LynxAdapters:
        if self.adapters is None:
            raise ModelInputError(
                f"{what} needs Lynx adapters; this pipeline was loaded without adapter_path"
            )
        return self.adapters

    @torch.no_grad()
    def encode_identity(self, face_embeds: Any) -> IdentityTokens:
        """Identity tokens for one face embedding (512-d ArcFace, as numpy array or tensor ``[512]``).

        ``uncond`` is the resampler applied to an all-zero embedding (the unconditional identity).
        """
        adapters = self._require_adapters("encode_identity")
        embeds = _face_embedding_tensor(face_embeds, self.resampler.config.embedding_dim)
        device = self._execution_device
        embeds = embeds.to(device=device, dtype=self.resampler.dtype)
        cond = self.resampler(embeds)
        uncond = self.resampler(torch.zeros_like(embeds))
        return IdentityTokens(cond, uncond, adapters.variant, adapters.fingerprint)

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
        device = self._execution_device
        generator = torch.Generator("cpu").manual_seed(seed + 1)
        posterior = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist
        latents = self._normalize_latents(posterior.sample(generator=generator))
        dtype = self.transformer.dtype
        state = AdapterState(capture=True)
        with self.adapters.runtime.use(state):
            self.transformer(
                hidden_states=latents.to(device=device, dtype=dtype),
                timestep=torch.zeros(latents.shape[0], dtype=torch.long, device=device),
                encoder_hidden_states=text.to(dtype),
                return_dict=False,
            )
        return [state.captured[i] for i in range(len(self.transformer.blocks))]

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
        adapters = self._require_adapters("encode_reference")
        if adapters.reference_layers is None:
            raise ModelInputError(
                "the lite adapter has no reference branch: pass ref_image/reference only to full"
            )
        pixels = _reference_pixels(ref_image)
        text = self._text_embeddings([REFERENCE_PROMPT], 512, self._execution_device, self.transformer.dtype)
        cond = self._capture_features(pixels, seed, text)
        if uncond is None:
            uncond = self._capture_features(torch.zeros_like(pixels), seed, text)
        return ReferenceFeatures(cond, uncond, seed, self.base_fingerprint, adapters.fingerprint)

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
        return randn_tensor(
            shape, generator=generator, device=device or self._execution_device, dtype=torch.float32
        )

    def _check_identity(self, identity: IdentityTokens) -> None:
        adapters = self.adapters
        expected_dim = adapters.identity_layers.config.identity_dim
        if identity.variant != adapters.variant or identity.token_dim != expected_dim:
            raise ModelInputError(
                f"identity tokens were made for a {identity.variant} adapter ({identity.token_dim}-d), "
                f"this pipeline runs {adapters.variant} ({expected_dim}-d)"
            )
        if (
            identity.adapter_fingerprint
            and adapters.fingerprint
            and identity.adapter_fingerprint != adapters.fingerprint
        ):
            raise ModelInputError(
                f"identity tokens come from other adapter weights ({identity.adapter_fingerprint}, "
                f"loaded: {adapters.fingerprint}); encode the face again with this pipeline"
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

    def _predict(self, latents, timestep, text, state: AdapterState | None, cache_name: str) -> torch.Tensor:
        use = self.adapters.runtime.use(state) if state is not None else nullcontext()
        with use, self.transformer.cache_context(cache_name):
            return self.transformer(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]

    @property
    def interrupt(self) -> bool:
        return self._interrupt

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
        reference: ReferenceFeatures | None = None,
        output_type: Literal["np", "pil", "pt", "latent"] = "np",
        return_dict: bool = True,
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
            ref_image / reference: full only; a 256x256 aligned face crop or its ``ReferenceFeatures``;
                None leaves the reference branch off.
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
            reference: one ``ReferenceFeatures`` shared by every video, or a list with one per video.
            output_type: "np" (float32 [0, 1]), "pil", "pt", or "latent" (normalised DiT latents).
            progress_callback: called after every step as ``(step_index, num_steps, timestep)``.
            progress: show the tqdm bar (configure it with ``set_progress_bar_config``).
            resume_from: a ``SamplingCheckpoint`` of this same generation (same inputs, seed, size,
                steps and settings; anything else raises ``CheckpointMismatchError`` before any step):
                the loop goes on after its last step and ends with the latents an uninterrupted call
                gives (bit for bit on the same device and dtype).
            checkpoint_callback: receives a ``SamplingCheckpoint`` (CPU copies) after every
                ``checkpoint_steps`` steps and after the last one; hand it to another thread to store.
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
        self._guidance_scale = guidance_scale
        self._interrupt = False
        do_guidance = guidance_scale > 1.0
        device = self._execution_device
        transformer_dtype = self.transformer.dtype

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
        prompt_embeds = prompt_embeds.to(device=device, dtype=transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=transformer_dtype)
        num_prompts = prompt_embeds.shape[0]
        num_videos_per_prompt = _videos_per_prompt(seeds, num_prompts, num_videos_per_prompt)
        batch_size = num_prompts * num_videos_per_prompt
        if num_videos_per_prompt > 1:
            # prompt-major order, as WanPipeline: [p0 v0, p0 v1, ..., p1 v0, ...]
            prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(
                    num_videos_per_prompt, dim=0
                )

        # 3. identity and reference, computed once for the whole generation
        cond_state = uncond_state = None
        reference_cond = reference_uncond = None
        if self.adapters is not None:
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
        three_pass = (
            do_guidance
            and self.variant == "full"
            and guidance_scale_id is not None
            and (cond_state.identity_on or cond_state.reference_on)
        )

        # 4. timesteps
        if self.sigma_schedule == "wan" and self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = wan_flow_sigmas(num_inference_steps, self.scheduler.config.num_train_timesteps)
            self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.scheduler.set_begin_index(0)

        # 5. initial noise: float32 from a CPU generator, as the reference does
        if seeds is not None and generator is not None:
            raise ModelInputError("pass either a list of seeds or a generator, not both")
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
                "guidance": [guidance_scale, guidance_scale_id if three_pass else None, ip_scale, ref_scale],
                "weights": [
                    self.variant,
                    self.base_fingerprint,
                    self.adapter_fingerprint,
                    str(transformer_dtype),
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
        with self._progress(progress, num_steps) as bar:
            bar.update(start)
            for i, t in enumerate(timesteps):
                if self.interrupt or i < start:
                    continue
                model_input = latents.to(transformer_dtype)
                timestep = t.expand(latents.shape[0])
                noise_cond = self._predict(model_input, timestep, prompt_embeds, cond_state, "cond")
                if not do_guidance:
                    noise_pred = noise_cond
                else:
                    noise_uncond = self._predict(
                        model_input, timestep, negative_prompt_embeds, uncond_state, "uncond"
                    )
                    if three_pass:
                        noise_id = self._predict(
                            model_input, timestep, negative_prompt_embeds, cond_state, "identity"
                        )
                        noise_pred = (
                            noise_uncond
                            + guidance_scale_id * (noise_id - noise_uncond)
                            + guidance_scale * (noise_cond - noise_id)
                        )
                    else:
                        noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                done = i + 1
                if checkpoint_callback is not None and (done % checkpoint_steps == 0 or done == num_steps):
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
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if progress_callback is not None:
                    progress_callback(i, num_steps, float(t))
                bar.update()

        # 7. decode
        frames = latents if output_type == "latent" else self.decode_latents(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        used = list(seeds) if seeds is not None else seed
        if not return_dict:
            return (frames, used)
        return LynxPipelineOutput(frames=frames, seed=used)
