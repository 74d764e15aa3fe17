"""Deliverables task: lossless intermediate in, verified and published deliverables out.

The task only composes plain functions of ``lynx.media`` (each tested on its own): read the
intermediate the decode stage wrote, build and verify the deliverables, publish them, drop the
local staging copy. It returns a small summary (keys, checksums, safety verdict, step timings)
that is cheap to persist as a Prefect result.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from lynx.media.deliver import build_deliverables
from lynx.media.intermediate import iter_frames, lossless_info
from lynx.media.provenance import Provenance
from lynx.media.publish import deliverable_prefix, publish_deliverables
from lynx.media.safety import SafetyVerdict
from lynx.media.spec import DeliverySpec


class PublishedFile(BaseModel):
    key: str
    kind: str
    content_type: str
    sha256: str
    size: int


class DeliverySummary(BaseModel):
    prefix: str
    files: list[PublishedFile]
    safety: SafetyVerdict
    timings: dict[str, float]

    @property
    def master_key(self) -> str:
        return next(f.key for f in self.files if f.kind == "master")

    @property
    def manifest_key(self) -> str:
        return next(f.key for f in self.files if f.kind == "manifest")


# No caching: the inputs include a store client, and re-running must re-verify what is uploaded.
@task(name="deliver-video", cache_policy=NONE, retries=0)
def deliver_video(
    intermediate: Path,
    *,
    spec: DeliverySpec,
    provenance: Provenance,
    store: Any,
    prefix: str | None = None,
    face_scores: Sequence[float | None] | None = None,
    workdir: Path | None = None,
) -> DeliverySummary:
    """Build, verify and publish the deliverables of one intermediate video."""
    source = lossless_info(intermediate)
    if source.fps != spec.source_fps:  # the file knows the model's native rate best
        spec = DeliverySpec(**{**spec.model_dump(), "source_fps": source.fps})
    workdir = Path(workdir or Path(tempfile.gettempdir()) / "lynx-delivery")
    result = build_deliverables(
        iter_frames(intermediate), spec=spec, workdir=workdir, provenance=provenance, face_scores=face_scores
    )
    prefix = prefix or deliverable_prefix(provenance.campaign, provenance.job_id)
    try:
        publish_deliverables(result, store, prefix=prefix)
    finally:
        result.cleanup()
    return DeliverySummary(
        prefix=prefix,
        files=[
            PublishedFile(
                key=f"{prefix}/{f.name}",
                kind=f.kind,
                content_type=f.content_type,
                sha256=f.sha256,
                size=f.size,
            )
            for f in result.files
        ],
        safety=result.safety,
        timings=result.timings,
    )
