"""The examples users copy from: CIFAR training end to end, the timm quickstart, Lightning and Accelerate glue."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import TinyNet, bernoulli_mask

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"
needs_subset = pytest.mark.skipif(not SUBSET.is_file(), reason=f"the shared CIFAR-10 subset is missing: {SUBSET}")
# One thread per process: the suite runs two workers on two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_cifar() -> ModuleType:
    return load_example("train_cifar")


# --------------------------------------------------------------------------- train_cifar.py


@needs_subset
def test_train_cifar_runs_end_to_end_in_a_new_process(tmp_path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, str(EXAMPLES / "train_cifar.py"), "--data", str(SUBSET), "--subset", "256"]
    command += ["--epochs", "1", "--arch", "resnet20", "--threads", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "epoch   1/1" in output and "Summary" in output and "test accuracy (finalized)" in output, output

    rows = list(csv.DictReader((out / "log.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and rows[0]["scaffolding"] == "retired"
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["recipe"] == "tost" and log["config"]["recipe_settings"]["ghost_skips"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["steps"] == 2
    assert summary["sparsity"] == pytest.approx(0.95, abs=1e-3)

    models = load_example("cifar_models")
    state = torch.load(out / "model.pt", weights_only=True)
    plain = models.create_model("resnet20", num_classes=10)
    plain.load_state_dict(state, strict=True)  # the finalized model: original keys, nothing of the scaffolding
    mask = torch.load(out / "mask.pt", weights_only=True)
    assert all(torch.all(state[name][~keep] == 0) for name, keep in mask.items())


@needs_subset
def test_train_cifar_with_a_validation_split_and_a_mask_file(train_cifar, tmp_path) -> None:
    common = ["--data", str(SUBSET), "--subset", "96", "--batch-size", "32", "--epochs", "1", "--no-progress"]
    first = train_cifar.main([*common, "--val-split", "0.25", "--mask", "random", "--out", str(tmp_path / "a")])
    assert first["final_val_acc"] is not None and first["best_val_acc"] == first["final_val_acc"]
    rows = list(csv.DictReader((tmp_path / "a" / "log.csv").open()))
    assert rows[0]["val_acc"] != "nan"

    # The finalized model of the first run is a pruned checkpoint: its exact zeros are the mask of the second.
    second = train_cifar.main([*common, "--mask", str(tmp_path / "a" / "model.pt"), "--out", str(tmp_path / "b")])
    saved_a = torch.load(tmp_path / "a" / "mask.pt", weights_only=True)
    saved_b = torch.load(tmp_path / "b" / "mask.pt", weights_only=True)
    assert set(saved_b) <= set(saved_a) and all(torch.equal(saved_b[k], saved_a[k]) for k in saved_b)
    assert second["kept_weights"] == sum(int(m.sum()) for m in saved_b.values())
    third = train_cifar.main([*common, "--mask", str(tmp_path / "a" / "mask.pt"), "--out", str(tmp_path / "c")])
    assert third["kept_weights"] == first["kept_weights"]


def write_cifar_folder(root: Path, hundred: bool) -> Path:
    """A tiny stand-in for the python release of CIFAR-10 or CIFAR-100 (same file layout and keys)."""
    generator = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    classes, key = (100, b"fine_labels") if hundred else (10, b"labels")

    def dump(name: str, count: int) -> None:
        data = {b"data": generator.integers(0, 256, (count, 3072), dtype=np.uint8)}
        data[key] = [int(v) for v in generator.integers(0, classes, count)]
        with open(folder / name, "wb") as file:
            pickle.dump(data, file)

    for name in ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        dump(name, 40 if hundred else 8)
    return folder


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar-10-batches-py", "cifar-100-python"])
def test_train_cifar_reads_the_python_release_of_cifar(train_cifar, tmp_path, hundred) -> None:
    write_cifar_folder(tmp_path / "data", hundred)
    arrays, source = train_cifar.load_cifar(tmp_path / "data")  # the parent folder is found too
    assert source == ("CIFAR-100" if hundred else "CIFAR-10")
    assert arrays["x_train"].shape == (40, 3, 32, 32) and arrays["x_train"].dtype == np.uint8
    summary = train_cifar.main(
        ["--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "run")]
    )
    assert summary["steps"] == 2
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["fc.weight"].shape[0] == (100 if hundred else 10)


def test_train_cifar_says_clearly_when_the_data_is_missing(train_cifar, tmp_path) -> None:
    with pytest.raises(SystemExit, match="no CIFAR data at .*nowhere.npz(.|\n)*cifar-10-batches-py"):
        train_cifar.main(["--data", str(tmp_path / "nowhere.npz"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_augmentation_flips_and_crops_deterministically(train_cifar) -> None:
    data = SimpleNamespace(x_train=torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), y_train=torch.arange(6))
    first = train_cifar.Batches(data, batch_size=3, seed=0)
    second = train_cifar.Batches(data, batch_size=3, seed=0)
    a, b = list(first.epoch()), list(second.epoch())
    assert len(a) == 2 and all(torch.equal(x, y) and torch.equal(s, t) for (x, s), (y, t) in zip(a, b))
    x = first.normalize(data.x_train)
    crops = first.augment(x)
    assert crops.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for image, crop in zip(padded, crops):  # every output is a 32x32 window of the padded image, maybe flipped
        windows = image.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 32, 32)
        assert any(torch.equal(crop, w) or torch.equal(crop.flip(2), w) for w in windows)


def test_every_cifar_architecture_is_prepared_trained_and_finalized() -> None:
    models = load_example("cifar_models")
    x = torch.randn(2, 3, 32, 32)
    for arch in models.ARCHITECTURES:
        torch.manual_seed(0)
        model = models.create_model(arch, num_classes=100)
        keys = list(model.state_dict())
        tost.prepare(model, tost.masks.erk(model, 0.9, seed=0), Recipe.tost(total_steps=1))
        assert len(tost.graph(model).graph.nodes) > 10
        model(x).sum().backward()
        tost.step(model)
        tost.finalize(model)
        assert list(model.state_dict()) == keys and model(x).shape == (2, 100), arch
    assert sum(p.numel() for p in models.create_model("resnet20", 10).parameters()) == 269_722  # He et al.: 0.27M


# --------------------------------------------------------------------------- timm_quickstart.py


def test_timm_quickstart_runs_with_a_tiny_timm_model() -> None:
    pytest.importorskip("timm")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "timm_quickstart.py"), "test_resnet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=ENV,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "nonzero weights" in output and "global" in output and "last loss" in output, output
    code = [line for line in (EXAMPLES / "timm_quickstart.py").read_text().splitlines() if line.strip()]
    assert len([line for line in code if not line.startswith(('"""', "import", "from"))]) <= 12  # about ten lines


# --------------------------------------------------------------------------- Lightning and Accelerate glue


class LitModule(nn.Module):
    """Stands in for a LightningModule that holds the prepared model as an attribute."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def test_lightning_callback_binds_the_trainer_optimizers_and_finalizes() -> None:
    callback_module = load_example("lightning_callback")
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet()), Recipe.tost(total_steps=4, warmup=0.5))
    module = LitModule(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    trainer = SimpleNamespace(optimizers=[optimizer])
    callback = callback_module.TostCallback()
    callback.on_train_start(trainer, module)
    x = torch.randn(2, 3, 8, 8)
    for micro_batch in range(4):  # accumulate_grad_batches=2: Lightning steps every second batch
        model(x).sum().backward()
        if micro_batch % 2:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert model.tost.schedule.steps_taken == 2
    callback.on_train_end(trainer, module)
    assert not hasattr(model, "tost")  # finalized: a plain sparse model
    optimizer.step()  # unbound, no error


def test_lightning_callback_warns_when_the_warmup_is_not_over_and_refuses_unprepared_modules() -> None:
    callback_module = load_example("lightning_callback")
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet()), Recipe.tost(total_steps=100))
    callback = callback_module.TostCallback()
    trainer = SimpleNamespace(optimizers=[torch.optim.SGD(model.parameters(), lr=0.01)])
    callback.on_train_start(trainer, LitModule(model))
    with pytest.warns(UserWarning, match="did not finalize"):
        callback.on_train_end(trainer, LitModule(model))
    assert hasattr(model, "tost")
    with pytest.raises(tost.StateError, match="before Trainer.fit"):
        callback.on_train_start(trainer, LitModule(TinyNet()))


class AcceleratedOptimizer:
    """Like accelerate's wrapper: steps the torch optimizer only when gradients are synchronized."""

    def __init__(self, optimizer: torch.optim.Optimizer, accumulate: int) -> None:
        self.optimizer, self.accumulate, self.calls = optimizer, accumulate, 0

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.accumulate == 0:
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.calls % self.accumulate == 0:
            self.optimizer.zero_grad(set_to_none=set_to_none)


def test_accelerate_hook_binds_the_unwrapped_model_to_the_inner_optimizer() -> None:
    hook = load_example("accelerate_hook")
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet()), Recipe.tost(total_steps=10))
    wrapped = SimpleNamespace(module=model)  # what DistributedDataParallel looks like to unwrap_model
    accelerator = SimpleNamespace(unwrap_model=lambda m: m.module)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), accumulate=3)
    handle = hook.bind_accelerate(accelerator, wrapped, optimizer)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(7):
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert model.tost.schedule.steps_taken == 2  # 7 micro-batches, a weight update every 3
    handle.remove()


@needs_subset
def test_train_cifar_with_learned_gradinit_scales(train_cifar, tmp_path) -> None:
    common = ["--data", str(SUBSET), "--subset", "96", "--batch-size", "32", "--epochs", "1", "--no-progress"]
    summary = train_cifar.main([*common, "--init", "gradinit", "--gradinit-steps", "2", "--out", str(tmp_path)])
    log = json.loads((tmp_path / "log.json").read_text())
    settings = log["config"]["recipe_settings"]
    assert settings["rescale_init"] is True and settings["rescale_rule"] == "gradinit"
    assert set(summary["gradinit_scales"]) == {"fc.weight"}  # the only ResNet-20 layer feeding no BatchNorm
