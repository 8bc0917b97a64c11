"""Smoke test of the project's main job: ``examples/demo.py --quick`` runs end to end, deploy included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_quick_runs_end_to_end() -> None:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps at 80 columns without a terminal; keep lines whole
    result = subprocess.run(
        [sys.executable, str(DEMO), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=DEMO.parents[1],
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Test accuracy" in output and "difference" in output, output
    assert output.count("(exactly zero: yes)") == 2, output
    assert "torch.export: ToST model ->" in output and "matches eager: yes" in output, output
    assert "deploy.load gives it back exactly: yes" in output, output
    assert "deploy.accelerate: torchvision resnet18, ERK 98%" in output and "end to end" in output, output
    assert "Total wall time" in output, output
