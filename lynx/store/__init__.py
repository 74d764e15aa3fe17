"""Artifact store: one interface (``ArtifactStore``) over a local folder and S3/MinIO.

store = open_store(settings)
obj = store.put_file("video.mp4")          # key "sha256/ab/ab12...", sha256 verified on read
store.get_file(obj.key, "out/video.mp4")
"""

from __future__ import annotations

from lynx.settings import LynxSettings
from lynx.store.base import ArtifactStore, StoredObject, content_key, validate_key

__all__ = ["ArtifactStore", "StoredObject", "content_key", "open_store", "validate_key"]


def open_store(settings: LynxSettings) -> ArtifactStore:
    """The store ``settings`` point at (``LYNX_STORE_BACKEND``); nothing is contacted yet."""
    if settings.store_backend == "s3":
        from lynx.store.s3 import S3ArtifactStore

        return S3ArtifactStore(settings)
    from lynx.store.local import LocalArtifactStore

    return LocalArtifactStore(settings.resolved_artifacts_dir)
