"""Smoke test of benchmarks/coverage.py: two small models, end to end, into a temporary directory."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "coverage.py"
COLUMNS = [
    "source", "model", "params", "input_size", "traced", "ghost_neurons", "ghost_skips", "masked_layers",
    "prepare_s", "finalize_s", "round_trip_ok", "baseline_exact", "failure", "wall_s",
]  # fmt: skip


def test_coverage_two_resnets(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--only", "tv:resnet18", "timm:resnet18", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr

    with (tmp_path / "coverage.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(COLUMNS)] == COLUMNS
        rows = {(r["source"], r["model"]): r for r in reader}
    assert set(rows) == {("tv", "resnet18"), ("timm", "resnet18")}
    for row in rows.values():
        assert row["round_trip_ok"] == "True", row
        assert row["baseline_exact"] == "True", row
        assert row["failure"] == "", row
        assert row["traced"] == "full"
        assert row["input_size"] == "64x64"
        assert min(int(row[c]) for c in ("ghost_neurons", "ghost_skips", "masked_layers")) > 0, row

    report = (tmp_path / "COVERAGE.md").read_text()
    assert "## Summary" in report and "| resnet18 |" in report

    # Resumable: a second run finds both rows and runs nothing.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "running 0" in again.stdout, again.stdout + again.stderr
    with (tmp_path / "coverage.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("coverage_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coverage_builds_a_fixed_size_timm_model_small(tmp_path: Path) -> None:
    """test_vit declares a fixed 160x160 input; the sweep builds it with img_size=64 and runs at 64x64."""
    cmd = [sys.executable, str(SCRIPT), "--only", "timm:test_vit", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    with (tmp_path / "coverage.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["input_size"] == "64x64 (img_size=64)", row
    assert row["round_trip_ok"] == "True" and row["baseline_exact"] == "True" and row["status"] == "ok", row
    assert "img_size=64" in (tmp_path / "COVERAGE.md").read_text()


def test_coverage_falls_back_to_the_own_size_when_img_size_is_refused(tmp_path: Path) -> None:
    coverage = _load_script()
    args = coverage.parse_args(["--only", "timm:test_vit"])
    worker = coverage.Worker("timm:test_vit", tmp_path / "row.json", args)
    assert worker.fixed_size()
    real_create = coverage.Worker.create

    def refusing(self, device=None):
        if self.build_kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'img_size'")
        return real_create(self, device)

    coverage.Worker.create = refusing
    try:
        assert worker.build_small() is None
        assert worker.build_kwargs == {}
        model = worker.create()
        x, _ = worker.pick_input(model)
    finally:
        coverage.Worker.create = real_create
    assert tuple(x.shape) == (2, 3, 160, 160) and worker.row["input_size"] == "160x160"


def test_coverage_a_model_over_its_time_limit_gets_a_row_that_says_where(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--only", "tv:resnet18", "--timeout", "0.02", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    with (tmp_path / "coverage.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["failure"].startswith("timeout (0.02 s) in "), row  # killed while building: the stage is named
    assert row["status"] in ("not buildable", "failed") and float(row["wall_s"]) < 30, row


def test_coverage_restores_a_buffer_the_forward_replaced() -> None:
    """timm's ConViT caches ``rel_indices`` (a buffer) resized to the input: the restore must not
    copy the old (1, 1, 1, 3) zeros into the new tensor, leaving a wrong cache of the right shape."""
    import torch
    from torch import nn

    coverage = _load_script()

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.register_buffer("cache", torch.zeros(1, 3), persistent=False)

        def forward(self, x):
            if self.cache.shape[0] != x.shape[0]:
                self.cache = torch.arange(x.numel(), dtype=x.dtype).view_as(x)
            return self.bn(x) + self.cache

    model = Cached()
    saved = {k: v.clone() for k, v in model.named_buffers()}
    model(torch.randn(4, 3))
    coverage.restore_buffers(model, saved)
    assert model.cache.shape == (1, 3) and torch.equal(model.bn.running_mean, torch.zeros(3))
    assert torch.equal(model(torch.ones(4, 3)) - model.bn(torch.ones(4, 3)), torch.arange(12.0).view(4, 3))


def test_coverage_claims_let_two_drivers_share_a_csv(tmp_path: Path) -> None:
    """A model with a row, or held by a live driver, is not claimed; a dead driver's claim is taken over."""
    import argparse
    import os

    coverage = _load_script()
    driver = object.__new__(coverage.Driver)  # no fork server needed for the bookkeeping
    driver.args = argparse.Namespace(retry=False)
    driver.csv_path = tmp_path / "coverage.csv"
    driver.claims = tmp_path / "coverage.claims"
    driver.csv_path.write_text("source,model\ntv,resnet18\n")

    assert not driver.claim("tv:resnet18")  # already has a row
    assert driver.claim("timm:resnet18")
    assert (driver.claims / "timm__resnet18.pid").read_text() == str(os.getpid())
    assert not driver.claim("timm:resnet18")  # held by a live driver (this process)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (driver.claims / "tv__alexnet.pid").write_text(dead.stdout.strip())
    assert driver.claim("tv:alexnet")  # its holder has exited: taken over
    assert (driver.claims / "tv__alexnet.pid").read_text() == str(os.getpid())

    driver.release("timm:resnet18")
    assert not (driver.claims / "timm__resnet18.pid").exists()


def test_coverage_tries_small_multiples_of_14_and_48_before_the_own_size(tmp_path: Path) -> None:
    """A patch-14 model refuses 64x64; the sweep runs it at 56x56, not at its (slow) own size."""
    import torch
    from torch import nn

    coverage = _load_script()

    class Patch14(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 14, stride=14)

        def forward(self, x):
            if x.shape[-1] % 14:
                raise AssertionError(f"Input height ({x.shape[-1]}) should be divisible by patch size (14).")
            return self.embed(x).mean((2, 3))

    worker = coverage.Worker("tv:patch14_test_model", tmp_path / "row.json", coverage.parse_args([]))
    x, _ = worker.pick_input(Patch14())
    assert tuple(x.shape) == (2, 3, 56, 56) and worker.row["input_size"] == "56x56"
    assert torch.isfinite(Patch14()(x)).all()
