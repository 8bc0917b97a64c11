"""Checkpoints: save mid-warm-up, load in a new process, continue bit-exactly.

The test runs an uninterrupted run and a run that saves a checkpoint after ``SAVE_AT`` steps,
then this file as a script in a new process that prepares the same model, loads the checkpoint
and trains to the end. One technique retires before the checkpoint, one after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tost_surgery as tost

STEPS = 10
SAVE_AT = 4
RECIPE = dict(total_steps=STEPS, warmup=0.6, neuron_warmup=0.3)
"""Ghost neurons retire after 3 steps (before the checkpoint), ghost skips and labels after 6."""
ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Conv-BN-ReLU, a second conv-BN, dropout (so the RNG state matters too), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of each step depends on the step only: a deterministic order in any process."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 3, 12, 12, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """What every process does first: the same seed, model, mask, recipe, optimizer."""
    torch.manual_seed(0)
    model = Net()
    mask = tost.masks.random(model, sparsity=0.7, seed=0)
    tost.prepare(model, mask, tost.Recipe.tost(**RECIPE))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    return model, optimizer, scheduler


def train(first: int, last: int, checkpoint_in: str | None, checkpoint_out: str | None) -> list[dict]:
    torch.set_num_threads(1)
    model, optimizer, scheduler = build()
    if checkpoint_in:
        saved = torch.load(checkpoint_in, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
    tost.bind(model, optimizer)
    model.train()
    log = []
    for step in range(first, last):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y, label_smoothing=tost.label_smoothing(model))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        active = sorted(model.tost.surgery.runner.active)
        log.append({"step": step, "loss": loss.item().hex(), "active": active})
    if checkpoint_out:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        torch.save(state, checkpoint_out)
    if last == STEPS:
        final = tost.finalize(model)
        log.append({"fc": [v.hex() for v in final.fc.weight.detach().flatten().tolist()]})
    return log


def run_in_new_process(tmp_path: Path, name: str, *args: str) -> list[dict]:
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, __file__, str(out), *args], cwd=ROOT, check=True, timeout=300)
    return json.loads(out.read_text())


def test_a_checkpoint_taken_mid_warmup_resumes_bit_exactly_in_a_new_process(tmp_path) -> None:
    checkpoint = str(tmp_path / "checkpoint.pt")
    uninterrupted = train(0, STEPS, None, None)
    before = train(0, SAVE_AT, None, checkpoint)
    after = run_in_new_process(tmp_path, "after", str(SAVE_AT), str(STEPS), checkpoint, "")

    assert before + after == uninterrupted  # every loss, bit for bit, and the finalized weights
    actives = [entry["active"] for entry in uninterrupted[:STEPS]]
    assert actives[SAVE_AT - 2 : SAVE_AT] == [["skips"], ["skips"]]  # neurons retired before the checkpoint
    assert actives[SAVE_AT:] == [["skips"]] + [[]] * (STEPS - SAVE_AT - 1)  # skips retire after it, at step 6
    assert len({entry["loss"] for entry in uninterrupted[:STEPS]}) == STEPS  # training moved


def test_the_checkpoint_holds_the_schedule_and_the_masks(tmp_path) -> None:
    model, optimizer, _ = build()
    tost.bind(model, optimizer)
    for step in range(SAVE_AT):
        x, y = batch(step)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    state = model.state_dict()
    assert state["tost.schedule.step"].item() == SAVE_AT
    assert any(key.endswith("parametrizations.weight.0.mask") for key in state)
    fresh, _, _ = build()
    fresh.load_state_dict(state)
    assert fresh.tost.schedule.steps_taken == SAVE_AT
    assert fresh.tost.surgery.runner.active == model.tost.surgery.runner.active == frozenset({"skips"})
    assert tost.label_smoothing(fresh) == tost.label_smoothing(model)


if __name__ == "__main__":
    out, first, last, checkpoint_in, checkpoint_out = sys.argv[1:]
    Path(out).write_text(json.dumps(train(int(first), int(last), checkpoint_in or None, checkpoint_out or None)))
