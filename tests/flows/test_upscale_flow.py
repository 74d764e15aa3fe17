"""Real-ESRGAN in the pipeline: run by the GPU decode stage, named by the deliver stage's manifest."""

from __future__ import annotations

import json

from flows.generate import lynx
from lynx.media.intermediate import lossless_info
from lynx.media.probe import probe_video
from lynx.media.provenance import sha256_file
from tasks.services import services
from tests.deliver.upscaler import count_enlarged, tiny_realesrgan_weights
from tests.flows.conftest import TINY_SETTINGS


def test_realesrgan_runs_in_the_decode_stage_and_the_manifest_still_names_it(
    flow_env, photos, tmp_path, monkeypatch
):
    weights = tiny_realesrgan_weights(tmp_path / "realesr-tiny-x4.pth")
    flow_env(
        deliver_upscaler="realesrgan",
        deliver_realesrgan_weights=weights,
        deliver_height=128,  # the tiny model makes 64x64
        deliver_upscale_tile=32,
        deliver_upscale_tile_overlap=4,
    )
    enlarged = count_enlarged(monkeypatch)

    outcome = lynx(str(photos["astronaut"]), "a woman smiling", settings=TINY_SETTINGS)

    assert outcome.status == "completed", outcome.error_text
    svc = services()
    rows = {run.stage: run for run in svc.tracker.stage_runs(outcome.job_id)}
    decode = rows["decode"].metrics
    label = "realesrgan x4 (realesr-tiny-x4.pth)"
    assert decode["upscaling"] == label and (decode["width"], decode["height"]) == (128, 128)
    assert 0 < decode["upscale_seconds"] and decode["upscaled"]["source_height"] == 64
    # every frame went through the generator once: in decode, not again in deliver
    assert len(enlarged) == TINY_SETTINGS.frames

    intermediate = svc.store.get_file(rows["decode"].output_keys[0], tmp_path / "intermediate.mkv")
    info = lossless_info(tmp_path / "intermediate.mkv")
    assert (info.width, info.height, info.frames) == (128, 128, TINY_SETTINGS.frames)
    svc.store.get_file(outcome.master_key, tmp_path / "master.mp4")
    assert probe_video(tmp_path / "master.mp4").height == 128

    svc.store.get_file(outcome.manifest_key, tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["video"]["upscaling"] == label and manifest["video"]["height"] == 128
    assert manifest["source"]["height"] == 64  # what the model made
    assert [a for a in manifest["assets"] if a["role"] == "upscaler_weights"] == [
        {
            "role": "upscaler_weights",
            "file": weights.name,
            "sha256": sha256_file(weights),
            "size": weights.stat().st_size,
        }
    ]
    assert manifest["inputs"][0]["sha256"] == intermediate.sha256
