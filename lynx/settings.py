"""The one settings object of lynx.

Every value comes from the environment (prefix ``LYNX_``) or a ``.env`` file in the working
directory, and falls back to embedded defaults that need no server: a SQLite database and a local
artifact folder under ``LYNX_HOME``. Secrets are ``SecretStr`` so they never show up in reprs,
logs or Prefect parameters.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("lynx", appauthor=False))


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
    s3_part_size: int = Field(
        default=16 * 1024 * 1024, ge=5 * 1024 * 1024, description="Multipart upload part size in bytes."
    )
    s3_timeout: float = Field(default=10.0, gt=0, description="Seconds to wait when connecting to S3.")
    presign_expiry_seconds: int = Field(
        default=24 * 3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned download URLs."
    )

    # --- models ------------------------------------------------------------------------------
    models_dir: Path | None = Field(
        default=None, description="Folder of local model files (face packs, upscalers, classifiers). "
        "Default: LYNX_HOME/models."
    )

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
        default="native",
        description="diffusers attention backend for the DiT: 'native' (PyTorch SDPA), 'flash' "
        "(flash-attn 2, CUDA, install the 'flash' extra), '_native_cudnn', 'sage', ...",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator("home", "artifacts_dir", "models_dir", "base_model_path", "adapter_path", mode="after")
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
    def resolved_base_model_path(self) -> Path:
        return self.base_model_path or self.resolved_models_dir / "Wan2.1-T2V-14B-Diffusers"

    @property
    def resolved_adapter_path(self) -> Path:
        default = "lynx_lite" if self.model_variant == "lite" else "lynx_full"
        return self.adapter_path or self.resolved_models_dir / default

    @property
    def resolved_database_url(self) -> str:
        """The URL to connect with (contains the password: never log it, use ``database_url_for_display``)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.home / 'lynx.db'}"

    @property
    def database_url_for_display(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.resolved_database_url).render_as_string(hide_password=True)


@lru_cache(maxsize=1)
def get_settings() -> LynxSettings:
    """Settings read once per process; tests and the CLI pass explicit instances instead."""
    return LynxSettings()
