"""Erasure of a subject the real pipeline made videos of: PostgreSQL, S3, the `lynx-erase` flow, the CLI.

After an erasure the whole store is listed: no object recorded for the subject is left but prompt
embeddings (made from text alone), no object holds the bytes of its photos, nothing lies under its
jobs' prefixes, and the other subject's objects are all there. An erasure killed midway (SIGKILL,
a real process) is finished by the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from flows.erase import lynx_erase
from lynx.db.models import Erasure
from tasks.services import services
from tests.conftest import REPO_ROOT
from tests.flows.conftest import TINY_SETTINGS, run_campaign, run_lynx

TEXT_ONLY = {"prompt_embeds"}


def _all_objects() -> dict[str, bytes]:
    store = services().store
    return {key: store.get_bytes(key, max_bytes=1 << 30) for key in store.list()}


def _keys_of(subject_id: int, include_deleted: bool = True) -> dict[str, str]:
    """Every key recorded for the subject or its jobs (also those deleted since), with its kind."""
    tracker = services().tracker
    rows = tracker.list_artifacts(subject_id=subject_id, include_deleted=include_deleted)
    for job in tracker.list_jobs(subject_id=subject_id):
        rows += tracker.list_artifacts(job_id=job.id, include_deleted=include_deleted)
    return {row.key: row.kind for row in rows}


def test_erasing_a_subject_leaves_no_object_of_it_and_refuses_new_jobs(
    flow_env, photos, second_shot, tmp_path
):
    flow_env(quality_gate_threshold=0.5, deliver_candidates="keep")
    campaign = {
        "name": "erasure",
        "settings": {**TINY_SETTINGS.model_dump(exclude_unset=True), "candidates": 2},
        "subjects": [
            {
                "id": "eileen",
                "photos": [str(photos["astronaut"]), str(second_shot)],
                "consent_reference": "t",
            },
            {"id": "tom", "photo": str(photos["hanks"]), "consent_reference": "t"},
        ],
        "prompts": ["a person smiling at the camera"],
    }
    path = tmp_path / "erasure.yaml"
    path.write_text(yaml.safe_dump(campaign))
    outcomes = run_campaign(str(path))
    assert [outcome.status for outcome in outcomes] == ["needs_review", "needs_review"]  # noise: no face
    svc = services()
    eileen, tom = svc.tracker.find_subject("eileen"), svc.tracker.find_subject("tom")
    # his: what is stored for him now (his sampling checkpoints went when his videos were stored)
    hers, his = _keys_of(eileen.id), _keys_of(tom.id, include_deleted=False)
    assert {"reference_photo", "face_embedding", "identity_tokens", "reference_features", "frames"} <= set(
        hers.values()
    )
    photo_bytes = [photos["astronaut"].read_bytes(), second_shot.read_bytes()]
    before = _all_objects()

    receipt = lynx_erase("eileen", with_deliverables=True)

    after = _all_objects()
    left = {key for key in hers if key in after}
    assert {hers[key] for key in left} <= TEXT_ONLY  # nothing else recorded for her is left
    assert not any(data in photo_bytes for data in after.values())
    [job] = svc.tracker.list_jobs(subject_id=eileen.id)
    assert not [key for key in after if f"/job-{job.id}/" in key or f"/erasure/{job.id}/" in key]
    assert all(key in after for key in his)  # tom's objects are all there
    assert set(before) - set(after) == set(receipt.removed_keys)
    assert set(after) - set(before) == {receipt.receipt_key}
    assert {"reference_photo", "face_embedding", "id_crop", "ref_crop", "identity_tokens"} <= set(
        receipt.removed_by_kind
    )
    assert receipt.kept_deliverables == [] and receipt.with_deliverables

    rows = svc.tracker.list_artifacts(subject_id=eileen.id, include_deleted=True)
    assert {row.kind for row in rows} <= TEXT_ONLY
    runs = {run.stage: run for run in svc.tracker.stage_runs(job.id)}
    assert runs["face"].metrics == {} and "similarity" not in runs["deliver"].metrics

    # a new job for her is refused, and her photo is not stored again
    refused = run_lynx(str(photos["astronaut"]), "a new video", settings=TINY_SETTINGS, subject_id="eileen")
    day = f"{svc.tracker.find_subject('eileen').erased_at:%Y-%m-%d}"
    assert refused.status == "failed" and refused.error_stage == "submit" and refused.job_id is None
    assert refused.error_text == f"subject eileen was erased on {day}"
    assert not any(data in photo_bytes for data in _all_objects().values())
    # so is a re-run of the campaign, for her; tom's job is found as it was
    again = run_campaign(name="erasure")
    assert [(o.subject, o.status) for o in again] == [("eileen", "failed"), ("tom", "needs_review")]
    assert lynx_erase("eileen").already_erased


def test_an_erasure_killed_midway_is_finished_by_the_next_run(flow_env, photos, lynx_cli):
    flow_env()
    outcome = run_lynx(
        str(photos["astronaut"]), "a woman smiling", settings=TINY_SETTINGS, subject_id="eileen"
    )
    assert outcome.status == "completed", outcome.error_text
    svc = services()
    subject = svc.tracker.find_subject("eileen")
    photo_bytes = photos["astronaut"].read_bytes()

    # the erasure, in a process of its own, killed by SIGKILL right after its third delete
    script = (
        "import os, signal\n"
        "from lynx.erasure import erase_subject\n"
        "from lynx.settings import get_settings\n"
        "from lynx.store import open_store\n"
        "settings = get_settings()\n"
        "store = open_store(settings)\n"
        "delete, done = store.delete, []\n"
        "def dying_delete(key):\n"
        "    if len(done) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    delete(key)\n"
        "    done.append(key)\n"
        "store.delete = dying_delete\n"
        "erase_subject(settings, 'eileen', with_deliverables=True, store=store)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr

    # midway: marked erased, the erasure open with its plan saved, three objects gone, the rest not
    with svc.tracker.transaction() as session:
        [erasure] = session.query(Erasure).filter_by(subject_id=subject.id).all()
        planned = [entry["key"] for entry in erasure.planned]
        assert erasure.finished_at is None and erasure.with_deliverables
    assert len(planned) > 6
    assert [svc.store.exists(key) for key in planned].count(False) == 3
    assert svc.tracker.find_subject("eileen").erased_at is not None
    refused = run_lynx(
        str(photos["astronaut"]), "a woman smiling", settings=TINY_SETTINGS, subject_id="eileen"
    )
    assert refused.status == "failed" and "was erased on" in refused.error_text

    # the next run, from the command line, finishes it (with the deliverables the first run asked for)
    finished = lynx_cli("subject", "erase", "eileen", "--yes", "--json", settings=svc.settings)
    assert finished.returncode == 0, finished.stderr
    receipt = yaml.safe_load(finished.stdout)
    assert receipt["erasure_id"] == erasure.id and receipt["finished_at"]
    assert set(planned) <= set(receipt["removed_keys"])
    objects = _all_objects()
    assert not [key for key in planned if key in objects]
    assert not any(data == photo_bytes for data in objects.values())
    assert not [key for key in objects if key.startswith("deliverables/")]
    assert set(_keys_of(subject.id)) & set(objects) <= {
        key for key, kind in _keys_of(subject.id).items() if kind in TEXT_ONLY
    }

    shown = lynx_cli("subject", "show", "eileen", settings=svc.settings)
    assert shown.returncode == 0 and "subject eileen (eileen): erased on " in shown.stdout


@pytest.mark.parametrize("command", [("subject", "erase", "nobody", "--yes"), ("subject", "show", "nobody")])
def test_unknown_subjects_are_one_line_errors(flow_env, lynx_cli, command):
    flow_env()
    result = lynx_cli(*command, settings=services().settings)
    assert result.returncode == 5
    assert result.stderr.strip().splitlines() == [
        "lynx: error: no subject 'nobody'; `lynx subject list` shows the subjects"
    ]
