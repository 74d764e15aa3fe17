"""The deliver stage in a real flow run: what a failure after publishing leaves behind.

Runs the ``lynx`` flow on the flow tests' services (PostgreSQL, moto S3, tiny model, demo face pack).
"""

from __future__ import annotations

import pytest

import tasks.deliver
import tasks.services
from flows.generate import lynx
from lynx.errors import ServiceUnavailableError
from lynx.store.s3 import S3ArtifactStore
from tasks.services import services
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
    outcome = lynx(str(photos["astronaut"]), "a person smiling", settings=TINY_SETTINGS)

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
