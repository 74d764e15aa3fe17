"""Stage "deliver": lossless intermediate in, verified and published deliverables out.

``deliver_video`` only composes plain functions of ``lynx.media`` (each tested on its own): read the
intermediate the decode stage wrote, build and verify the deliverables, publish them, drop the
local staging copy. It returns a small summary (keys, checksums, safety verdict, step timings)
that is cheap to persist as a Prefect result.

``deliver_stage`` is the pipeline's stage around it: it fetches the job's intermediate from the
artifact store, scores the face resemblance of sampled frames (which also picks the poster),
publishes, records every published file as an artifact of the job and completes the job, or,
when the quality gate (``lynx.evaluation.gate``) finds the video does not resemble its subject,
holds it for review (status ``needs_review``, files kept). If
anything fails after publishing, the published files are removed again: a failed job never leaves
a deliverable behind.

**Best of N.** A job with several candidates has one intermediate per candidate. They are scored
here, on the CPU pool, with the quality gate's recogniser (``LYNX_QUALITY_GATE_RECOGNIZER``, the
first of ``LYNX_EVAL_RECOGNIZERS``): the mean cosine between the subject (its photos' fused
embedding) and the faces of every ``LYNX_EVAL_FRAME_STRIDE``-th frame. The best becomes the master
(ties and faceless candidates: the lowest seed); the others are delivered under ``candidates/``
or dropped (``LYNX_DELIVER_CANDIDATES``). Every candidate's seed and score go into the manifest.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from lynx.db.models import ArtifactKind, JobStatus
from lynx.db.tracking import StageRecorder
from lynx.evaluation.gate import gate_job
from lynx.evaluation.metrics import evaluate_video, subject_reference_embeddings
from lynx.evaluation.recognizers import EvaluationModels, cached_evaluation_models
from lynx.faces import cached_face_analyzer
from lynx.faces.similarity import iter_video_frames, video_face_similarity
from lynx.jobs import CandidateVideo, JobTicket
from lynx.media.deliver import Candidate, CandidateSet, build_deliverables
from lynx.media.errors import DeliveryInputError
from lynx.media.intermediate import iter_frames, lossless_info
from lynx.media.provenance import InputArtifact, ModelInfo, Provenance
from lynx.media.publish import deliverable_prefix, publish_deliverables, withdraw
from lynx.media.safety import SafetyVerdict
from lynx.media.spec import DeliverySpec, Upscaled
from lynx.store import StoredObject
from tasks.face import load_embedding
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import run_stage

log = logging.getLogger(__name__)


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


def deliver_intermediate(
    intermediate: Path,
    *,
    spec: DeliverySpec,
    provenance: Provenance,
    store: Any,
    prefix: str | None = None,
    face_scores: Sequence[float | None] | None = None,
    workdir: Path | None = None,
    upscaled_by: Upscaled | None = None,
    candidates: CandidateSet | None = None,
) -> DeliverySummary:
    """Build, verify and publish the deliverables of one intermediate video.

    ``upscaled_by``: the learned upscale the decode stage already applied to the intermediate.
    ``candidates``: a best-of-N job's candidates, ``intermediate`` being the chosen one's.
    """
    source = lossless_info(intermediate)
    if source.fps != spec.source_fps:  # the file knows the model's native rate best
        spec = DeliverySpec(**{**spec.model_dump(), "source_fps": source.fps})
    workdir = Path(workdir or Path(tempfile.gettempdir()) / "lynx-delivery")
    prefix = (prefix or deliverable_prefix(provenance.campaign, provenance.job_id)).strip("/")
    result = build_deliverables(
        iter_frames(intermediate),
        spec=spec,
        workdir=workdir,
        provenance=provenance,
        face_scores=face_scores,
        prefix=prefix,
        upscaled_by=upscaled_by,
        candidates=candidates,
    )
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


# No caching: the inputs include a store client, and re-running must re-verify what is uploaded.
deliver_video = task(name="deliver-video", cache_policy=NONE, retries=0)(deliver_intermediate)


# --- the pipeline stage ---------------------------------------------------------------------------
_ARTIFACT_KIND = {
    "master": ArtifactKind.VIDEO,
    "rendition": ArtifactKind.VIDEO,
    "poster": ArtifactKind.PREVIEW,
    "preview": ArtifactKind.PREVIEW,
    "contact_sheet": ArtifactKind.PREVIEW,
    "candidate": ArtifactKind.VIDEO,
    "manifest": ArtifactKind.MANIFEST,
}
# Faces are looked for in at most this many evenly spaced frames (resemblance score, poster choice).
SIMILARITY_FRAMES = 16


def face_scores(video: Path, embedding_key: str, frames: int) -> tuple[list[float | None], float | None]:
    """Per-frame resemblance to the reference (None where not scored or no face) and its mean.

    A reference embedded by another recogniser than the one configured now (LYNX_EMBEDDING_BACKEND or
    LYNX_FACE_RECOGNIZER changed since the face stage) is not comparable: nothing is scored, the
    poster falls back to the middle frame and the similarity is recorded as unknown, with a warning.
    The video itself is fine, so the job is not failed for it.
    """
    svc = services()
    with tempfile.TemporaryDirectory(dir=svc.workdir("faces")) as scratch:
        local = Path(scratch) / "embedding.npz"
        svc.store.get_file(embedding_key, local)
        stored = load_embedding(local)
    analyzer = cached_face_analyzer(svc.settings)
    if stored["model"] != analyzer.embedder.name:
        log.warning(
            "reference %s was embedded by recogniser %r, not the configured %r (LYNX_EMBEDDING_BACKEND, "
            "LYNX_FACE_RECOGNIZER): face similarity not scored, poster is the middle frame",
            embedding_key,
            stored["model"],
            analyzer.embedder.name,
        )
        return [None] * frames, None
    stride = max(1, -(-frames // SIMILARITY_FRAMES))
    similarity = video_face_similarity(iter_video_frames(video, stride), stored["embedding"], analyzer)
    scores: list[float | None] = [None] * frames
    for index, score in enumerate(similarity.per_frame):
        if index * stride < frames:
            scores[index * stride] = score
    return scores, similarity.mean


def score_candidates(photo_keys: Sequence[str], videos: Sequence[Path]) -> tuple[str, list[float | None]]:
    """Each video's identity score against the subject, by the quality gate's recogniser.

    The subject is the normalised mean of its photos' embeddings (its one photo's, for one); the
    photos are read into memory, never written here. Returns the metric's description and the
    scores (None for a video in which no sampled frame shows a face).
    """
    svc = services()
    models = cached_evaluation_models(svc.settings)
    name = models.resolve(svc.settings.quality_gate_recognizer)
    gate = EvaluationModels(models.detector, {name: models.recognizers[name]}, {name: models.specs[name]}, {})
    photos = [svc.store.get_bytes(key) for key in photo_keys]
    references = subject_reference_embeddings(photos, gate, svc.settings)
    stride = svc.settings.eval_frame_stride
    scores = [evaluate_video(v, references, gate, stride=stride).by_recognizer[name].mean for v in videos]
    metric = f"mean cosine with the subject by {name}, every {stride}. frame (the quality gate's metric)"
    return metric, [None if score is None else round(float(score), 4) for score in scores]


def best_candidate(scores: Sequence[float | None]) -> int:
    """The index of the highest score; a face beats no face, ties go to the earlier (lower) seed."""
    return max(range(len(scores)), key=lambda i: (scores[i] is not None, scores[i] or 0.0, -i))


def _subject_record(ticket: JobTicket) -> dict[str, Any]:
    """The manifest's ``subject``: every photo by sha256, its scores and what it was used for."""
    face = ticket.face
    if face is None or not face.photos:
        return {}
    photos = []
    for index, photo in enumerate(face.photos):
        used = ["identity"] if face.fusion != "best" or index == face.reference_photo else []
        if index == face.reference_photo:
            used.append("reference")
        photos.append({**photo.model_dump(mode="json", exclude={"key"}), "used_for": used})
    return {
        "ref": ticket.subject_ref,
        "fusion": face.fusion,
        "reference_photo": face.reference_photo,
        "embedding_model": face.embedding_model,
        "photos": photos,
    }


def _provenance(ticket: JobTicket, intermediate: StoredObject, seed: int) -> Provenance:
    video = ticket.video
    return Provenance(
        job_id=str(ticket.job_id),
        campaign=ticket.campaign,
        subject_ref=ticket.subject_ref,
        prompt=ticket.prompt,
        negative_prompt=ticket.settings.negative_prompt or "",
        seed=seed,
        model=ModelInfo(
            variant=video.variant or "full",
            version=video.model_version or "unknown",
            loras=tuple(video.loras),
            step_cache=video.step_cache,
        ),
        settings=ticket.settings.model_dump(mode="json"),
        inputs=(InputArtifact(key=intermediate.key, sha256=intermediate.sha256, role="intermediate_video"),),
        subject=_subject_record(ticket),
    )


def deliver_job(ticket: JobTicket, recorder: StageRecorder) -> JobTicket:
    """Publish the job's deliverables, record them and complete the job (or publish nothing)."""
    svc = services()
    video = ticket.video
    if video is None or video.intermediate_key is None:
        raise DeliveryInputError(f"job {ticket.job_id} has no decoded video to deliver")
    spec = DeliverySpec.from_settings(svc.settings, source_fps=video.fps or 16)
    only = CandidateVideo(seed=ticket.settings.seed, intermediate_key=video.intermediate_key)
    items = video.candidates or [only]
    with tempfile.TemporaryDirectory(dir=svc.workdir("deliver")) as scratch:
        paths = [Path(scratch) / f"candidate-{index}.mkv" for index in range(len(items))]
        stored = [svc.store.get_file(item.intermediate_key, paths[i]) for i, item in enumerate(items)]
        chosen, candidates, scoring = 0, None, 0.0
        if len(items) > 1:
            started = time.monotonic()
            metric, scores = score_candidates(ticket.photo_keys, paths)
            scoring = time.monotonic() - started
            chosen = best_candidate(scores)
            candidates = CandidateSet(
                metric=metric,
                items=[
                    Candidate(seed=item.seed, score=score, chosen=index == chosen, source=path)
                    for index, (item, score, path) in enumerate(zip(items, scores, paths, strict=True))
                ],
            )
        local = paths[chosen]
        scores, similarity = face_scores(local, ticket.face.embedding_key, lossless_info(local).frames)
        summary = deliver_intermediate(
            local,
            spec=spec,
            provenance=_provenance(ticket, stored[chosen], items[chosen].seed),
            store=svc.store,
            prefix=deliverable_prefix(ticket.campaign, str(ticket.job_id)),
            face_scores=scores,
            workdir=Path(scratch),
            upscaled_by=video.upscaled,
            candidates=candidates,
        )
    recorded: dict[str, int] = {}  # key -> artifact row id
    try:
        files = [
            (StoredObject(f.key, f.sha256, f.size, f.content_type), _ARTIFACT_KIND[f.kind])
            for f in summary.files
        ]
        recorded = {row.key: row.id for row in svc.tracker.record_job_outputs(files, job_id=ticket.job_id)}
        # Quality gate (LYNX_QUALITY_GATE_THRESHOLD): a video that does not look like its subject is
        # held for review (job -> needs_review, files kept for the reviewer) instead of completed.
        verdict = gate_job(ticket.job_id, settings=svc.settings, tracker=svc.tracker, store=svc.store)
        if not verdict.needs_review:
            svc.tracker.transition_job(ticket.job_id, JobStatus.COMPLETED)
    except BaseException:
        _withdraw(ticket.job_id, [published.key for published in reversed(summary.files)], recorded)
        raise
    recorder.output_keys += [published.key for published in summary.files]
    recorder.metrics.update(
        master_key=summary.master_key,
        manifest_key=summary.manifest_key,
        similarity=similarity,
        safety=summary.safety.status,
        timings=summary.timings,
        quality_gate=verdict.to_dict(),
    )
    if candidates is not None:
        recorder.metrics.update(
            seed=candidates.chosen.seed,
            score=candidates.chosen.score,
            candidates=[{"seed": item.seed, "score": item.score} for item in candidates.items],
            scoring_seconds=round(scoring, 3),
        )
    return ticket.model_copy(update={"status": "needs_review" if verdict.needs_review else "completed"})


def _withdraw(job_id: int, keys: Sequence[str], recorded: dict[str, int]) -> None:
    """Delete a job's published files and mark their rows deleted, as far as the services let us.

    Like ``withdraw``, this logs a failure and never raises: the job's error stays the real cause.
    """
    svc = services()
    deleted = withdraw(svc.store, keys)  # a job that did not complete leaves no deliverable
    # nor a row pointing at a deleted file; a file still there keeps its live row (and the log names it)
    rows = [recorded[key] for key in deleted if key in recorded]
    try:
        svc.tracker.mark_artifacts_deleted(rows)
    except Exception:
        log.warning("job %s: artifact rows %s not marked deleted", job_id, rows, exc_info=True)


@task(name="deliver", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def deliver_stage(ticket: JobTicket) -> JobTicket:
    """Encode, verify and publish one job's deliverables (stage row 'deliver').

    Upscaled here only with Lanczos (in the encode) or when the decode stage did not already do it.
    """
    inputs = [ticket.video.intermediate_key] if ticket.video and ticket.video.intermediate_key else []
    return run_stage(ticket, "deliver", lambda recorder: deliver_job(ticket, recorder), inputs=inputs)
