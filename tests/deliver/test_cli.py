"""`lynx deliver` commands through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lynx.cli import main
from lynx.media.intermediate import write_lossless

from .conftest import synthetic_frames


def test_build_then_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    intermediate = write_lossless(synthetic_frames(9, 32, 48), tmp_path / "decoded.mkv", fps=24)
    monkeypatch.setenv("LYNX_DELIVER_HEIGHT", "64")
    monkeypatch.setenv("LYNX_DELIVER_PRESET", "veryfast")
    with pytest.raises(SystemExit) as done:
        main(
            ["deliver", "build", str(intermediate.path), "--out", str(tmp_path / "out"), "--job-id", "cli-1"]
        )
    assert done.value.code == 0
    assert "safety: not_checked" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "contact_sheet.png",
        "manifest.json",
        "master.mp4",
        "poster.jpg",
        "preview.webp",
    ]

    with pytest.raises(SystemExit):
        main(["deliver", "probe", str(tmp_path / "out" / "master.mp4")])
    probe = json.loads(capsys.readouterr().out)
    assert (probe["width"], probe["height"], probe["frames"], probe["fps"]) == (96, 64, 9, 24.0)
    assert probe["tags"]["job_id"] == "cli-1"


def test_errors_are_one_line_with_the_setting(tmp_path: Path, monkeypatch, capsys) -> None:
    intermediate = write_lossless(synthetic_frames(3, 32, 48), tmp_path / "decoded.mkv", fps=16)
    monkeypatch.setenv("LYNX_DELIVER_HEIGHT", "63")
    with pytest.raises(SystemExit) as done:
        main(["deliver", "build", str(intermediate.path), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "must be even" in err and "LYNX_DELIVER_HEIGHT" in err
