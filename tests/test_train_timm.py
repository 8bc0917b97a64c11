"""examples/train_timm.py as a timm user runs it, on a tiny ImageFolder written from the shared CIFAR-10 subset.

A run of two epochs keeps a checkpoint per epoch; a second run resumes from the first one, taken in
the middle of the warm-up, and must repeat the rest of the first run exactly (logs, model, EMA).
Then two gloo processes under torchrun, with an EMA of decay 0: the EMA copy must evaluate exactly
like the model during the warm-up and after it, and finalize to the same weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

import tost_surgery as tost

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_timm.py"
SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
needs_subset = pytest.mark.skipif(not SUBSET.is_file(), reason=f"the shared CIFAR-10 subset is missing: {SUBSET}")
# One thread per process (the suite runs two workers on two cores); wide lines for the assertions on output.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
MODEL, CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = "test_resnet", 10, 20, 6
# 200 training images, batches of 16 (12 per epoch), an optimizer step every 2 of them: 6 steps per epoch.
COMMON = [
    *("--model", MODEL, "--img-size", "32", "--batch-size", "16", "--grad-accum-steps", "2", "--workers", "0"),
    *("--sparsity", "0.9", "--model-ema", "--no-progress"),
]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """DATA/train/<class>/*.png and DATA/val/<class>/*.png: 32x32 CIFAR-10 images, 260 in all."""
    root = tmp_path_factory.mktemp("images")
    with np.load(SUBSET) as archive:
        images, labels = archive["x_train"], archive["y_train"]
    for label in range(CLASSES):
        index = np.flatnonzero(labels == label)
        for split, chosen in (("train", index[:TRAIN_PER_CLASS]), ("val", index[TRAIN_PER_CLASS:][:VAL_PER_CLASS])):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in chosen:
                Image.fromarray(images[i].transpose(1, 2, 0)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_train_timm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(command: list[str], env: dict[str, str] = ENV) -> str:
    """Run ``command`` in its own process group; its output, after checking it succeeded."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and the workers it started
        output, _ = process.communicate()
        pytest.fail(f"{command[2:4]} did not finish within {TIMEOUT_S} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-5000:]
    return output


def log_rows(out: Path) -> list[dict]:
    """The per-epoch log without its wall-clock column."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def load_strictly(path: Path) -> dict[str, torch.Tensor]:
    """A finalized state_dict, after checking it loads strictly into a fresh timm model of the same name."""
    state = torch.load(path, weights_only=True)
    timm.create_model(MODEL, pretrained=False, num_classes=CLASSES).load_state_dict(state, strict=True)
    return state


def assert_sparse(state: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> None:
    assert mask and all(torch.all(state[name][~keep] == 0) for name, keep in mask.items())
    kept = sum(int(keep.sum()) for keep in mask.values())
    assert kept == pytest.approx(0.1 * sum(keep.numel() for keep in mask.values()), abs=1)  # --sparsity 0.9
    assert sum(int(state[name].count_nonzero()) for name in mask) > 0.99 * kept  # the kept weights trained


@needs_subset
def test_resumed_mid_warmup_run_repeats_the_uninterrupted_one_exactly(example, image_folder, tmp_path, capsys) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = [*COMMON, "--data", str(image_folder), "--epochs", "2", "--set", "warmup=0.75"]  # warm-up: 9 of 12 steps
    args += ["--model-ema-decay", "0.9", "--amp", "--channels-last"]  # bfloat16 autocast on CPU
    output = run([sys.executable, str(EXAMPLE), *args, "--save-every", "1", "--output", str(whole)])
    assert "epoch   2" in output and "Summary" in output, output

    checkpoint = torch.load(whole / "epoch-1.pth", weights_only=True)
    assert checkpoint["optimizer_steps"] == 6  # in the middle of the warm-up
    assert checkpoint["log"][-1]["scaffolding"] == "neurons+skips" and checkpoint["log"][-1]["label_smoothing"] > 0

    # Resumed in this process: nothing but the checkpoint carries over from the first run.
    summary = example.main([*args, "--resume", str(whole / "epoch-1.pth"), "--output", str(resumed)])
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "epoch   1 " not in printed and "epoch   2 " in printed, printed
    assert summary["updates"] == 12 and len(log_rows(resumed)) == 2
    rows = log_rows(whole)
    assert [row["scaffolding"] for row in rows] == ["neurons+skips", "retired"]
    assert log_rows(resumed) == rows  # every loss, accuracy, learning rate and smoothing, exactly

    mask = torch.load(whole / "mask.pt", weights_only=True)
    for name in ("model.pt", "model_ema.pt"):
        state, again = load_strictly(whole / name), load_strictly(resumed / name)
        assert all(torch.equal(state[key], again[key]) for key in state), name
        assert_sparse(state, mask)
    model, ema = load_strictly(whole / "model.pt"), load_strictly(whole / "model_ema.pt")
    assert not all(torch.equal(model[key], ema[key]) for key in mask)  # decay 0.9: a real average
    assert len((whole / "log.csv").read_text().splitlines()) == 1 + 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_subset
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed without gloo")
def test_torchrun_with_two_gloo_processes_and_an_ema_that_follows_the_schedule(image_folder, tmp_path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1"]
    command += [f"--master-port={free_port()}", str(EXAMPLE), *COMMON, "--data", str(image_folder)]
    # 100 images per process: 3 optimizer steps per epoch; the warm-up ends at step 4, in epoch 2.
    command += ["--epochs", "2", "--set", "warmup=0.75", "--model-ema-decay", "0", "--output", str(out)]
    env = dict(ENV, GLOO_SOCKET_IFNAME="lo") if "lo" in {n for _, n in socket.if_nameindex()} else ENV
    output = run(command, env)
    assert "2 processes" in output and "Summary" in output, output

    rows = log_rows(out)
    assert [row["scaffolding"] for row in rows] == ["neurons+skips", "retired"]
    for row in rows:  # decay 0: the EMA copy is the model, also mid-warm-up (ModelEmaV3 copies the step in place)
        assert all(row[f"ema_val_{k}"] == row[f"val_{k}"] for k in ("loss", "top1", "top5")), row
    mask = torch.load(out / "mask.pt", weights_only=True)
    model, ema = load_strictly(out / "model.pt"), load_strictly(out / "model_ema.pt")
    assert_sparse(model, mask)
    assert all(torch.equal(model[key], ema[key]) for key in model)


# --------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        (["--set", "warmpu=0.5"], "Recipe has no setting 'warmpu'.*warmup"),
        (["--set", "warmup"], "--set takes FIELD=VALUE"),
        (["--set", "warmup=2"], r"warmup is a fraction of total_steps in \(0, 1\]"),
        (["--model", "resnet_nonexistent"], "is not a timm model"),
        (["--sparsity", "1.5"], r"--sparsity is a fraction in \(0, 1\)"),
        (["--grad-accum-steps", "0"], "--grad-accum-steps must be at least 1"),
        (["--mask", "nowhere.pt"], "--mask 'nowhere.pt' is neither one of random, erk"),
        (["--resume", "nowhere.pth"], "--resume nowhere.pth: no such file"),
        (["--data", "nowhere"], "expected nowhere/train/<class>/<image> and nowhere/val/<class>/<image>"),
    ],
)
def test_command_line_mistakes_are_an_error_line_and_exit_code_2(example, tmp_path, capsys, mistake, message) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()  # any of timm's names for the evaluation split
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--data", str(tmp_path), *mistake])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and re.search(message, error, re.DOTALL), error


def test_resume_refuses_a_file_of_another_kind_model_or_recipe(example, tmp_path, capsys) -> None:
    args = SimpleNamespace(model=MODEL)
    recipe = tost.Recipe.tost(total_steps=12)
    checkpoint = {"recipe": recipe.to_dict(), "model_name": MODEL, "state_dict": {}}
    cases = {
        "text.pth": (b"not a checkpoint", "is not a checkpoint of this script"),
        "tensor.pth": (torch.zeros(2), "is not a checkpoint of this script"),
        "other_model.pth": ({**checkpoint, "model_name": "resnet18"}, "holds a resnet18, not a test_resnet"),
        "other_recipe.pth": (
            {**checkpoint, "recipe": tost.Recipe.tost(total_steps=12, warmup=0.5).to_dict()},
            "another recipe.\n  checkpoint: {'warmup': 0.5}\n  now:        {'warmup': 0.3}",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(SystemExit) as exit_info:
            example.load_checkpoint(path, args, recipe)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert message in error and "Hint:" in error, (name, error)
    torch.save(checkpoint, tmp_path / "good.pth")
    assert example.load_checkpoint(tmp_path / "good.pth", args, recipe)["model_name"] == MODEL


@needs_subset
def test_a_mask_that_does_not_fit_the_model_is_the_library_message_and_exit_code_2(example, image_folder, capsys):
    with pytest.raises(SystemExit) as exit_info:  # 2:4 needs input sizes divisible by 4; the stem has 3 * 3 * 3
        example.main([*COMMON, "--data", str(image_folder), "--mask", "nm", "--output", str(image_folder / "nm")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: Layer 'conv1.0.weight' has an input size of 27" in error and "Hint:" in error, error
    assert not (image_folder / "nm").exists()


def test_overrides_are_python_literals_or_bare_words(example) -> None:
    settings = example.parse_overrides(["warmup=0.5", "soft_activation=mish", "ghost_skips=False", "skip_init=1e-3"])
    assert settings == {"warmup": 0.5, "soft_activation": "mish", "ghost_skips": False, "skip_init": 1e-3}
    recipe = example.build_recipe(SimpleNamespace(recipe="baseline", overrides={"label_smoothing": 0.1}), 10)
    assert recipe == tost.Recipe.baseline(total_steps=10, label_smoothing=0.1) and not recipe.ghost_neurons
