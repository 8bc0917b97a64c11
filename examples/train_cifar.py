"""Train a sparse CIFAR-10/100 network with the ToST recipe, or with the default protocol.

The paper's protocol: SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch 128, one-cycle
(or cosine) learning rate, random flips and reflect-padded 4-pixel crops; any mask, any of the
paper's architectures. Prints one line per epoch (and live progress bars in a terminal), writes
``log.csv`` / ``log.json`` after every epoch, then finalizes the model and saves its plain
sparse ``state_dict`` (``model.pt``) with the mask (``mask.pt``) and ``summary.json``.

    python examples/train_cifar.py --data ../shared/data/cifar10-subset.npz --epochs 1 --subset 1024
    python examples/train_cifar.py --data ~/data/cifar-10-batches-py --arch resnet32 --mask snip --sparsity 0.98
    python examples/train_cifar.py --data ~/data/cifar-100-python --recipe baseline --val-split 0.1

Data: a ``.npz`` with ``x_train, y_train, x_test, y_test`` (uint8 NCHW images, integer labels),
or the python release of CIFAR (``cifar-10-batches-py`` or ``cifar-100-python`` folder, from
https://www.cs.toronto.edu/~kriz/cifar.html). With ``--val-split`` the per-epoch evaluation runs
on a held-out part of the training set (split with a fixed seed), so choosing settings never
looks at the test set; the test set is evaluated once, on the finalized model.

Masks: ``random`` / ``erk`` (data-free), ``snip`` / ``grasp`` (``--prune-batches`` training
batches), ``synflow`` (data-free, 100 rounds on one 3x32x32 input), ``lottery`` (iterative
magnitude pruning with rewinding to the initialization: ``--lottery-rounds`` rounds of
``--lottery-epochs`` epochs each with the default protocol, i.e. that many extra epochs of
training before the run itself), or a FILE: a saved ``{parameter name: bool tensor}`` or a pruned
checkpoint (its exact zeros are the pruned weights).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cifar_models import ARCHITECTURES, create_model  # noqa: E402

import tost_surgery as tost  # noqa: E402

SPLIT_SEED = 0
"""The validation split is the same whatever --seed is, so runs with different seeds compare."""
MASKS = ("random", "erk", "snip", "grasp", "synflow", "lottery")
console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:  # a log file or CI: wide lines, no live display
    console = Console(width=120)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """uint8 images (N, 3, 32, 32) and int64 labels; ``x_val`` is empty without a validation split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str


def load_cifar(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays of a CIFAR ``.npz`` or python-release folder; a clear error when there is none."""
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as archive:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
            if missing:
                raise SystemExit(f"error: {path} has no {sorted(missing)}; expected x_train, y_train, x_test, y_test.")
            return {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}, path.name
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
            test = _unpickle(folder / "test_batch")
            arrays = {
                "x_train": np.concatenate([b[b"data"] for b in train]),
                "y_train": np.concatenate([b[b"labels"] for b in train]),
                "x_test": test[b"data"],
                "y_test": np.asarray(test[b"labels"]),
            }
            return {k: v.reshape(-1, 3, 32, 32) if k.startswith("x") else v for k, v in arrays.items()}, "CIFAR-10"
        if (folder / "train").is_file() and (folder / "test").is_file():
            train, test = _unpickle(folder / "train"), _unpickle(folder / "test")
            arrays = {
                "x_train": train[b"data"].reshape(-1, 3, 32, 32),
                "y_train": np.asarray(train[b"fine_labels"]),
                "x_test": test[b"data"].reshape(-1, 3, 32, 32),
                "y_test": np.asarray(test[b"fine_labels"]),
            }
            return arrays, "CIFAR-100"
    raise SystemExit(
        f"error: no CIFAR data at {path}\n"
        "  expected a .npz with x_train, y_train, x_test, y_test (uint8 NCHW images),\n"
        "  or the python release of CIFAR: a cifar-10-batches-py or cifar-100-python folder\n"
        "  (https://www.cs.toronto.edu/~kriz/cifar.html). The shared subset: ../shared/data/cifar10-subset.npz"
    )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as file:
        return pickle.load(file, encoding="bytes")


def prepare_data(path: Path, val_split: float, subset: int | None, device: torch.device) -> Data:
    arrays, source = load_cifar(path)
    x_train, y_train = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]).long()
    x_test, y_test = torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]).long()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if subset:  # the first images of each set: a fixed, quick subset for smoke tests
        x_train, y_train, x_test, y_test = x_train[:subset], y_train[:subset], x_test[:subset], y_test[:subset]
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(val_split * len(y_train))
    val, train = order[:n_val], order[n_val:]
    tensors = [x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test]
    return Data(*(t.to(device) for t in tensors), num_classes=num_classes, source=source)


class Batches:
    """Normalized, augmented batches from uint8 tensors, in an order set by one seeded generator."""

    def __init__(self, data: Data, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = data.x_train, data.y_train, batch_size
        pixels = self.x.float().div(255)
        self.mean = pixels.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
        self.std = pixels.std(dim=(0, 2, 3)).view(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, len(self.y) // self.batch_size)  # full batches only: BatchNorm needs more than one image

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div(255) - self.mean) / self.std

    def epoch(self):
        """One shuffled pass of augmented batches."""
        order = torch.randperm(len(self.y), generator=self.generator)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size].to(self.x.device)
            yield self.augment(self.normalize(self.x[index])), self.y[index]

    def head(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``count`` batches, not augmented, for SNIP / GraSP / GradInit; draws no random numbers,
        so the training order is the same whichever mask or init is chosen."""
        spans = [slice(i * self.batch_size, (i + 1) * self.batch_size) for i in range(min(count, len(self)))]
        return [(self.normalize(self.x[span]), self.y[span]) for span in spans]

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random horizontal flips and 32x32 crops of the 4-pixel reflect-padded image."""
        n = len(x)
        flip = (torch.rand(n, generator=self.generator) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
        dy, dx = (torch.randint(0, 9, (n,), generator=self.generator).to(x.device) for _ in range(2))
        rows = (dy.view(-1, 1) + torch.arange(32, device=x.device)).view(n, 1, 32, 1).expand(n, 3, 32, 40)
        padded = padded.gather(2, rows)
        cols = (dx.view(-1, 1) + torch.arange(32, device=x.device)).view(n, 1, 1, 32).expand(n, 3, 32, 32)
        return padded.gather(3, cols)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: Batches) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (BatchNorm running statistics)."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(y), 500):
        out = model(batches.normalize(x[i : i + 500]))
        loss += F.cross_entropy(out, y[i : i + 500], reduction="sum").item()
        correct += (out.argmax(dim=1) == y[i : i + 500]).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


# --------------------------------------------------------------------------- masks


def make_mask(model: nn.Module, args: argparse.Namespace, batches: Batches) -> dict[str, torch.Tensor]:
    exclude = args.exclude
    if args.mask == "random":
        return tost.masks.random(model, args.sparsity, seed=args.seed, exclude=exclude)
    if args.mask == "erk":
        return tost.masks.erk(model, args.sparsity, seed=args.seed, exclude=exclude)
    if args.mask in ("snip", "grasp"):
        data = batches.head(args.prune_batches)
        maker = tost.masks.snip if args.mask == "snip" else tost.masks.grasp
        return maker(model, args.sparsity, data, exclude=exclude)
    if args.mask == "synflow":
        return tost.masks.synflow(model, args.sparsity, input_shape=(3, 32, 32), exclude=exclude)
    if args.mask == "lottery":

        def train_fn(candidate: nn.Module) -> None:  # the default protocol, --lottery-epochs epochs
            run_epochs(candidate, batches, args, args.lottery_epochs, progress=None, log=None)

        ticket = tost.masks.lottery(model, args.sparsity, train_fn, rounds=args.lottery_rounds, exclude=exclude)
        model.load_state_dict(ticket.rewind_state)
        return ticket.mask
    saved = torch.load(args.mask, map_location="cpu", weights_only=True)
    if all(value.dtype == torch.bool for value in saved.values()):
        return {name: value.to(next(model.parameters()).device) for name, value in saved.items()}
    return tost.masks.from_state_dict(saved)  # a pruned checkpoint: its exact zeros are the pruned weights


# --------------------------------------------------------------------------- training


def build_optimizer(model: nn.Module, args: argparse.Namespace, total_steps: int):
    """SGD with Nesterov momentum; the scaffolding's parameters in a group of their own."""
    scaffold = list(model.tost.parameters()) if hasattr(model, "tost") else []  # everything prepare added
    ids = {id(p) for p in scaffold}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if scaffold:
        groups.append({"params": scaffold, "weight_decay": args.scaffold_weight_decay})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    if args.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.15, cycle_momentum=False
        )
    return optimizer, scheduler


def run_epochs(model, batches, args, epochs, *, progress, log) -> None:
    """Train a prepared ``model`` for ``epochs``, calling ``log`` after each epoch."""
    total_steps = epochs * len(batches)
    optimizer, scheduler = build_optimizer(model, args, total_steps)
    tost.bind(model, optimizer)  # each optimizer.step() also advances the ToST schedule
    model.train()
    task = progress.add_task("train", total=total_steps, info="") if progress else None
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        seen, loss_sum, correct = 0, torch.zeros(()), torch.zeros((), dtype=torch.long)
        for x, y in batches.epoch():
            out = model(x)
            loss = F.cross_entropy(out, y, label_smoothing=tost.label_smoothing(model))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
            loss_sum = loss_sum.to(loss.device) + loss.detach() * len(y)  # no GPU sync per step
            correct = correct.to(y.device) + (out.argmax(dim=1) == y).sum()
            if progress is not None and not progress.disable:
                progress.update(task, advance=1, info=f"epoch {epoch}/{epochs}  loss {loss.item():.3f}")
        if log is not None:
            train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
            log(epoch, epochs, model, optimizer, train_loss, train_acc, time.perf_counter() - start)


class EpochLog:
    """One row per epoch, printed and written to ``log.csv`` and ``log.json`` in ``out``."""

    def __init__(self, out: Path, config: dict, data: Data, batches: Batches) -> None:
        self.out, self.config, self.data, self.batches = out, config, data, batches
        self.rows: list[dict] = []

    def __call__(self, epoch, epochs, model, optimizer, train_loss, train_acc, seconds) -> None:
        status = tost.status(model)
        row = {
            "epoch": epoch,
            "step": status.step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": math.nan,
            "val_acc": math.nan,
            "label_smoothing": tost.label_smoothing(model),
            "neuron_blend": status.techniques["neurons"].value,
            "skip_scale": status.techniques["skips"].value,
            "scaffolding": "+".join(n for n in status.active if status.techniques[n].scaffolding) or (
                "retired" if any(t.state == "retired" and t.scaffolding for t in status.techniques.values()) else "none"
            ),
            "seconds": seconds,
        }
        if len(self.data.y_val):
            row["val_loss"], row["val_acc"] = evaluate(model, self.data.x_val, self.data.y_val, self.batches)
        self.rows.append(row)
        with open(self.out / "log.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.rows)
        (self.out / "log.json").write_text(json.dumps({"config": self.config, "epochs": self.rows}, indent=1))
        val = f"  val {row['val_acc']:.2%}" if len(self.data.y_val) else ""
        console.print(
            f"epoch {epoch:>3}/{epochs}  loss {train_loss:.4f}  train {train_acc:.2%}{val}  lr {row['lr']:.4f}  "
            f"smoothing {row['label_smoothing']:.3f}  scaffolding {row['scaffolding']}  {seconds:.1f}s"
        )


def progress_bars(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
    )


def summary_table(rows: list[tuple[str, str]]) -> Table:
    table = Table(title="Summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows:
        table.add_row(key, value)
    return table


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="a CIFAR .npz, or a cifar-10-batches-py / cifar-100-python folder"
    )
    parser.add_argument("--recipe", choices=("tost", "baseline"), default="tost")
    parser.add_argument("--mask", default="erk", help=f"{' | '.join(MASKS)} | FILE (default: erk)")
    parser.add_argument("--sparsity", type=float, default=0.95, help="fraction of the masked weights removed")
    parser.add_argument("--exclude", action="append", default=[], help="parameter pattern left dense, e.g. 'fc.*'")
    parser.add_argument("--arch", default="resnet20", help=f"{' | '.join(ARCHITECTURES)} | timm:NAME")
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument("--lr-schedule", choices=("onecycle", "cosine"), default="onecycle")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--scaffold-weight-decay", type=float, default=None, help="default: --weight-decay")
    parser.add_argument("--warmup", type=float, default=0.3, help="fraction of the steps the scaffolding anneals over")
    parser.add_argument(
        "--init",
        choices=("fan_in", "gradinit", "none"),
        default=None,
        help="layer-wise rescaled init (default: fan_in for tost, none for baseline)",
    )
    parser.add_argument("--gradinit-steps", type=int, default=50)
    parser.add_argument("--val-split", type=float, default=0.0, help="fraction of the training set held out")
    parser.add_argument("--prune-batches", type=int, default=4, help="training batches SNIP / GraSP score on")
    parser.add_argument("--lottery-rounds", type=int, default=2)
    parser.add_argument("--lottery-epochs", type=int, default=1, help="training epochs per lottery round")
    parser.add_argument("--subset", type=int, default=None, help="use only the first N training and test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<name>)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bars")
    args = parser.parse_args(argv)
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity is a fraction in (0, 1), found {args.sparsity}")
    if not 0 <= args.val_split < 1:
        parser.error(f"--val-split is a fraction in [0, 1), found {args.val_split}")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.mask not in MASKS and not Path(args.mask).is_file():
        parser.error(f"--mask {args.mask!r} is neither one of {', '.join(MASKS)} nor a file")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.scaffold_weight_decay is None:
        args.scaffold_weight_decay = args.weight_decay
    if args.init is None:
        args.init = "fan_in" if args.recipe == "tost" else "none"
    name = f"{args.arch}-{args.recipe}-{Path(args.mask).stem}-{args.sparsity:g}-s{args.seed}".replace(":", "_")
    args.out = args.out or Path("runs") / name
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = prepare_data(args.data, args.val_split, args.subset, device)
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]{data.source}[/]: {len(data.y_train):,} train / {len(data.y_val):,} val / {len(data.y_test):,} test "
        f"images, {data.num_classes} classes -> {args.out}"
    )
    torch.manual_seed(args.seed)
    batches = Batches(data, args.batch_size, args.seed)
    model = create_model(args.arch, data.num_classes).to(device)
    mask_start = time.perf_counter()
    mask = make_mask(model, args, batches)
    mask_seconds = time.perf_counter() - mask_start

    total_steps = args.epochs * len(batches)
    rescale = {"rescale_init": args.init != "none"}
    if args.init == "gradinit":
        rescale["rescale_rule"] = "gradinit"  # prepare rescales nothing; gradinit below learns the scales
    if args.recipe == "tost":
        recipe = tost.Recipe.tost(total_steps=total_steps, warmup=args.warmup, **rescale)
    else:
        recipe = tost.Recipe.baseline(**rescale)
    tost.prepare(model, mask, recipe)
    gradinit = None
    if args.init == "gradinit":  # learned per-layer scales, from a few training batches
        gradinit = tost.init.gradinit(model, batches.head(6), steps=args.gradinit_steps)
        console.print(gradinit)
    density = tost.report(model).density
    kept = sum(int(m.sum()) for m in mask.values())
    console.print(
        f"{args.arch}: {sum(p.numel() for p in model.parameters()):,} parameters with the scaffolding; "
        f"the {args.mask} mask keeps {kept:,} weights ({density:.2%}); recipe {args.recipe}, {total_steps:,} steps"
    )

    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    config["recipe_settings"] = recipe.to_dict()
    log = EpochLog(args.out, config, data, batches)
    start = time.perf_counter()
    with progress_bars(not args.no_progress) as progress:
        run_epochs(model, batches, args, args.epochs, progress=progress, log=log)
    train_seconds = time.perf_counter() - start

    model = tost.finalize(model)  # the original class, plain sparse weights
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, batches)
    torch.save(model.state_dict(), args.out / "model.pt")
    torch.save({name: m.cpu() for name, m in mask.items()}, args.out / "mask.pt")
    final = log.rows[-1]
    summary = {
        "arch": args.arch,
        "recipe": args.recipe,
        "mask": args.mask,
        "sparsity": 1 - density,
        "kept_weights": kept,
        "epochs": args.epochs,
        "steps": total_steps,
        "final_train_acc": final["train_acc"],
        "final_val_acc": final["val_acc"] if len(data.y_val) else None,
        "best_val_acc": max(row["val_acc"] for row in log.rows) if len(data.y_val) else None,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "mask_seconds": mask_seconds,
        "train_seconds": train_seconds,
        "gradinit_scales": gradinit.scales if gradinit else None,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    rows = [
        ("data", f"{data.source}, {len(data.y_train):,} train / {len(data.y_val):,} val / {len(data.y_test):,} test"),
        ("model", f"{args.arch}, {kept:,} of the masked weights kept ({1 - density:.2%} sparse, {args.mask} mask)"),
        (
            "recipe",
            f"{args.recipe}, init {args.init}, {args.epochs} epoch{'s' * (args.epochs > 1)} = {total_steps:,} steps",
        ),
        ("final train accuracy", f"{final['train_acc']:.2%}"),
    ]
    if len(data.y_val):
        rows.append(("val accuracy (final / best)", f"{summary['final_val_acc']:.2%} / {summary['best_val_acc']:.2%}"))
    rows += [
        ("test accuracy (finalized)", f"{test_acc:.2%}"),
        ("time", f"mask {mask_seconds:.1f}s, training {train_seconds:.1f}s"),
        ("saved", f"{args.out}/model.pt, mask.pt, log.csv, log.json, summary.json"),
    ]
    console.print(summary_table(rows))
    return summary


if __name__ == "__main__":
    main()
