"""``benchmarks/retirement.py``: its probes set the scaffolding's coefficients exactly, on a copy."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tost_surgery as tost

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DATA = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"


@pytest.fixture(scope="module")
def retirement():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import cifar
        import retirement

        yield retirement, cifar
    finally:
        sys.path.remove(str(BENCHMARKS))


def _pair(cifar) -> tuple[torch.nn.Module, torch.nn.Module]:
    """ResNet-20 prepared with the recipe (no rescaling: same weights) and with masks only."""
    torch.manual_seed(0)
    model = cifar.resnet20()
    mask = tost.masks.erk(model, 0.9, seed=0)
    plain = tost.prepare(copy.deepcopy(model), mask, tost.Recipe.baseline())
    return tost.prepare(model, mask, tost.Recipe.tost(100, rescale_init=False)), plain


def test_both_retired_is_the_masked_model_and_the_original_is_untouched(retirement) -> None:
    probes, cifar = retirement
    model, plain = _pair(cifar)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train(), plain.train()
    with torch.no_grad():
        scheduled = model(x)
        retired = probes.with_coefficients(model, {"skips": 0.0, "neurons": 1.0})(x)
        as_trained = probes.with_coefficients(model, {})(x)
        skips_only = probes.with_coefficients(model, {"skips": 0.0})(x)
        expected = plain(x)
    torch.testing.assert_close(retired, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(as_trained, scheduled, rtol=1e-5, atol=1e-5)
    assert (skips_only - expected).abs().max() > 1e-3  # the ghost neurons still blend at step 0
    assert probes.coefficients(model) == {"skips": 1.0, "neurons": 0.0}  # the original's schedule is untouched


@pytest.mark.skipif(not DATA.is_file(), reason=f"the CIFAR-10 subset is not at {DATA}")
def test_retirement_smoke(retirement) -> None:
    probes, _ = retirement
    args = ["--arch", "resnet20", "--mask", "erk", "--sparsity", "0.9", "--at", "0", "1", "--epochs", "2"]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "retirement.py"), *args, "--subset", "256"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert [row[3] for row in rows] == list(probes.states({})) * 2
    assert [row[1] for row in rows[:5]] == ["1.000"] * 5  # a at the start
    assert all(0.0 <= float(row[5].rstrip("% |")) <= 100.0 for row in rows)

