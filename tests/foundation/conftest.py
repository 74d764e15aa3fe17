"""Fixtures for the foundation tests (tracking, store, retention, their CLI)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lynx.db.tracking import Tracker
from lynx.settings import LynxSettings
from lynx.store import ArtifactStore, StoredObject


@pytest.fixture
def tracker(tracking_settings: LynxSettings) -> Iterator[Tracker]:
    """A tracker on a fresh database at head, once per backend."""
    tracker = Tracker.from_settings(tracking_settings)
    yield tracker
    tracker.close()


@pytest.fixture
def subject_id(tracker: Tracker) -> int:
    return tracker.create_subject("Ada", consent_reference="release-form-001").id


def overwrite_bytes(store: ArtifactStore, stored: StoredObject, data: bytes) -> None:
    """Replace an object's bytes behind the store's back, keeping its recorded checksum (bit rot)."""
    from lynx.store.local import LocalArtifactStore
    from lynx.store.s3 import SHA256_METADATA, S3ArtifactStore

    if isinstance(store, LocalArtifactStore):
        (store.root / "objects" / stored.key).write_bytes(data)
    elif isinstance(store, S3ArtifactStore):
        import io

        store._client.put_object(
            store.bucket, stored.key, io.BytesIO(data), len(data), metadata={SHA256_METADATA: stored.sha256}
        )
    else:
        raise TypeError(type(store))
