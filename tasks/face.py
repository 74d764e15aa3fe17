"""Stage "face": reference photo -> identity embedding and the two aligned crops.

``detect_and_embed`` works on a local photo and returns everything in memory (the CLI and the face
tests use it). ``face_stage`` is the pipeline's stage: it reads the photo from the artifact store,
and writes the embedding (with the detector's score and the recogniser's name), the 112x112 ArcFace
crop and the 256x256 reference crop back as biometric artifacts of the job. One analysis serves
every job of a subject: results are cached by the photo's sha256 and the face settings.
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
from lynx.faces import ReferenceFace, analyze_reference_photo
from lynx.faces.analyzer import face_models_fingerprint
from lynx.jobs import FaceOutputs, JobTicket
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


def extract_face(ticket: JobTicket) -> FaceOutputs:
    """The subject's face analysis as stored artifacts: computed on first use, then reused."""
    svc = services()
    photo = svc.store.stat(ticket.photo_key)
    key = face_cache_key(photo.sha256, svc.settings)

    @functools.cache
    def analysis() -> ReferenceFace:  # shared by the three files: the photo is analysed at most once
        return analyze_stored_photo(ticket.photo_key, svc.settings)

    def embedding_of() -> dict[str, Any]:
        face = analysis()
        return {
            "embedding": face.embedding,
            "det_score": float(face.score),
            "model": face.embedding_model,
            "box": face.box,
            "kps": face.kps,
            "faces_detected": len(face.faces),
        }

    embedding = get_or_compute(FACE_EMBEDDING, key, embedding_of, job_id=ticket.job_id)
    id_crop = get_or_compute(ID_CROP, key, lambda: analysis().arcface_crop, job_id=ticket.job_id)
    ref_crop = get_or_compute(REF_CROP, key, lambda: analysis().reference_crop, job_id=ticket.job_id)
    return FaceOutputs(
        embedding_key=embedding.stored.key,
        id_crop_key=id_crop.stored.key,
        ref_crop_key=ref_crop.stored.key,
        embedding_model=embedding.value["model"],
        embedding_dim=int(embedding.value["embedding"].shape[0]),
        det_score=embedding.value["det_score"],
        box=embedding.value["box"],
        faces_detected=embedding.value["faces_detected"],
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
        return ticket.model_copy(update={"face": face})

    return run_stage(ticket, "face", work, inputs=[ticket.photo_key])
