"""The JSON manifest written beside the deliverables.

It answers, for anyone who finds the files later: what is this (AI-generated, which job, model,
seed, prompt), how was it made (every generation and delivery setting, every input and asset with
its sha256, software versions) and are these the right bytes (every output with sha256 and size).
Output names are relative to the manifest's own location ("beside the files"), so the manifest
stays valid wherever the folder is copied; when the publish prefix is known each output also
carries the store ``key`` it was published under.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lynx.media.provenance import Provenance

SCHEMA = "lynx.deliverables/1"
AI_LABEL = "AI-generated"


def build_manifest(
    *,
    provenance: Provenance,
    delivery: dict[str, Any],
    assets: list[dict[str, Any]],
    source: dict[str, Any],
    video: dict[str, Any],
    poster: dict[str, Any],
    safety: dict[str, Any],
    software: dict[str, str],
    outputs: list[dict[str, Any]],
    candidates: dict[str, Any] | None = None,
) -> dict[str, Any]:
    manifest = {
        "schema": SCHEMA,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "title": provenance.title,
        "label": AI_LABEL,
        "job": {
            "job_id": provenance.job_id,
            "campaign": provenance.campaign,
            "subject_ref": provenance.subject_ref,
            "prompt": provenance.prompt,
            "negative_prompt": provenance.negative_prompt,
            "seed": provenance.seed,
        },
        "model": provenance.model.model_dump(mode="json"),
        "generation_settings": provenance.settings,
        "delivery_settings": delivery,
        "inputs": [item.model_dump(mode="json") for item in provenance.inputs],
        "assets": assets,
        "source": source,
        "video": video,
        "poster": poster,
        "safety": safety,
        "software": software,
        "outputs": outputs,
    }
    if provenance.subject:
        manifest["subject"] = provenance.subject
    if candidates:
        manifest["candidates"] = candidates
    return manifest


def write_manifest(manifest: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path
