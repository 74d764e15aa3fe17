"""Stage "face": the subject's photos -> identity embedding and the two aligned crops.

``detect_and_embed`` works on a local photo and returns everything in memory (the CLI and the face
tests use it). ``face_stage`` is the pipeline's stage: it reads each photo from the artifact store,
and writes its embedding (with the detector's score and the recogniser's name), the 112x112 ArcFace
crop and the 256x256 reference crop back as biometric artifacts of the job. One analysis serves
every job of a subject: results are cached by the photo's sha256 and the face settings.

A subject with several photos (``lynx.faces.subject``): every photo is embedded, photos that do not
show the same person fail the job here (before any GPU time), the best photo gives the crops, and
the identity is the normalised mean of the embeddings (LYNX_FACE_FUSION=fuse, stored as its own
embedding file) or the best photo's (``best``). With one photo everything is as it always was.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import task
from prefect.cache_policies import NONE

from lynx.db.models import ArtifactKind
from lynx.errors import InputError
from lynx.faces import ReferenceFace, analyze_reference_photo
from lynx.faces.analyzer import face_models_fingerprint
from lynx.faces.subject import PhotoFace, SubjectIdentity, subject_identity
from lynx.jobs import FaceOutputs, JobTicket, SubjectPhoto
from lynx.settings import LynxSettings
from tasks.cache import CachedKind, cache_key, get_or_compute
from tasks.policy import retry_on_transient
from tasks.services import services
from tasks.tracking import run_stage


@task(name="detect-and-embed", retries=0, persist_result=False)
def detect_and_embed(image_path: str | Path, settings: LynxSettings) -> ReferenceFace:
    """Detect the largest face of a local photo, embed it and make the ArcFace/reference crops.

    Input errors (no face, bad file) are ``InputError``s: retrying cannot fix them, so the task has
    no retries. ``persist_result`` is off because the result holds biometric data (an embedding,
    face crops) that must not land in Prefect's result store; callers keep what they need.
    """
    return analyze_reference_photo(image_path, settings)


# --- stored forms ----------------------------------------------------------------------------------
def save_embedding(face: dict[str, Any], path: Path) -> None:
    np.savez(
        path,
        embedding=np.asarray(face["embedding"], dtype=np.float32),
        det_score=np.float32(face["det_score"]),
        model=np.array(face["model"]),
        box=np.asarray(face["box"], dtype=np.float32),
        kps=np.asarray(face["kps"], dtype=np.float32),
        faces_detected=np.int32(face["faces_detected"]),
    )


def load_embedding(path: Path) -> dict[str, Any]:
    """The stored embedding as ``{"embedding", "det_score", "model", "box", "kps", "faces_detected"}``
    (no pickles are read)."""
    with np.load(path, allow_pickle=False) as data:
        return {
            "embedding": data["embedding"].astype(np.float32),
            "det_score": float(data["det_score"]),
            "model": str(data["model"]),
            "box": [round(float(v), 1) for v in data["box"]],
            "kps": [[round(float(v), 1) for v in point] for point in data["kps"]],
            "faces_detected": int(data["faces_detected"]),
        }


def save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="PNG")


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


FACE_EMBEDDING = CachedKind("face", ArtifactKind.FACE_EMBEDDING, ".npz", save_embedding, load_embedding)
ID_CROP = CachedKind("id_crop", ArtifactKind.ID_CROP, ".png", save_png, load_png)
REF_CROP = CachedKind("ref_crop", ArtifactKind.REF_CROP, ".png", save_png, load_png)


def face_cache_key(photo_sha256: str, settings: LynxSettings) -> str:
    return cache_key(
        "face/2",
        photo_sha256,
        face_models_fingerprint(settings),
        settings.face_pack,
        settings.embedding_backend,
        settings.face_recognizer,
        settings.face_detector_size,
        settings.face_detection_threshold,
        settings.face_min_size,
    )


def analyze_stored_photo(photo_key: str, settings: LynxSettings) -> ReferenceFace:
    """Analyse the photo from memory: no copy of it is written anywhere on this worker."""
    photo = services().store.get_bytes(photo_key)
    return analyze_reference_photo(photo, settings)


class _Photo:
    """One photo of the job's subject: its analysis, computed at most once, and its stored results."""

    def __init__(self, key: str, label: str | None, job_id: int) -> None:
        svc = services()
        self.key, self.label, self.job_id = key, label, job_id
        self.stored = svc.store.stat(key)
        self.cache_key = face_cache_key(self.stored.sha256, svc.settings)

    @functools.cached_property
    def analysis(self) -> ReferenceFace:  # shared by the three files: the photo is analysed at most once
        try:
            return analyze_stored_photo(self.key, services().settings)
        except InputError as err:
            if self.label is None:  # the subject's one photo: the message says it all
                raise
            raise type(err)(f"{self.label}: {err.message}", setting=err.setting) from None

    @functools.cached_property
    def embedding(self) -> Any:
        def embedding_of() -> dict[str, Any]:
            face = self.analysis
            return {
                "embedding": face.embedding,
                "det_score": float(face.score),
                "model": face.embedding_model,
                "box": face.box,
                "kps": face.kps,
                "faces_detected": len(face.faces),
            }

        return get_or_compute(FACE_EMBEDDING, self.cache_key, embedding_of, job_id=self.job_id)

    def crop(self, kind: CachedKind) -> str:
        def make() -> Any:
            return self.analysis.arcface_crop if kind is ID_CROP else self.analysis.reference_crop

        return get_or_compute(kind, self.cache_key, make, job_id=self.job_id).stored.key

    def face(self) -> PhotoFace:
        value = self.embedding.value
        return PhotoFace(value["embedding"], value["det_score"], value["box"], value["kps"])


def _names(ticket: JobTicket) -> list[str]:
    """The photos as the request named them (their keys if it named others)."""
    same = len(ticket.photo_names) == len(ticket.photo_keys)
    return ticket.photo_names if same else ticket.photo_keys


def fused_embedding_key(photos: list[_Photo], identity: SubjectIdentity) -> str:
    """The fused identity depends on the photos' analyses, in order, and on how they were fused."""
    return cache_key("face-fused/1", [photo.cache_key for photo in photos], identity.fusion)


def extract_face(ticket: JobTicket) -> FaceOutputs:
    """The subject's face analysis as stored artifacts: computed on first use, then reused."""
    svc = services()
    names, count = _names(ticket), len(ticket.photo_keys)
    if not count:
        raise InputError(f"job {ticket.job_id}: its subject has no photo")
    photos = [
        _Photo(key, None if count == 1 else f"photo {i + 1} of {count} ({names[i]})", ticket.job_id)
        for i, key in enumerate(ticket.photo_keys)
    ]
    model = photos[0].embedding.value["model"]
    identity = subject_identity(
        [photo.face() for photo in photos],
        recognizer=model,
        fusion=svc.settings.face_fusion,
        thresholds=svc.settings.face_same_person_thresholds,
        names=names,
    )
    best = photos[identity.reference]
    embedding = best.embedding
    if len(photos) > 1 and identity.fusion == "fuse":
        fused = {**best.embedding.value, "embedding": identity.embedding}
        key = fused_embedding_key(photos, identity)
        embedding = get_or_compute(FACE_EMBEDDING, key, lambda: fused, job_id=ticket.job_id)
    value = best.embedding.value
    return FaceOutputs(
        embedding_key=embedding.stored.key,
        id_crop_key=best.crop(ID_CROP),
        ref_crop_key=best.crop(REF_CROP),
        embedding_model=value["model"],
        embedding_dim=int(value["embedding"].shape[0]),
        det_score=value["det_score"],
        box=value["box"],
        faces_detected=value["faces_detected"],
        photos=[
            SubjectPhoto(
                key=photo.key,
                sha256=photo.stored.sha256,
                det_score=photo.embedding.value["det_score"],
                reference_score=round(identity.reference_scores[i], 4),
                consistency=None if identity.consistency[i] is None else round(identity.consistency[i], 4),
                similarity=round(identity.similarity[i], 4),
            )
            for i, photo in enumerate(photos)
        ],
        reference_photo=identity.reference,
        fusion=identity.fusion if len(photos) > 1 else None,
    )


@task(name="face", cache_policy=NONE, persist_result=False, retry_condition_fn=retry_on_transient)
def face_stage(ticket: JobTicket) -> JobTicket:
    """Detect, align and embed the subject's face (stage row 'face'; the job fails here on no face)."""

    def work(recorder: Any) -> JobTicket:
        face = extract_face(ticket)
        recorder.output_keys += [face.embedding_key, face.id_crop_key, face.ref_crop_key]
        # which face of the photo was used and how sure the detector was (the largest one wins)
        recorder.metrics.update(
            det_score=face.det_score,
            box=face.box,
            faces_detected=face.faces_detected,
            embedding_model=face.embedding_model,
        )
        if len(face.photos) > 1:  # scores only: which photo gave the crops, how alike they are
            recorder.metrics.update(
                fusion=face.fusion,
                reference_photo=face.reference_photo,
                photos=[photo.model_dump(exclude={"key"}) for photo in face.photos],
            )
        return ticket.model_copy(update={"face": face})

    return run_stage(ticket, "face", work, inputs=ticket.photo_keys)
