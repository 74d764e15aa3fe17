"""build_deliverables end to end: every output made, verified and described; failures leave nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lynx.errors import ConfigurationError
from lynx.media import deliver as media_deliver
from lynx.media import realesrgan
from lynx.media.deliver import build_deliverables, learned_upscale
from lynx.media.errors import AudioError, DeliveryInputError, EncodingError, SafetyBlockedError
from lynx.media.probe import probe_image
from lynx.media.provenance import Provenance, sha256_file
from lynx.media.spec import DeliverySpec

from .conftest import flat_frames, synthetic_frames
from .upscaler import count_enlarged, tiny_realesrgan_weights


def test_full_delivery(tmp_path: Path, provenance: Provenance, make_audio, logo_png: Path) -> None:
    spec = DeliverySpec(
        height=144,
        fps=24,
        fps_mode="interpolate",
        renditions=["h265", "vp9"],
        audio=make_audio(0.7),
        watermark=logo_png,
        preset="veryfast",
        contact_sheet_frames=6,
        contact_sheet_columns=3,
        contact_sheet_tile_height=48,
        preview_height=96,
    )
    scores = [0.2] * 17
    scores[4], scores[10] = 0.95, None
    result = build_deliverables(
        synthetic_frames(17, 64, 96), spec=spec, workdir=tmp_path, provenance=provenance, face_scores=scores
    )

    names = [f.name for f in result.files]
    assert names == [
        "master.mp4",
        "rendition_h265.mp4",
        "rendition_vp9.webm",
        "poster.jpg",
        "preview.webp",
        "contact_sheet.png",
        "manifest.json",
    ]
    assert [f.kind for f in result.files] == [
        "master",
        "rendition",
        "rendition",
        "poster",
        "preview",
        "contact_sheet",
        "manifest",
    ]
    # The staging folder holds exactly the deliverables (the mezzanine is gone).
    assert result.staging_dir.parent == tmp_path
    assert sorted(p.name for p in result.staging_dir.iterdir()) == sorted(names)

    master = result.master.probe
    assert (master.codec, master.width, master.height, master.frames, master.fps) == (
        "h264",
        216,
        144,
        25,
        24,
    )
    assert (master.audio_codec, master.faststart) == ("aac", True)
    assert master.tags["comment"] == "AI-generated" and master.tags["job_id"] == "job-0001"
    assert master.tags["seed"] == "1234" and master.tags["model"] == "lynx-full test-fingerprint"
    assert result.file("rendition_vp9.webm").probe.audio_codec == "opus"
    assert result.file("preview.webp").probe.height == 96
    assert result.file("poster.jpg").probe.tags["comment"].startswith("AI-generated (")
    assert probe_image(result.file("contact_sheet.png").path).tags["job_id"] == "job-0001"

    manifest = json.loads(result.file("manifest.json").path.read_text())
    assert manifest == json.loads(json.dumps(result.manifest))
    assert manifest["label"] == "AI-generated"
    assert manifest["job"] == {
        "job_id": "job-0001",
        "campaign": "spring",
        "subject_ref": "subject:42",
        "prompt": "a person walking on a beach",
        "negative_prompt": "blurry",
        "seed": 1234,
    }
    assert manifest["inputs"] == [{"key": "inputs/ref.png", "sha256": "0" * 64, "role": "reference_image"}]
    assert {a["role"]: a["sha256"] for a in manifest["assets"]} == {
        "audio": sha256_file(spec.audio),
        "watermark": sha256_file(logo_png),
    }
    assert manifest["delivery_settings"]["renditions"] == ["h265", "vp9"]
    assert manifest["generation_settings"] == {"steps": 4, "guidance": 5.0}
    assert manifest["safety"]["status"] == "not_checked"
    assert manifest["video"] == {
        "width": 216,
        "height": 144,
        "fps": 24.0,
        "frames": 25,
        "duration": 25 / 24,
        "fps_mode": "interpolate",
        "upscaling": "lanczos",
    }
    assert {"python", "ffmpeg", "av", "torch"} <= manifest["software"].keys()
    for entry in manifest["outputs"]:
        on_disk = result.staging_dir / entry["name"]
        assert entry["sha256"] == sha256_file(on_disk) and entry["size"] == on_disk.stat().st_size
    assert set(result.timings) >= {"check inputs", "stream frames", "encode master.mp4", "previews", "verify"}


def test_poster_is_the_best_face_frame_else_the_middle(tmp_path: Path, provenance: Provenance) -> None:
    spec = DeliverySpec(fps=24, fps_mode="duplicate", preset="veryfast")
    scores = [None, 0.3, 0.4, 0.91, 0.5, float("nan"), 0.2, None, 0.1]
    result = build_deliverables(
        flat_frames(9, 32, 48), spec=spec, workdir=tmp_path, provenance=provenance, face_scores=scores
    )
    assert result.manifest["poster"] == {
        "source_index": 3,
        "frame_index": 5,
        "reason": "best_face_score",
        "score": 0.91,
    }
    poster = np.asarray(Image.open(result.file("poster.jpg").path))
    assert poster.mean() == pytest.approx(16 + 8 * 3, abs=2.5)  # it shows source frame 3

    result = build_deliverables(
        flat_frames(9, 32, 48), spec=spec, workdir=tmp_path, provenance=provenance, face_scores=[None] * 9
    )
    assert result.manifest["poster"]["reason"] == "middle_frame"
    assert np.asarray(Image.open(result.file("poster.jpg").path)).mean() == pytest.approx(16 + 8 * 4, abs=2.5)


def test_float_video_array_is_accepted(tmp_path: Path, provenance: Provenance) -> None:
    video = np.stack(list(synthetic_frames(9, 32, 48))).astype(np.float32) / 255.0
    result = build_deliverables(
        video, spec=DeliverySpec(preset="veryfast"), workdir=tmp_path, provenance=provenance
    )
    assert result.master.probe.frames == 9 and result.manifest["video"]["upscaling"] == "none"


def test_realesrgan_upscale_end_to_end(tmp_path: Path, provenance: Provenance, monkeypatch) -> None:
    load = realesrgan.load_realesrgan
    weights = tiny_realesrgan_weights(tmp_path / "realesr-tiny-x4.pth")
    spec = DeliverySpec(
        height=128,
        upscaler="realesrgan",
        realesrgan_weights=weights,
        upscale_tile=32,
        upscale_tile_overlap=4,
        preset="veryfast",
    )
    work = tmp_path / "work"
    loads = []
    monkeypatch.setattr(realesrgan, "load_realesrgan", lambda *a, **k: loads.append(a) or load(*a, **k))
    for _ in range(2):  # two jobs of one worker: the weights are loaded once
        result = build_deliverables(
            synthetic_frames(9, 48, 64), spec=spec, workdir=work, provenance=provenance
        )
        assert (result.master.probe.width, result.master.probe.height) == (170, 128)
        assert result.manifest["video"]["upscaling"] == "realesrgan x4 (realesr-tiny-x4.pth)"
        assert [a["role"] for a in result.manifest["assets"]] == ["upscaler_weights"]
    assert loads == [(weights,)]

    # A target below the source is a plain downscale: the learned model is not used.
    spec = spec.model_copy(update={"height": 32})
    result = build_deliverables(synthetic_frames(9, 48, 64), spec=spec, workdir=work, provenance=provenance)
    assert (result.master.probe.width, result.master.probe.height, result.manifest["video"]["upscaling"]) == (
        42,
        32,
        "lanczos",
    )


def test_frames_upscaled_before_delivery_are_not_upscaled_again_and_the_manifest_names_it(
    tmp_path: Path, provenance: Provenance, monkeypatch
) -> None:
    weights = tiny_realesrgan_weights(tmp_path / "realesr-tiny-x4.pth")
    spec = DeliverySpec(
        height=128, upscaler="realesrgan", realesrgan_weights=weights, upscale_tile=0, preset="veryfast"
    )
    enlarged = count_enlarged(monkeypatch)
    # as the decode stage does, on the GPU: the frames reach delivery at the target size
    frames, upscaled = learned_upscale(synthetic_frames(9, 48, 64), (64, 48), spec)
    assert upscaled is not None and upscaled.label == "realesrgan x4 (realesr-tiny-x4.pth)"
    result = build_deliverables(
        frames, spec=spec, workdir=tmp_path / "work", provenance=provenance, upscaled_by=upscaled
    )
    assert len(enlarged) == 9  # once per frame, before delivery only
    assert (result.master.probe.width, result.master.probe.height) == (170, 128)
    manifest = result.manifest
    assert manifest["video"]["upscaling"] == "realesrgan x4 (realesr-tiny-x4.pth)"
    assert (manifest["source"]["width"], manifest["source"]["height"]) == (64, 48)
    assert manifest["assets"] == [
        {
            "role": "upscaler_weights",
            "file": weights.name,
            "sha256": sha256_file(weights),
            "size": weights.stat().st_size,
        }
    ]

    # a larger target at delivery (settings changed in between) is Lanczos on top, and says so
    frames, upscaled = learned_upscale(synthetic_frames(9, 48, 64), (64, 48), spec)
    bigger = DeliverySpec(height=256, preset="veryfast")
    result = build_deliverables(
        frames, spec=bigger, workdir=tmp_path / "work", provenance=provenance, upscaled_by=upscaled
    )
    assert result.master.probe.height == 256
    assert result.manifest["video"]["upscaling"] == "realesrgan x4 (realesr-tiny-x4.pth), then lanczos"
    assert [a["role"] for a in result.manifest["assets"]] == ["upscaler_weights"]


def test_the_upscaler_weights_are_hashed_once_per_version_of_the_file(tmp_path: Path, monkeypatch) -> None:
    weights = tiny_realesrgan_weights(tmp_path / "realesr-tiny-x4.pth")
    spec = DeliverySpec(height=128, upscaler="realesrgan", realesrgan_weights=weights, upscale_tile=0)
    hashed = []
    monkeypatch.setattr(
        media_deliver, "sha256_file", lambda path, **kw: hashed.append(path) or sha256_file(path, **kw)
    )
    for _ in range(3):  # three jobs of one worker
        _frames, upscaled = learned_upscale(synthetic_frames(2, 48, 64), (64, 48), spec)
        assert upscaled is not None and upscaled.weights["sha256"] == sha256_file(weights)
    assert hashed == [weights]

    # weights replaced in place are hashed again, as they are loaded again
    tiny_realesrgan_weights(weights, seed=1)
    before = weights.stat()
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    _frames, upscaled = learned_upscale(synthetic_frames(2, 48, 64), (64, 48), spec)
    assert upscaled is not None and upscaled.weights["sha256"] == sha256_file(weights)
    assert hashed == [weights, weights]


def _assert_nothing_left(workdir: Path) -> None:
    assert not workdir.exists() or list(workdir.iterdir()) == []


def test_corrupt_audio_fails_before_encoding_and_leaves_nothing(
    tmp_path: Path, provenance: Provenance
) -> None:
    audio = tmp_path / "jingle.m4a"
    audio.write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"garbage" * 50)
    work = tmp_path / "work"
    with pytest.raises(AudioError, match="jingle.m4a is unreadable or corrupt") as caught:
        build_deliverables(
            synthetic_frames(9, 32, 48), spec=DeliverySpec(audio=audio), workdir=work, provenance=provenance
        )
    assert caught.value.setting == "LYNX_DELIVER_AUDIO"
    _assert_nothing_left(work)


def test_safety_block_leaves_nothing(
    tmp_path: Path, provenance: Provenance, make_brightness_classifier
) -> None:
    spec = DeliverySpec(safety_model=make_brightness_classifier(), safety_stride=4)
    with pytest.raises(SafetyBlockedError) as caught:
        build_deliverables(
            synthetic_frames(9, 32, 48, brightness=1.6),
            spec=spec,
            workdir=tmp_path / "w",
            provenance=provenance,
        )
    assert caught.value.verdict.status == "blocked" and caught.value.verdict.frames_checked == 3
    _assert_nothing_left(tmp_path / "w")

    result = build_deliverables(
        synthetic_frames(9, 32, 48, brightness=0.3), spec=spec, workdir=tmp_path / "w", provenance=provenance
    )
    assert result.manifest["safety"]["status"] == "passed" and result.manifest["safety"]["score"] < 0.05
    assert result.manifest["assets"][0]["role"] == "safety_model"


def test_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path: Path, provenance: Provenance) -> None:
    work = tmp_path / "w"
    with pytest.raises(DeliveryInputError, match="got 3 face scores for 9 frames"):
        build_deliverables(
            synthetic_frames(9, 32, 48),
            spec=DeliverySpec(),
            workdir=work,
            provenance=provenance,
            face_scores=[0.1, 0.2, 0.3],
        )
    with pytest.raises(DeliveryInputError, match="empty"):
        build_deliverables(iter(()), spec=DeliverySpec(), workdir=work, provenance=provenance)
    _assert_nothing_left(work)


def test_broken_ffmpeg_is_an_encoding_error(tmp_path: Path, provenance: Provenance) -> None:
    with pytest.raises(EncodingError, match="ffmpeg failed while writing mezzanine.mkv"):
        build_deliverables(
            synthetic_frames(3, 32, 48),
            spec=DeliverySpec(ffmpeg_binary=Path("/bin/false")),
            workdir=tmp_path / "w",
            provenance=provenance,
        )
    _assert_nothing_left(tmp_path / "w")
    with pytest.raises(ConfigurationError, match="LYNX_FFMPEG_BINARY"):
        build_deliverables(
            synthetic_frames(3, 32, 48),
            spec=DeliverySpec(ffmpeg_binary=tmp_path / "nope"),
            workdir=tmp_path / "w",
            provenance=provenance,
        )
