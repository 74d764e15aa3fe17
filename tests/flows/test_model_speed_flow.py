"""LoRAs and the step cache in the pipeline: set on the GPU side, named by the deliver stage's manifest."""

from __future__ import annotations

import json

from flows.generate import lynx
from lynx.media.provenance import sha256_file
from lynx_model.testing import TinyModelSpec, write_tiny_lora
from tasks.services import services
from tests.flows.conftest import DEMO_EMBEDDING_DIM, TINY_SETTINGS


def test_loras_and_step_cache_reach_the_manifest(flow_env, photos, tmp_path):
    lora = write_tiny_lora(tmp_path / "style.safetensors", TinyModelSpec(face_dim=DEMO_EMBEDDING_DIM), seed=5)
    # a threshold no change reaches: after the first step, every pass skips all blocks but the first
    flow_env(loras=json.dumps([{"path": str(lora), "scale": 0.5}]), step_cache="first-block:1000")

    outcome = lynx(str(photos["astronaut"]), "a woman smiling", settings=TINY_SETTINGS)

    assert outcome.status == "completed", outcome.error_text
    svc = services()
    rows = {run.stage: run for run in svc.tracker.stage_runs(outcome.job_id)}
    blocks, passes, steps = TinyModelSpec().num_layers, 3, TINY_SETTINGS.steps
    expected_cache = {
        "kind": "first-block",
        "options": {"threshold": 1000.0},
        "block_forwards": blocks * passes * steps,
        "skipped_block_forwards": (blocks - 1) * passes * (steps - 1),
    }
    assert rows["sample"].metrics["step_cache"] == expected_cache
    assert rows["decode"].metrics["step_cache"] == expected_cache

    svc.store.get_file(outcome.manifest_key, tmp_path / "manifest.json")
    model = json.loads((tmp_path / "manifest.json").read_text())["model"]
    assert model["loras"] == [{"file": "style.safetensors", "sha256": sha256_file(lora), "scale": 0.5}]
    assert model["step_cache"] == expected_cache


def test_without_loras_or_cache_the_manifest_says_so(flow_env, photos, tmp_path):
    flow_env()
    outcome = lynx(str(photos["astronaut"]), "a woman smiling", settings=TINY_SETTINGS)
    assert outcome.status == "completed", outcome.error_text
    services().store.get_file(outcome.manifest_key, tmp_path / "manifest.json")
    model = json.loads((tmp_path / "manifest.json").read_text())["model"]
    assert model["loras"] == [] and model["step_cache"] is None
