"""The README is the user's first contact: its settings table and commands must match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lynx.settings import LynxSettings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_settings_table_is_generated_from_the_settings_class() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from settings_table import render_readme
    finally:
        sys.path.pop(0)
    assert render_readme(README) == README, "run: python scripts/settings_table.py --write"


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`(LYNX_[A-Z0-9_]+)`", README))
    missing = {f"LYNX_{name.upper()}" for name in LynxSettings.model_fields} - documented
    assert not missing


def test_the_two_first_screen_commands_are_make_targets() -> None:
    first_screen = README.split("---", 1)[0]
    assert "make demo" in first_screen and "make test" in first_screen
    targets = subprocess.run(
        ["make", "-pRrq", "-f", str(ROOT / "Makefile")], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert re.search(r"^demo:", targets, re.M) and re.search(r"^test:", targets, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_cli_command_in_the_readme_exists() -> None:
    from typer.main import get_command

    from lynx.cli import app

    root = get_command(app)
    for command in set(re.findall(r"^\| `lynx ([a-z-]+)", README, re.M)):
        assert command in root.commands, f"README documents `lynx {command}`, which does not exist"
