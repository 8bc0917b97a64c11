"""plan() and the tost-surgery command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import tost_surgery as tost
from tost_surgery.cli import main

from .conftest import TinyNet, bernoulli_mask


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_leaves_the_model_untouched(tiny) -> None:
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = tost.plan(tiny, bernoulli_mask(tiny), tost.Recipe.tost(total_steps=10), input_size=(3, 16, 16))
    assert type(tiny) is TinyNet and not hasattr(tiny, "tost") and "forward" not in tiny.__dict__
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in state.items())
    assert len(result.ghost_neurons) == 4 and len(result.ghost_skips) == 3
    assert result.macs["masked"] < result.macs["dense"] and result.macs["scaffolding"] > 0
    assert result.scaffold_params == sum(p.numel() for p in tost.prepare(tiny, bernoulli_mask(tiny),
                                         tost.Recipe.tost(total_steps=10)).tost.parameters())
    assert "ghost skip" in str(result)
    # Each skip names its branch: conv2 keeps its 8 channels, so skip_branch="auto" gives it a BatchNorm.
    assert [site.rsplit(" ", 1)[-1] for site in result.ghost_skips] == ["(conv1x1+bn)", "(bn)", "(conv1x1+bn)"]
    fresh = TinyNet()
    conv_bn = tost.plan(fresh, bernoulli_mask(fresh), tost.Recipe.tost(total_steps=10, skip_branch="conv_bn"),
                        input_size=(3, 16, 16))
    assert all(site.endswith("(conv1x1+bn)") for site in conv_bn.ghost_skips)


def test_plan_torchvision_resnet18(capsys) -> None:
    pytest.importorskip("torchvision")
    data = run_json(capsys, "plan", "tv:resnet18", "--sparsity", "0.95", "--input-size", "3", "32", "32")
    # 20 convs, but by default the 3 downsample 1x1 convs get no ghost skip (skip_pointwise=False).
    assert len(data["ghost_neurons"]) == 17 and len(data["ghost_skips"]) == 17
    assert data["layers"]["kept"] == round(0.05 * data["layers"]["total"])
    assert data["macs"]["dense"] > data["macs"]["masked"] > 0


def test_plan_timm_with_recipe_overrides(capsys) -> None:
    pytest.importorskip("timm")
    data = run_json(capsys, "plan", "timm:resnet18", "--mask", "random", "--set", "ghost_skips=False",
                    "--set", "soft_activation=mish", "--input-size", "3", "32", "32")
    assert data["ghost_skips"] == [] and len(data["ghost_neurons"]) == 17
    assert data["recipe"]["soft_activation"] == "mish"


def test_plan_module_callable(capsys) -> None:
    data = run_json(capsys, "plan", "tests.conftest:TinyNet", "--recipe", "baseline", "--input-size", "3", "16", "16")
    assert data["ghost_neurons"] == [] and data["model_params"] == sum(p.numel() for p in TinyNet().parameters())


def test_report_finalized_and_prepared_checkpoints(tmp_path, capsys, tiny) -> None:
    mask = bernoulli_mask(tiny)
    tost.prepare(tiny, mask)
    torch.save(tiny.state_dict(), tmp_path / "prepared.pt")
    tost.finalize(tiny)
    torch.save(tiny.state_dict(), tmp_path / "final.pt")
    expected = sum(int(m.sum()) for m in mask.values())
    for name in ("prepared.pt", "final.pt"):
        data = run_json(capsys, "report", str(tmp_path / name))
        assert data["kept"] == expected, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "resnet18"], "is not SOURCE:NAME"),
        (["plan", "nomodule_xyz:build"], "Cannot import 'build'"),
        (["plan", "tests.conftest:TinyNet", "--set", "warmpu=0.5"], "Did you mean 'warmup'"),
        (["report", "/nonexistent/ckpt.pt"], "No checkpoint"),
    ],
)
def test_cli_errors(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tost_surgery", "plan", "tests.conftest:TinyNet", "--input-size", "3", "8", "8"],
        capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "ToST plan for TinyNet" in out.stdout


def test_deploy_command_on_a_model_spec(capsys, tmp_path) -> None:
    path = tmp_path / "tiny.tost.pt"
    data = run_json(
        capsys, "deploy", "tests.conftest:TinyNet", "--sparsity", "0.9", "--input-size", "3", "16", "16",
        "--save", str(path),
    )  # fmt: skip
    rows = {row["name"]: row for row in data["report"]["rows"]}
    assert set(rows) == {"conv1", "conv2", "conv3", "fc"}
    assert all(row["density"] < 0.5 for row in rows.values()) and rows["conv2"]["folded"] == "bn2"
    assert data["report"]["speedup"] > 0 and data["report"]["threads"] == 1
    sizes = data["checkpoint"]
    assert path.stat().st_size == sizes["compressed_bytes"] < sizes["dense_bytes"]
    assert main(["deploy", "tests.conftest:TinyNet", "--checkpoint", str(path), "--input-size", "3", "16", "16"]) == 0
    out = capsys.readouterr().out
    assert "end to end" in out and "with deploy.save" in out


def test_deploy_command_on_a_plain_checkpoint(capsys, tmp_path, tiny) -> None:
    torch.save(tiny.state_dict(), tmp_path / "dense.pt")
    data = run_json(capsys, "deploy", "tests.conftest:TinyNet", "--checkpoint", str(tmp_path / "dense.pt"),
                    "--input-size", "3", "16", "16")  # fmt: skip
    # A dense model: nothing is sparse enough to try CSR on.
    assert all(row["kernel"] != "csr" for row in data["report"]["rows"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deploy", "tests.conftest:TinyNet"], "Hint: --input-size C H W"),
        (["deploy", "tests.conftest:TinyNet", "--checkpoint", "/nonexistent.pt", "--input-size", "3", "8", "8"],
         "No checkpoint"),
    ],
)  # fmt: skip
def test_deploy_command_errors(capsys, argv, message) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_deploy_command_on_a_checkpoint_of_another_model(capsys, tmp_path) -> None:
    torch.save({"weight": torch.ones(2, 2)}, tmp_path / "other.pt")
    other = str(tmp_path / "other.pt")
    argv = ["deploy", "tests.conftest:TinyNet", "--checkpoint", other, "--input-size", "3", "8", "8"]
    assert main(argv) == 2
    assert "does not fit 'tests.conftest:TinyNet'" in capsys.readouterr().err
