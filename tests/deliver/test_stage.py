"""The deliver stage in a real flow run: what a failure after publishing leaves behind.

Runs the ``lynx`` flow on the flow tests' services (PostgreSQL, SeaweedFS S3, tiny model, demo face pack).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import tasks.deliver
import tasks.services
from flows.generate import lynx
from lynx.assets import demo_face_path
from lynx.errors import ConfigurationError, ServiceUnavailableError
from lynx.faces import analyze_reference_photo, cached_face_analyzer
from lynx.faces.similarity import iter_video_frames, video_face_similarity
from lynx.store.s3 import S3ArtifactStore
from tasks.deliver import face_scores
from tasks.face import save_embedding
from tasks.services import services
from tasks.states import outcomes_of
from tests.eval.clips import pan_and_zoom
from tests.flows.conftest import TINY_SETTINGS, flow_env, photos, tiny_model_dir  # noqa: F401


class StuckDeleteStore(S3ArtifactStore):
    """The real S3 store, except that deleting keys ending in ``stuck`` fails as a flapping store would."""

    stuck = "/poster.jpg"

    def delete(self, key: str) -> None:
        if key.endswith(self.stuck):
            raise ServiceUnavailableError(f"cannot reach the artifact store to delete {key}")
        super().delete(key)


def test_a_failed_delivery_withdraws_every_file_it_can_and_keeps_the_real_error(
    flow_env,  # noqa: F811
    photos,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow_env()
    monkeypatch.setattr(tasks.services, "open_store", StuckDeleteStore)

    def broken_gate(*args, **kwargs):  # fails after the files are published and recorded
        raise RuntimeError("quality gate exploded")

    monkeypatch.setattr(tasks.deliver, "gate_job", broken_gate)
    state = lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS, return_state=True)
    assert state.is_failed()  # the run is Failed where operators look, with the real reason
    assert "quality gate exploded" in state.message
    outcome = outcomes_of(state)

    assert outcome.status == "failed" and outcome.error_stage == "deliver"
    assert "quality gate exploded" in outcome.error_text
    assert "delete" not in outcome.error_text
    prefix = f"deliverables/adhoc/{outcome.job_id}/"
    # the one file the store would not delete is all that is left; every other was withdrawn
    assert sorted(services().store.list(prefix)) == [prefix + "poster.jpg"]
    rows = [
        row
        for row in services().tracker.list_artifacts(job_id=outcome.job_id, include_deleted=True)
        if row.key.startswith(prefix)
    ]
    names = {"master.mp4", "poster.jpg", "preview.webp", "contact_sheet.png", "manifest.json"}
    assert sorted(row.key for row in rows) == sorted(prefix + name for name in names)
    assert [row.key for row in rows if row.deleted_at is None] == [prefix + "poster.jpg"]


@pytest.fixture
def face_clip(tmp_path) -> Path:
    """A short H.264 clip of the demo portrait: every frame shows the reference's face."""
    return pan_and_zoom(demo_face_path(), tmp_path / "face.mp4", frames=6, size=(160, 160))


def test_a_reference_from_another_recogniser_is_not_compared(
    flow_env,  # noqa: F811
    face_clip: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    flow_env()
    svc = services()
    analyzer = cached_face_analyzer(svc.settings)
    reference = analyze_reference_photo(demo_face_path(), svc.settings, analyzer=analyzer)

    def stored(model: str) -> str:
        path = tmp_path / f"{model}.npz"
        face = {"embedding": reference.embedding, "det_score": reference.score, "model": model}
        save_embedding({**face, "box": reference.box, "kps": reference.kps, "faces_detected": 1}, path)
        return svc.store.put_file(path, key=f"faces/{model}.npz").key

    scores, mean = face_scores(face_clip, stored(analyzer.embedder.name), 6)
    assert mean is not None and mean > 0.5 and all(score is not None for score in scores)

    # same width, other embedding space: nothing is compared, the delivery goes on without scores
    with caplog.at_level(logging.WARNING, logger="tasks.deliver"):
        assert face_scores(face_clip, stored("another-512d-recogniser"), 6) == ([None] * 6, None)
    assert "embedded by recogniser 'another-512d-recogniser'" in caplog.text
    # and the metric itself refuses to compare across recognisers
    with pytest.raises(ConfigurationError, match="made by recogniser 'another-512d-recogniser'"):
        video_face_similarity(
            iter_video_frames(face_clip),
            reference.embedding,
            analyzer,
            reference_model="another-512d-recogniser",
        )
