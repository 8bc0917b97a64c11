"""plan() and the tost-surgery command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import tost_surgery as tost
from tost_surgery._plan import PREACT_BN
from tost_surgery.cli import main

from .conftest import PreActNet, TinyNet, bernoulli_mask


def run_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_leaves_the_model_untouched(tiny) -> None:
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = tost.plan(tiny, bernoulli_mask(tiny), tost.Recipe.tost(total_steps=10), input_size=(3, 16, 16))
    assert type(tiny) is TinyNet and not hasattr(tiny, "tost") and "forward" not in tiny.__dict__
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in state.items())
    assert len(result.sites["neurons"]) == 4 and len(result.sites["skips"]) == 3
    assert result.macs["masked"] < result.macs["dense"] and result.macs["scaffolding"] > 0
    assert result.scaffold_params == sum(p.numel() for p in tost.prepare(tiny, bernoulli_mask(tiny),
                                         tost.Recipe.tost(total_steps=10)).tost.parameters())
    assert "ghost skip" in str(result)
    # Each skip names its branch: conv2 keeps its 8 channels, so skip_branch="auto" gives it a BatchNorm.
    assert [site.rsplit(" ", 1)[-1] for site in result.sites["skips"]] == ["(conv1x1+bn)", "(bn)", "(conv1x1+bn)"]
    fresh = TinyNet()
    conv_bn = tost.plan(fresh, bernoulli_mask(fresh), tost.Recipe.tost(total_steps=10, skip_branch="conv_bn"),
                        input_size=(3, 16, 16))
    assert all(site.endswith("(conv1x1+bn)") for site in conv_bn.sites["skips"])


def test_plan_advises_against_large_factors_on_residual_branch_ends() -> None:
    model = PreActNet()  # conv3, conv5 and shortcut feed the additions with no norm between
    mask = bernoulli_mask(model, density=0.1)
    loud = tost.Recipe.tost(total_steps=10, rescale_scope="unnormalized")
    result = tost.plan(model, mask, loud)
    (advice,) = result.advice
    rescaled = tost.prepare(PreActNet(), mask, loud).tost.surgery.decided.rescaled
    for name in ("conv3", "conv5", "shortcut"):  # each named with its own factor
        assert f"{name} {rescaled[name + '.weight']:.1f}x" in advice and rescaled[name + ".weight"] >= 2.0, advice
    assert "3 layer(s) that end a residual branch" in advice and "conv1" not in advice  # the stem is the trunk
    assert "Hint: Recipe.tost(..., rescale_scope='unnormalized_nonresidual')" in advice
    assert "advice: rescaled init multiplies 3 layer(s)" in str(result)
    assert result.to_dict()["advice"] == [advice]
    # No rescale advice where those layers are out of the scope (the default), where factors are small, or
    # for a post-activation block.
    assert tost.plan(model, mask, tost.Recipe.tost(total_steps=10)).advice == ()
    assert tost.plan(model, bernoulli_mask(model, density=0.9), loud).advice == ()
    assert tost.plan(TinyNet(), bernoulli_mask(TinyNet(), density=0.1), loud).advice == ()


def test_plan_says_what_the_recipe_measured_on_pre_activation_networks() -> None:
    model = PreActNet()
    mask = bernoulli_mask(model, density=0.1)
    (advice,) = tost.plan(model, mask, tost.Recipe.tost(total_steps=10, skip_branch="bn")).advice
    assert advice.startswith("3 masked layer(s) end a residual branch with no norm after them (conv3, conv5, shortcut)")
    assert f"skip_branch='bn' measured below the paper's 1x1 conv + BatchNorm branch at every conv: {PREACT_BN}" \
        in advice
    assert advice.endswith(
        "Hint: skip_branch='auto' (which takes the 1x1 conv + BatchNorm on such a network) or 'conv_bn'."
    )
    # The default branch (auto: the 1x1 conv + BatchNorm here), conv_bn, no ghost skips and masks only
    # are what was measured: nothing to advise.
    for recipe in (
        tost.Recipe.tost(total_steps=10),
        tost.Recipe.tost(total_steps=10, skip_branch="conv_bn"),
        tost.Recipe.tost(total_steps=10, ghost_skips=False, skip_branch="bn"),
        tost.Recipe.baseline(),
        None,
    ):
        assert tost.plan(model, mask, recipe).advice == ()
    sites = tost.plan(model, mask, tost.Recipe.tost(total_steps=10)).sites["skips"]
    assert sites and all(site.endswith("(conv1x1+bn)") for site in sites)
    # A post-activation network (every branch ends in a norm) gets none.
    tiny = TinyNet()
    bn = tost.Recipe.tost(total_steps=10, skip_branch="bn")
    assert tost.plan(tiny, bernoulli_mask(tiny, density=0.1), bn).advice == ()


def test_plan_advises_where_every_path_goes_through_a_few_channels() -> None:
    def chain() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    model = chain()
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    mask = {n: m for n, m in mask.items() if m.dim() > 1}
    mask["3.weight"][2:] = False  # 2 of 64 channels keep weights: 3% on every path
    recipe = tost.Recipe.tost(total_steps=10)
    advice = tost.plan(model, mask, recipe, input_size=(3, 8, 8)).advice
    (narrow,) = [a for a in advice if "every path" in a]
    assert narrow.startswith("1 masked layer(s) that every path through the network goes through keep fewer than 5%")
    assert "(3 2 of 64)" in narrow and "The ghost skips carry the signal around such a layer" in narrow
    assert "Hint: a mask maker that keeps such paths" in narrow and "the default protocol measured best" in narrow
    off = tost.plan(model, mask, tost.Recipe.tost(total_steps=10, ghost_skips=False), input_size=(3, 8, 8)).advice
    assert any("(3 2 of 64)" in a and "The ghost skips carry" not in a for a in off)
    assert not any("every path" in a for a in tost.plan(model, mask, recipe).advice)  # no input size: no forward
    mask["3.weight"][:4] = True  # 4 of 64: not fewer than 5%
    assert not any("every path" in a for a in tost.plan(model, mask, recipe, input_size=(3, 8, 8)).advice)
    mask["3.weight"][:, 1:] = False  # 4 channels kept, all reading channel 0 of the first conv ...
    mask["0.weight"][0] = False  # ... which keeps nothing: no path left through either conv
    advice = tost.plan(model, mask, recipe, input_size=(3, 8, 8)).advice
    (narrow,) = [a for a in advice if "every path" in a]
    assert narrow.startswith("3 masked layer(s)") and "(0 0 of 64, 3 0 of 64, 8 0 of 10)" in narrow


def test_plan_advises_where_a_mask_leaves_most_output_channels_empty() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8, 2))
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    mask["2.weight"][:5] = False  # 5 of the depthwise conv's 8 channels keep nothing
    (advice,) = tost.plan(model, mask, tost.Recipe.tost(total_steps=10)).advice
    assert advice.startswith("1 masked layer(s) keep no weight in more than 50% of their output channels")
    assert "(2.weight 62% of 8)" in advice
    assert "exclude=['2.weight', ...]" in advice and "Hint: if training stays near chance, a lower sparsity" in advice
    assert "Alone that was not fatal" in advice and "stayed at chance" in advice
    for name in ("0.weight", "2.weight"):  # 1 weight for 8 channels in each conv
        mask[name].zero_().view(-1)[0] = True
    (advice,) = tost.plan(model, mask, tost.Recipe.tost(total_steps=10)).advice
    assert "(0.weight 88% of 8, 2.weight 88% of 8)" in advice
    mask = {n: torch.ones_like(m) for n, m in mask.items()}
    mask["2.weight"][:5] = False
    mask["2.weight"][1] = True  # 4 of 8: not more than half
    assert tost.plan(model, mask, tost.Recipe.tost(total_steps=10)).advice == ()


def test_plan_torchvision_resnet18(capsys) -> None:
    pytest.importorskip("torchvision")
    data = run_json(capsys, "plan", "tv:resnet18", "--sparsity", "0.95", "--input-size", "3", "32", "32")
    # 20 convs, but by default the 3 downsample 1x1 convs get no ghost skip (skip_pointwise=False).
    assert len(data["sites"]["neurons"]) == 17 and len(data["sites"]["skips"]) == 17
    assert data["layers"]["kept"] == round(0.05 * data["layers"]["total"])
    assert data["macs"]["dense"] > data["macs"]["masked"] > 0


def test_plan_timm_with_recipe_overrides(capsys) -> None:
    pytest.importorskip("timm")
    data = run_json(capsys, "plan", "timm:resnet18", "--mask", "random", "--set", "ghost_skips=False",
                    "--set", "soft_activation=mish", "--input-size", "3", "32", "32")
    assert "skips" not in data["sites"] and len(data["sites"]["neurons"]) == 17
    assert data["recipe"]["soft_activation"] == "mish"


def test_plan_module_callable(capsys) -> None:
    data = run_json(capsys, "plan", "tests.conftest:TinyNet", "--recipe", "baseline", "--input-size", "3", "16", "16")
    assert data["sites"] == {} and data["model_params"] == sum(p.numel() for p in TinyNet().parameters())


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "tv:resnt18"], "torchvision has no model 'resnt18'. Did you mean 'resnet18'?"),
        (["plan", "timm:resnet18x"], "timm has no model 'resnet18x'. Did you mean 'resnet18'?"),
        (["plan", "tests.conftest:TinyNet", "--mask", "/nonexistent/mask.pt"], "No mask at '/nonexistent/mask.pt'"),
        (["plan", "tests.conftest:TinyNet", "--mask", "ekr"], "--mask 'ekr' is neither a method nor a file. Did you"),
        (["plan", "tests.conftest:TinyNet", "--mask", "NOTES"], "is not a mask torch.load can read"),
        (["report", "NOTES"], "is not a checkpoint torch.load can read"),
        (["report", "."], "is a directory, not a checkpoint"),
    ],
)
def test_cli_user_mistakes_are_one_error_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    (tmp_path / "NOTES").write_text("not a checkpoint\n")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_cli_without_the_timm_extra_says_how_to_install_it(library, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, library, None)  # import raises ImportError, as in a core install
    spec = {"timm": "timm:resnet18", "torchvision": "tv:resnet18"}[library]
    assert main(["plan", spec]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{library} is not installed" in err and 'pip install "tost-surgery[timm]"' in err


def test_report_of_a_finalized_checkpoint_counts_the_layers_left_dense(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    mask = tost.masks.erk(model, 0.7, seed=0)
    assert any(bool(m.all()) for m in mask.values())  # ERK leaves the small layers dense
    tost.prepare(model, mask)
    torch.save(model.state_dict(), tmp_path / "prepared.pt")
    tost.finalize(model)
    torch.save(model.state_dict(), tmp_path / "final.pt")
    prepared = run_json(capsys, "report", str(tmp_path / "prepared.pt"))
    final = run_json(capsys, "report", str(tmp_path / "final.pt"))
    assert [r["name"] for r in final["rows"]] == [r["name"] for r in prepared["rows"]]
    for key in ("kept", "total", "density"):
        assert final[key] == prepared[key], key


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
