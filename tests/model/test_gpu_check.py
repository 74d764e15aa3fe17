"""benchmarks/gpu_check.py must run in one go on the GPU machine: its --dry-run runs every code path
that does not need CUDA, with tiny shapes on the CPU, so that it cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_the_whole_table():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert (
        "| configuration | plain forward | Lynx forward | Lynx / plain | plain peak | Lynx peak | Lynx MFU |"
        in table
    )
    for row in ("| SDPA |", "| batched guidance (per pass) |", "| First Block Cache hit |", "| compiled ("):
        line = next(line for line in table.splitlines() if line.startswith(row))
        assert line.count(" s |") == 2 and "%" in line, line  # both timings and an MFU
    # what needs CUDA says so instead of pretending
    assert (
        "| flash-attn | n/a (needs CUDA" in table
        and "| FP8 weights (layerwise casting, eager) | n/a (CUDA only)" in table
    )
    assert "Activation memory per extra video" in table and "bf16 vs fp32 latents" in table


def test_gpu_check_without_a_gpu_says_so():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=""),
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "gpu_check: no CUDA device here (use --dry-run to check the script on a CPU)"
    )
