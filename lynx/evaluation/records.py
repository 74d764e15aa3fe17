"""Evaluation metrics in the tracking database (table ``evaluations``).

One row per (video bytes, reference bytes, recogniser, stride): evaluating the same pair again
updates the row (idempotent), and a later run finds it and skips the work unless the detector
or recogniser setup changed. No embedding is ever written here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from lynx.db.models import Evaluation, utcnow
from lynx.db.tracking import Tracker
from lynx.faces.similarity import FaceSimilarity


def stored_metrics(
    tracker: Tracker,
    *,
    video_sha256: str,
    reference_sha256: str,
    stride: int,
    setups: Mapping[str, dict[str, Any]],
) -> dict[str, FaceSimilarity] | None:
    """The stored metrics of every recogniser in ``setups`` (by name), or None if any is missing
    or was measured with another setup."""
    query = select(Evaluation).where(
        Evaluation.video_sha256 == video_sha256,
        Evaluation.reference_sha256 == reference_sha256,
        Evaluation.stride == stride,
        Evaluation.recognizer.in_(list(setups)),
    )
    with tracker.transaction() as session:
        rows = {row.recognizer: row for row in session.scalars(query)}
    if set(rows) != set(setups) or any(rows[name].setup != setups[name] for name in setups):
        return None
    return {name: _similarity(rows[name]) for name in setups}


def save_metrics(
    tracker: Tracker,
    *,
    video: str,
    video_sha256: str,
    reference_sha256: str,
    stride: int,
    metrics: Mapping[str, FaceSimilarity],
    setups: Mapping[str, dict[str, Any]],
    job_id: int | None = None,
    duration_s: float | None = None,
) -> None:
    """Insert or update one row per recogniser, all in one transaction."""
    for _ in range(2):  # a second round only if another worker inserted the same rows meanwhile
        try:
            with tracker.transaction() as session:
                for name, result in metrics.items():
                    key = (video_sha256, reference_sha256, name, stride)
                    row = session.scalar(
                        select(Evaluation).where(
                            Evaluation.video_sha256 == key[0],
                            Evaluation.reference_sha256 == key[1],
                            Evaluation.recognizer == key[2],
                            Evaluation.stride == key[3],
                        )
                    )
                    if row is None:
                        row = Evaluation(
                            video_sha256=video_sha256,
                            reference_sha256=reference_sha256,
                            recognizer=name,
                            stride=stride,
                        )
                        session.add(row)
                    row.job_id = job_id if job_id is not None else row.job_id
                    row.video = video
                    row.mean, row.std, row.min, row.max = result.mean, result.std, result.min, result.max
                    row.frames_sampled = result.frames_total
                    row.frames_with_face = result.frames_with_face
                    row.face_share = result.face_share
                    row.per_frame = list(result.per_frame)
                    row.setup = dict(setups[name])
                    row.duration_s = duration_s
                    row.updated_at = utcnow()
            return
        except IntegrityError:
            continue
    raise RuntimeError(f"could not record the evaluation of {video} (rows kept changing under us)")


def _similarity(row: Evaluation) -> FaceSimilarity:
    return FaceSimilarity(
        mean=row.mean,
        std=row.std,
        min=row.min,
        max=row.max,
        frames_total=row.frames_sampled,
        frames_with_face=row.frames_with_face,
        face_share=row.face_share,
        per_frame=list(row.per_frame),
    )
