"""What retiring the scaffolding would do to a network at a point of its training.

Trains one ``benchmarks/accuracy.py`` run (same network, mask, seed, protocol and ``Recipe.tost``)
and, after each epoch in ``--at``, evaluates copies of it on the validation split with the ghost
skips' coefficient ``a`` and the ghost neurons' blend ``b`` set by hand: as trained, with ``a`` ten
times smaller, and with each technique at its end state (``a = 0``, ``b = 1``), alone and together.
BatchNorm uses batch statistics (batches of 500), as in training: the running statistics were
gathered with the scaffolding in place. A network that leans on its ghost skips loses accuracy when ``a`` goes to 0.

Example::

    python benchmarks/retirement.py --arch vgg16_x0.5 --mask snip --sparsity 0.98 --seed 0 --at 0 3 5
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar  # noqa: E402
from accuracy import make_mask  # noqa: E402

import tost_surgery as tost  # noqa: E402


def states(now: dict[str, float]) -> dict[str, dict[str, float]]:
    """The probes at the schedule's values ``now``: coefficients set by hand, by technique (the
    others keep the schedule's value)."""
    return {
        "as trained": {},
        "skips at a / 10": {"skips": now.get("skips", 0.0) / 10},
        "skips retired (a = 0)": {"skips": 0.0},
        "neurons retired (b = 1)": {"neurons": 1.0},
        "both retired": {"skips": 0.0, "neurons": 1.0},
    }


class _StopTraining(Exception):
    pass


def with_coefficients(model: torch.nn.Module, fixed: dict[str, float]) -> torch.nn.Module:
    """A copy of a prepared ``model`` whose schedule returns ``fixed[technique]`` where given."""
    probe = copy.deepcopy(model)
    schedule = probe.tost.schedule
    scheduled = schedule.forward
    schedule.forward = lambda technique: (  # type: ignore[method-assign]
        torch.tensor(fixed[technique], device=schedule.step.device) if technique in fixed else scheduled(technique)
    )
    return probe


@torch.no_grad()
def batch_stats_eval(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> tuple[float, float]:
    """Loss and accuracy with BatchNorm on each batch's statistics (train mode, no update kept)."""
    model.train()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    return loss / len(y), correct / len(y)


def coefficients(model: torch.nn.Module) -> dict[str, float]:
    """The current coefficient of each technique with scaffolding (:func:`tost_surgery.status`)."""
    techniques = tost.status(model).techniques.values()
    return {t.name: t.value for t in techniques if t.scaffolding and t.value is not None}


def probe(model: torch.nn.Module, data: cifar.CifarData) -> list[tuple[str, float, float]]:
    """(state, loss, accuracy) on validation for each of :func:`states`."""
    x, y = data.eval_split("val")
    probes = states(coefficients(model))
    return [(name, *batch_stats_eval(with_coefficients(model, fixed), x, y)) for name, fixed in probes.items()]


def run(
    arch: str, mask_name: str, sparsity: float, seed: int, at: list[int], epochs: int, data_path: str,
    subset: int | None = None,
) -> None:
    """Train the run and print the table of :func:`probe` after each epoch of ``at`` (0: before training)."""
    torch.set_num_threads(1)
    data = cifar.load_cifar(data_path, subset=subset)
    config = cifar.TrainConfig(epochs=epochs)
    torch.manual_seed(seed)
    model = cifar.ARCHITECTURES[arch]()
    mask = make_mask(model, mask_name, sparsity, seed, data)
    tost.prepare(model, mask, tost.Recipe.tost(config.total_steps(len(data.y_train))))
    print(f"{arch} {mask_name} {sparsity:.0%} seed {seed}, Recipe.tost over {epochs} epochs")
    print("validation, BatchNorm on batch statistics")
    print("| epoch | a | b | state | loss | accuracy |")
    print("| ---: | ---: | ---: | --- | ---: | ---: |")

    def report(epoch: int) -> None:
        now = coefficients(model)
        a, b = now.get("skips", 0.0), now.get("neurons", 1.0)
        for name, loss, accuracy in probe(model, data):
            print(f"| {epoch} | {a:.3f} | {b:.3f} | {name} | {loss:.3f} | {accuracy:.2%} |")
        sys.stdout.flush()

    def on_epoch(log: cifar.EpochLog) -> None:
        if log.epoch in at:
            report(log.epoch)
        if log.epoch >= max(at):
            raise _StopTraining

    if 0 in at:
        report(0)
    if max(at) > 0:
        try:
            cifar.train(
                model, data, config, seed,
                label_smoothing=lambda: tost.label_smoothing(model),
                after_optimizer=lambda optimizer: tost.bind(model, optimizer),
                on_epoch=on_epoch,
            )  # fmt: skip
        except _StopTraining:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vgg16_x0.5", choices=sorted(cifar.ARCHITECTURES))
    parser.add_argument("--mask", default="snip", choices=["erk", "snip", "synflow", "random"])
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", type=int, nargs="+", default=[0, 5], help="epochs after which to probe (0: at start)")
    parser.add_argument("--epochs", type=int, default=20, help="the schedule's length (training stops after --at)")
    parser.add_argument("--data", default=str(cifar.DEFAULT_DATA))
    parser.add_argument("--subset", type=int, default=None, help="use only this many images per split (smoke runs)")
    args = parser.parse_args(argv)
    run(args.arch, args.mask, args.sparsity, args.seed, sorted(set(args.at)), args.epochs, args.data, args.subset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
