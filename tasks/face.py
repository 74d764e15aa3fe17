"""Prefect task of the face stage: reference photo -> identity embedding and crops."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from lynx.faces import ReferenceFace, analyze_reference_photo
from lynx.settings import LynxSettings


@task(name="detect-and-embed", retries=0, persist_result=False)
def detect_and_embed(image_path: str | Path, settings: LynxSettings) -> ReferenceFace:
    """Detect the largest face of a local photo, embed it and make the ArcFace/reference crops.

    Input errors (no face, bad file) are ``InputError``s: retrying cannot fix them, so the task has
    no retries. ``persist_result`` is off because the result holds biometric data (an embedding,
    face crops) that must not land in Prefect's result store; callers keep what they need.
    """
    return analyze_reference_photo(image_path, settings)
