"""Publishing: only verified files, manifest last, checksums re-checked, all or nothing; and the task."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import pytest

from lynx.media.deliver import DeliveryResult, build_deliverables
from lynx.media.errors import AudioError, PublishError
from lynx.media.intermediate import write_lossless
from lynx.media.provenance import Provenance
from lynx.media.publish import deliverable_prefix, publish_deliverables
from lynx.media.spec import DeliverySpec
from tasks.deliver import deliver_video

from .conftest import RecordingStore, synthetic_frames

PREFIX = "deliverables/spring/job-0001"


@pytest.fixture
def result(tmp_path: Path, provenance: Provenance, make_audio) -> DeliveryResult:
    spec = DeliverySpec(renditions=["vp9"], audio=make_audio(1.0), preset="veryfast")
    return build_deliverables(
        synthetic_frames(9, 32, 48), spec=spec, workdir=tmp_path / "work", provenance=provenance
    )


def test_publish_uploads_every_file_manifest_last_with_matching_checksums(
    tmp_path: Path, result: DeliveryResult, store: RecordingStore
) -> None:
    stored = publish_deliverables(result, store, prefix=PREFIX + "/")

    assert store.uploads[-1] == f"{PREFIX}/manifest.json"
    assert [o.key for o in stored] == store.uploads == [f"{PREFIX}/{f.name}" for f in result.files]
    # What the store holds is byte for byte what the (downloaded) manifest lists.
    manifest_copy = tmp_path / "manifest.json"
    store.get_file(f"{PREFIX}/manifest.json", manifest_copy)
    manifest = json.loads(manifest_copy.read_text())
    for entry in manifest["outputs"]:
        with store.open_read(f"{PREFIX}/{entry['name']}") as handle:
            data = handle.read()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
        assert store.stat(f"{PREFIX}/{entry['name']}").content_type == entry["content_type"]
    # The downloaded master still carries its provenance tags.
    master = tmp_path / "master.mp4"
    store.get_file(f"{PREFIX}/master.mp4", master)
    with av.open(str(master)) as container:
        assert container.metadata["comment"] == "AI-generated"
        assert container.metadata["job_id"] == manifest["job"]["job_id"]
        assert container.metadata["seed"] == "1234"


@pytest.mark.parametrize("fail_at", [1, 3, 6])
def test_failed_upload_removes_everything_it_uploaded(
    result: DeliveryResult, store: RecordingStore, fail_at: int
) -> None:
    store = RecordingStore(store.inner, fail_at=fail_at)
    with pytest.raises(ConnectionError):
        publish_deliverables(result, store, prefix=PREFIX)
    assert store.keys() == []


def test_checksum_mismatch_in_the_store_rolls_back(result: DeliveryResult, store: RecordingStore) -> None:
    store = RecordingStore(store.inner, corrupt="manifest.json")
    with pytest.raises(PublishError, match="manifest.json has sha256 f{64}"):
        publish_deliverables(result, store, prefix=PREFIX)
    assert store.keys() == []


def test_file_changed_after_verification_is_not_published(
    result: DeliveryResult, store: RecordingStore
) -> None:
    poster = result.file("poster.jpg").path
    poster.write_bytes(poster.read_bytes() + b"tampered")
    with pytest.raises(PublishError, match="poster.jpg changed on disk after verification"):
        publish_deliverables(result, store, prefix=PREFIX)
    assert store.keys() == []


def test_task_delivers_an_intermediate_and_cleans_up(
    tmp_path: Path, provenance: Provenance, store: RecordingStore, make_audio
) -> None:
    intermediate = write_lossless(synthetic_frames(13, 32, 48), tmp_path / "decoded.mkv", fps=24)
    spec = DeliverySpec(audio=make_audio(0.3), preset="veryfast")  # source_fps 16: the file says 24
    summary = deliver_video.fn(
        intermediate.path,
        spec=spec,
        provenance=provenance,
        store=store,
        workdir=tmp_path / "work",
        face_scores=[0.5] * 13,
    )

    assert summary.prefix == deliverable_prefix("spring", "job-0001") == PREFIX
    assert summary.master_key == f"{PREFIX}/master.mp4" and summary.manifest_key == f"{PREFIX}/manifest.json"
    assert store.keys() == sorted(f.key for f in summary.files)
    assert all(store.stat(f.key).sha256 == f.sha256 for f in summary.files)
    assert summary.safety.status == "not_checked"
    with store.open_read(summary.manifest_key) as handle:
        manifest = json.load(handle)
    assert manifest["source"]["fps"] == 24.0 and manifest["video"]["frames"] == 13
    # the manifest says where every file is: its keys are the uploaded objects, manifest aside
    assert sorted(entry["key"] for entry in manifest["outputs"]) == sorted(
        key for key in store.keys() if key != summary.manifest_key
    )
    assert all(store.stat(e["key"]).sha256 == e["sha256"] for e in manifest["outputs"])
    assert list((tmp_path / "work").iterdir()) == []  # staging removed once published


def test_a_manifest_made_for_another_prefix_is_not_published(
    tmp_path: Path, provenance: Provenance, store: RecordingStore
) -> None:
    result = build_deliverables(
        synthetic_frames(5, 32, 48),
        spec=DeliverySpec(preset="veryfast"),
        workdir=tmp_path / "work",
        provenance=provenance,
        prefix=PREFIX + "/",
    )
    assert {entry["key"] for entry in result.manifest["outputs"]} == {
        f"{PREFIX}/{f.name}" for f in result.files if f.kind != "manifest"
    }
    with pytest.raises(PublishError, match="elsewhere than prefix 'deliverables/other/job-0001'"):
        publish_deliverables(result, store, prefix="deliverables/other/job-0001")
    assert store.keys() == []


def test_task_with_corrupt_audio_uploads_nothing(
    tmp_path: Path, provenance: Provenance, store: RecordingStore
) -> None:
    intermediate = write_lossless(synthetic_frames(5, 32, 48), tmp_path / "decoded.mkv", fps=16)
    audio = tmp_path / "jingle.wav"
    audio.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x01" * 40)
    with pytest.raises(AudioError):
        deliver_video.fn(
            intermediate.path,
            spec=DeliverySpec(audio=audio),
            provenance=provenance,
            store=store,
            workdir=tmp_path / "work",
        )
    assert store.keys() == []
    assert list((tmp_path / "work").iterdir()) == []
