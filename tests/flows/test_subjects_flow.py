"""Subjects with several photos and best-of-N candidates, through the real flows.

Real faces (the demo face pack, the astronaut in two shots, Tom Hanks), the tiny random model,
PostgreSQL and S3. The tiny model paints noise, so where the choice of a candidate must be seen
with real faces, the VAE decode is handed real face frames for each candidate (everything else,
scoring included, is the production path).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from lynx.db.models import JobStatus
from tasks.services import services
from tests.flows.conftest import TINY_SETTINGS, run_lynx


def _manifest(outcome) -> dict:
    return json.loads(services().store.get_bytes(outcome.manifest_key))


def _stage(job_id: int, stage: str):
    return next(run for run in services().tracker.stage_runs(job_id) if run.stage == stage)


def test_two_photos_of_one_person_make_one_fused_identity(flow_env, photos, second_shot):
    flow_env()
    images = [str(photos["astronaut"]), str(second_shot)]
    outcome = run_lynx(images, "a woman smiling at the camera", settings=TINY_SETTINGS, subject_id="eileen")
    svc = services()
    assert outcome.status == "completed", outcome.error_text

    subject = svc.tracker.find_subject("eileen")
    assert [photo["key"] for photo in subject.photo_list] == [
        svc.store.put_file(Path(image)).key for image in images
    ]
    reference_rows = svc.tracker.list_artifacts(subject_id=subject.id, kind="reference_photo")
    assert sorted(row.key for row in reference_rows) == sorted(photo["key"] for photo in subject.photo_list)

    face = _stage(outcome.job_id, "face").metrics
    assert face["fusion"] == "fuse" and face["reference_photo"] == 0  # the original: larger, frontal
    assert [len(photo["sha256"]) for photo in face["photos"]] == [64, 64]
    assert all(photo["consistency"] > 0.7 and photo["similarity"] > 0.9 for photo in face["photos"])
    assert "embedding" not in face and "kps" not in face  # scores only, no biometrics

    # the identity the GPU stages conditioned on is a stored file of its own: neither photo's
    reference = _stage(outcome.job_id, "reference")
    per_photo = {row.key for row in svc.tracker.list_artifacts(job_id=outcome.job_id, kind="face_embedding")}
    assert len(per_photo) == 3 and reference.input_keys[0] in per_photo  # two photos + the fused one

    manifest = _manifest(outcome)["subject"]
    assert manifest["fusion"] == "fuse" and manifest["embedding_model"] == "sface_2021dec"
    assert [photo["sha256"] for photo in manifest["photos"]] == [
        photo["sha256"] for photo in subject.photo_list
    ]
    assert [photo["used_for"] for photo in manifest["photos"]] == [["identity", "reference"], ["identity"]]
    assert all(photo["reference_score"] > 0 for photo in manifest["photos"])

    # the same photos again: nothing is analysed again, the job is found
    again = run_lynx(images, "a woman smiling at the camera", settings=TINY_SETTINGS, subject_id="eileen")
    assert again.job_id == outcome.job_id and again.earlier


def test_a_photo_of_another_person_fails_the_job_at_the_face_stage(flow_env, photos):
    flow_env()
    images = [str(photos["astronaut"]), str(photos["hanks"])]
    outcome = run_lynx(images, "a woman smiling at the camera", settings=TINY_SETTINGS)

    assert outcome.status == "failed" and outcome.error_stage == "face"
    assert outcome.error_text.startswith(
        "photo 2 of 2 (hanks.jpg) does not show the same person as the other photos: cosine 0.1"
    )
    assert "below the same-person threshold 0.363 of sface_2021dec" in outcome.error_text
    stages = [run.stage for run in services().tracker.stage_runs(outcome.job_id)]
    assert stages == ["submit", "face"]  # no GPU stage ran

    # a photo without a face is named too
    images = [str(photos["astronaut"]), str(photos["noface"])]
    outcome = run_lynx(images, "a woman smiling at the camera", settings=TINY_SETTINGS)
    assert outcome.status == "failed" and outcome.error_stage == "face"
    assert outcome.error_text.startswith("photo 2 of 2 (noface.jpg): no face found in the image")


def test_one_photo_keeps_the_job_identity_and_its_face_files(flow_env, photos):
    """N = 1 candidate and one photo behave exactly as before both existed."""
    from lynx.db.tracking import job_fingerprint

    flow_env()
    outcome = run_lynx(str(photos["astronaut"]), "a woman smiling at the camera", settings=TINY_SETTINGS)
    svc = services()
    job = svc.tracker.get_job(outcome.job_id)
    before = {"seed": 42, "frames": 5, "height": 64, "width": 64, "steps": 2, "guidance_scale": 5.0,
              "guidance_scale_id": 2.0, "ip_scale": 1.0, "ref_scale": 1.0, "variant": None}  # fmt: skip
    assert job.params == before
    assert job.fingerprint == job_fingerprint(job.subject_id, job.prompt, None, before)
    face = _stage(job.id, "face")
    assert "fusion" not in face.metrics and len(face.output_keys) == 3
    assert _stage(job.id, "reference").input_keys[0] == face.output_keys[0]  # the photo's own embedding
    assert _stage(job.id, "decode").output_keys == [f"intermediates/job-{job.id}/attempt-1.mkv"]
    manifest = _manifest(outcome)
    assert "candidates" not in manifest and manifest["job"]["seed"] == 42
    assert outcome.candidates == 1 and outcome.score is None


def test_candidates_are_sampled_scored_and_listed_in_the_manifest(flow_env, photos):
    flow_env(deliver_candidates="keep")
    settings = TINY_SETTINGS.model_copy(update={"candidates": 3, "seed": 7})
    outcome = run_lynx(str(photos["astronaut"]), "a woman smiling at the camera", settings=settings)
    svc = services()
    assert outcome.status == "completed", outcome.error_text

    sample = _stage(outcome.job_id, "sample")
    assert sample.metrics["seeds"] == [7, 8, 9] and sample.metrics["batches"] == [[7], [8], [9]]
    decode = _stage(outcome.job_id, "decode")
    stem = f"intermediates/job-{outcome.job_id}/attempt-1"
    assert decode.output_keys == [f"{stem}-seed-{seed}.mkv" for seed in (7, 8, 9)]
    assert len({svc.store.stat(key).sha256 for key in decode.output_keys}) == 3  # three different videos

    # the tiny model's noise has no face: every score is None, the lowest seed is the master
    manifest = _manifest(outcome)
    assert manifest["job"]["seed"] == 7 and manifest["candidates"]["chosen_seed"] == 7
    assert [(c["seed"], c["score"], c["chosen"]) for c in manifest["candidates"]["items"]] == [
        (7, None, True), (8, None, False), (9, None, False)
    ]  # fmt: skip
    assert "sface_2021dec" in manifest["candidates"]["metric"]
    kept = {f"candidates/seed-{seed}.mp4" for seed in (8, 9)}
    assert kept <= {output["name"] for output in manifest["outputs"]}
    prefix = outcome.master_key.rsplit("/", 1)[0]
    assert all(svc.store.exists(f"{prefix}/{name}") for name in kept)
    assert outcome.candidates == 3 and outcome.seed == 7 and outcome.score is None
    job = svc.tracker.get_job(outcome.job_id)
    assert job.params["candidates"] == 3 and job.status is JobStatus.COMPLETED


@pytest.fixture
def face_frames(photos, second_shot):
    """Decoded 'videos' for three candidates: another person, the subject, no face at all."""

    def frames(path: Path | None) -> np.ndarray:
        if path is None:
            image = (skimage.data.coffee()[:256, :256] / 255.0).astype(np.float32)
        else:
            rgb = cv2.imread(str(path))[..., ::-1]
            image = (cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA) / 255.0).astype(np.float32)
        return np.stack([image] * TINY_SETTINGS.frames)[None]

    return [frames(photos["hanks"]), frames(second_shot), frames(None)]


def test_the_master_is_the_candidate_most_like_the_subject(flow_env, photos, face_frames, monkeypatch):
    from lynx_model import LynxPipeline

    flow_env()
    decoded = iter(face_frames)
    monkeypatch.setattr(LynxPipeline, "decode_latents", lambda self, latents, output_type="np": next(decoded))
    settings = TINY_SETTINGS.model_copy(update={"candidates": 3})
    outcome = run_lynx(str(photos["astronaut"]), "a woman smiling at the camera", settings=settings)
    assert outcome.status == "completed", outcome.error_text

    items = _manifest(outcome)["candidates"]["items"]
    scores = {item["seed"]: item["score"] for item in items}
    assert scores[44] is None  # the coffee cup
    assert scores[43] > 0.7 > 0.3 > scores[42]  # the subject in another shot; another person
    assert [item["seed"] for item in items if item["chosen"]] == [43]
    assert outcome.seed == 43 and outcome.score == scores[43]
    assert _manifest(outcome)["job"]["seed"] == 43
    # the master is the chosen candidate's video: it resembles the subject
    assert outcome.similarity is not None and outcome.similarity > 0.7
    # dropped (the default): only the master's files are delivered
    prefix = outcome.master_key.rsplit("/", 1)[0]
    assert not [key for key in services().store.list(prefix + "/") if "/candidates/" in key]

    from tasks.report import outcome_rows

    [row] = outcome_rows([outcome])
    assert row["best of"] == 3 and row["seed"] == 43 and row["score"] == f"{scores[43]:.3f}"


def test_candidates_in_batches_are_the_candidates_one_by_one(flow_env, photos):
    from lynx.media.intermediate import iter_frames

    settings = TINY_SETTINGS.model_copy(update={"candidates": 3})
    videos = {}
    for batch in (0, 2):  # 0 on the CPU: one at a time
        flow_env(candidate_batch=batch)
        outcome = run_lynx(str(photos["astronaut"]), "a woman smiling at the camera", settings=settings)
        assert outcome.status == "completed", outcome.error_text
        sample = _stage(outcome.job_id, "sample").metrics
        assert sample["batches"] == ([[42], [43], [44]] if batch == 0 else [[42, 43], [44]])
        svc = services()
        videos[batch] = []
        for key in _stage(outcome.job_id, "decode").output_keys:
            local = Path(svc.workdir("test")) / key.rsplit("/", 1)[-1]
            svc.store.get_file(key, local)
            videos[batch].append(np.stack(list(iter_frames(local))).astype(np.int16))
    for one_by_one, batched in zip(videos[0], videos[2], strict=True):
        assert np.abs(one_by_one - batched).max() <= 1  # the same videos, to rounding
    assert np.abs(videos[0][0] - videos[0][1]).mean() > 5  # and different seeds differ


def test_the_batch_size_follows_the_free_gpu_memory(monkeypatch):
    from types import SimpleNamespace

    import torch

    from lynx.settings import LynxSettings
    from tasks.sample import candidate_batch_size

    weights = [torch.zeros(1000, dtype=torch.float32)]  # 4,000 bytes of DiT weights
    pipe = SimpleNamespace(
        _execution_device=torch.device("cuda", 0),
        activation_bytes_per_video=lambda height, width, frames: 1000,
        transformer=SimpleNamespace(parameters=lambda: iter(weights)),
    )
    model = SimpleNamespace(pipe=pipe)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10_000, 80_000))
    settings = TINY_SETTINGS.model_copy(update={"candidates": 8})

    def size(**overrides) -> int:
        return candidate_batch_size(model, settings, LynxSettings(_env_file=None, **overrides))

    assert size() == 9  # 90 % of 10,000 free bytes, 1,000 per video
    assert size(candidate_batch=4) == 4  # the setting caps it
    assert size(cpu_offload=True) == 5  # the DiT's 4,000 bytes come in for each forward
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (500, 80_000))
    assert size() == 1  # one video is always tried
    pipe._execution_device = torch.device("cpu")
    assert size() == 1 and size(candidate_batch=3) == 3


def test_candidates_with_a_recogniser_that_cannot_load_fail_at_submit(flow_env, photos):
    flow_env(eval_recognizers='["missing.onnx"]')
    settings = TINY_SETTINGS.model_copy(update={"candidates": 2})
    outcome = run_lynx(str(photos["astronaut"]), "a woman smiling at the camera", settings=settings)
    assert outcome.status == "failed" and outcome.error_stage == "submit"
    assert "missing.onnx" in outcome.error_text and "LYNX_EVAL_RECOGNIZERS" in outcome.error_text
    assert [run.stage for run in services().tracker.stage_runs(outcome.job_id)] == ["submit"]
