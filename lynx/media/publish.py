"""Upload verified deliverables to the artifact store: all of them or none.

Files go up in manifest order with the manifest itself last, so a reader that finds the manifest
finds everything it lists. Before each upload the local file is hashed again (it must still be
the verified bytes); after it, the store's own record of the object must show the manifest's
sha256 and size. Any failure deletes what this call uploaded and raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from lynx.media.deliver import DeliveryResult
from lynx.media.errors import PublishError
from lynx.media.provenance import sha256_file

logger = logging.getLogger(__name__)


class StoredObjectLike(Protocol):
    key: str
    sha256: str
    size: int


class ArtifactStoreLike(Protocol):
    """The part of ``lynx.store``'s interface that publishing needs."""

    def put_file(self, path: Path, *, key: str | None = None, content_type: str | None = None) -> Any: ...

    def stat(self, key: str) -> Any: ...

    def delete(self, key: str) -> None: ...


def deliverable_prefix(campaign: str | None, job_id: str) -> str:
    """The conventional key prefix of a job's deliverables: ``deliverables/<campaign>/<job_id>``."""
    return f"deliverables/{campaign or 'adhoc'}/{job_id}"


def publish_deliverables(result: DeliveryResult, store: ArtifactStoreLike, *, prefix: str) -> list[Any]:
    """Upload every verified file as ``<prefix>/<name>`` (manifest last); returns the stored objects."""
    prefix = prefix.strip("/")
    if not prefix:
        raise PublishError("publishing needs a non-empty key prefix")
    listed = {entry["name"]: entry for entry in result.manifest["outputs"]}
    files = [f for f in result.files if f.kind != "manifest"] + [
        f for f in result.files if f.kind == "manifest"
    ]
    if len(files) != len(listed) + 1 or any(f.kind != "manifest" and f.name not in listed for f in files):
        raise PublishError(
            "the delivery result and its manifest list different files; rebuild the deliverables"
        )
    misplaced = [e["key"] for e in listed.values() if "key" in e and e["key"] != f"{prefix}/{e['name']}"]
    if misplaced:
        raise PublishError(
            f"the manifest places {misplaced[0]} elsewhere than prefix {prefix!r}; "
            "rebuild the deliverables for this prefix"
        )
    uploaded: list[str] = []
    stored: list[Any] = []
    try:
        for item in files:
            expected = listed.get(item.name, {"sha256": item.sha256, "size": item.size})
            if sha256_file(item.path) != expected["sha256"]:
                raise PublishError(f"{item.name} changed on disk after verification; not publishing")
            key = f"{prefix}/{item.name}"
            obj = store.put_file(item.path, key=key, content_type=item.content_type)
            uploaded.append(key)
            remote = store.stat(key)
            if (remote.sha256, remote.size) != (expected["sha256"], expected["size"]):
                raise PublishError(
                    f"stored {key} has sha256 {remote.sha256} and {remote.size} bytes; "
                    f"the manifest says {expected['sha256']} and {expected['size']} bytes"
                )
            stored.append(obj)
            logger.info("published %s (%d bytes)", key, item.size)
    except BaseException:
        withdraw(store, reversed(uploaded))
        raise
    return stored


def withdraw(store: ArtifactStoreLike, keys: Iterable[str]) -> list[str]:
    """Delete ``keys`` from the store, going on past any that fail; returns the keys it deleted.

    Runs while another error is on its way up: a failure here is logged, never raised, so that error
    stays the one reported and one stuck file does not keep the others published.
    """
    deleted = []
    for key in keys:
        try:
            store.delete(key)
        except Exception:
            logger.warning("could not remove %s from the artifact store", key, exc_info=True)
        else:
            deleted.append(key)
    return deleted
