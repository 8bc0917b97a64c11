"""End-to-end demo: one ERK mask, two protocols (masks only vs. ToST), on real handwritten digits.

Trains two copies of a small CNN from the same initial weights, with the same mask, seed,
optimizer and data order, once with ``Recipe.baseline()`` and once with the full ToST recipe,
then finalizes both, checks that masked weights are exactly zero and exports the ToST model
with ``torch.export``. Then it deploys: the trained model's compressed checkpoint against the
dense one, and a 98%-sparse torchvision resnet18 (an ERK mask; speed needs no training)
accelerated on the CPU, with its per-layer decisions and end-to-end speedup. Uses
scikit-learn's bundled digits: nothing is downloaded, and only temporary files are written.

    python examples/demo.py                 # default run
    python examples/demo.py --quick         # a few seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import tost_surgery as tost

SPLIT_SEED = 0  # the split stays fixed whatever --seed is, so runs with different seeds compare
BATCH_SIZE = 64
console = Console()


@dataclass
class Data:
    """Standardized digit images as ``(N, 1, 8, 8)`` float tensors, labels as int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(quick: bool) -> Data:
    """The 1797 bundled 8x8 digits, a stratified 70/30 split, scaled to [0, 1] then standardized."""
    digits = load_digits()
    x = digits.data.astype("float32") / 16.0  # pixel values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.3, stratify=digits.target, random_state=SPLIT_SEED
    )
    if quick:  # the split is already shuffled, so a prefix still covers every class
        x_train, y_train, x_test, y_test = x_train[:320], y_train[:320], x_test[:160], y_test[:160]
    # One scalar mean/std from the training set: per-pixel statistics blow up on the always-blank border.
    mean, std = x_train.mean(), x_train.std()

    def images(a):
        return torch.from_numpy((a - mean) / std).view(-1, 1, 8, 8)

    return Data(images(x_train), torch.from_numpy(y_train).long(), images(x_test), torch.from_numpy(y_test).long())


def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU: the pattern where ToST puts its ghost skips and ghost neurons."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class DigitsCNN(nn.Module):
    """32-64-128 channels, one stride-2 conv (8x8 -> 4x4), global average pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(block(1, 32), block(32, 64, stride=2), block(64, 128))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def train(model: nn.Module, data: Data, epochs: int, lr: float, seed: int, progress: Progress, label: str) -> float:
    """Train a prepared model in place; returns the wall time in seconds."""
    steps_per_epoch = -(-len(data.y_train) // BATCH_SIZE)
    total_steps = epochs * steps_per_epoch
    # Built after prepare, so the ghost skips' own parameters are trained too.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    tost.bind(model, optimizer)
    # Same seed, same batches: the two protocols differ only in their recipe.
    generator = torch.Generator().manual_seed(seed)
    task = progress.add_task(label, total=total_steps, loss=float("nan"))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for i in range(0, len(order), BATCH_SIZE):
            batch = order[i : i + BATCH_SIZE]
            out = model(data.x_train[batch])
            # 0.0 under Recipe.baseline(), i.e. plain cross-entropy; annealed 0.1 -> 0 under ToST.
            loss = F.cross_entropy(out, data.y_train[batch], label_smoothing=tost.label_smoothing(model))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # also advances the ToST schedule, through bind
            scheduler.step()
            progress.update(task, advance=1, loss=loss.item())
    return time.perf_counter() - start


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode outputs (BatchNorm running statistics), without autograd."""
    model.eval()
    return model(x)


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose top logit is the label."""
    return (out.argmax(dim=1) == y).float().mean().item()


def masked_nonzeros(model: nn.Module, mask: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(nonzero weights where the mask is False, weights where the mask is False)."""
    nonzero = sum(int((model.get_parameter(n)[~m] != 0).sum()) for n, m in mask.items())
    return nonzero, sum(int((~m).sum()) for m in mask.values())


def sparsity_table(model: nn.Module, mask: dict[str, torch.Tensor], sparsity: float) -> Table:
    """Per-layer density read off the finalized weights themselves (exact zeros), not off the mask."""
    table = Table(title=f"Finalized ToST weights (ERK, {sparsity:.0%} sparsity target)")
    for column in ("layer", "shape"):
        table.add_column(column)
    for column in ("kept / total", "density"):
        table.add_column(column, justify="right")
    kept_all = total_all = 0
    for name in mask:
        weight = model.get_parameter(name)
        kept, total = int((weight != 0).sum()), weight.numel()
        kept_all, total_all = kept_all + kept, total_all + total
        table.add_row(name, "x".join(map(str, weight.shape)), f"{kept:,} / {total:,}", f"{kept / total:.2%}")
    table.add_section()
    table.add_row("global", "", f"{kept_all:,} / {total_all:,}", f"{kept_all / total_all:.2%}", style="bold")
    return table


def scaffold_summary(model: nn.Module) -> str:
    """What prepare inserted, read from the rewritten training graph (nodes tagged in node.meta)."""
    nodes = list(tost.graph(model, training=True).graph.nodes)
    neurons = sum(n.meta.get("tost") == "neurons" and n.target is torch.lerp for n in nodes)
    skips = sum(n.meta.get("tost") == "skips" and n.target is torch.addcmul for n in nodes)
    return f"{neurons} ghost neurons, {skips} ghost skips"


def deploy_step(trained: nn.Module, quick: bool) -> bool:
    """Compressed checkpoint of the trained model; a 98%-sparse resnet18 accelerated on the CPU."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.tost.pt")
        dense, compressed = tost.deploy.checkpoint_bytes(trained, path)
        restored = DigitsCNN()
        restored.load_state_dict(tost.deploy.load(path), strict=True)  # the ordinary dense state_dict
    same = all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), trained.state_dict().values()))
    console.print(
        f"[bold]deploy.save[/]: ToST model checkpoint {compressed:,} bytes against {dense:,} with torch.save "
        f"({compressed / dense:.0%}); deploy.load gives it back exactly: {'yes' if same else 'NO'}"
    )
    import torchvision  # speed needs no training: a fresh resnet18 with the library's ERK mask at 98%

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for name, keep in tost.masks.erk(resnet, sparsity=0.98, seed=0).items():
            resnet.get_parameter(name).mul_(keep)
    size = 64 if quick else 224  # --quick keeps the smoke test short
    fast = tost.deploy.accelerate(resnet, torch.randn(1, 3, size, size), timer=tost.deploy.PairedTimer(rounds=5))
    title = f"deploy.accelerate: torchvision resnet18, ERK 98%, input 1x3x{size}x{size}, 1 thread"
    console.print(dataclasses.replace(tost.deploy.report(fast), title=title))
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per protocol (default: 30)")
    parser.add_argument("--sparsity", type=float, default=0.95, help="fraction of weights removed (default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the mask and the batch order")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate, cosine-annealed (default: 0.1)")
    parser.add_argument("--quick", action="store_true", help="1 epoch on a subset of the data (smoke test)")
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    if epochs < 1:
        parser.error("--epochs must be at least 1")
    start = time.perf_counter()
    # Tiny convolutions gain little from a second thread, and two spinning OpenMP threads on a busy
    # 2-core machine made single runs 20x slower; one thread keeps the wall time predictable.
    torch.set_num_threads(1)

    data = load_data(args.quick)
    torch.manual_seed(args.seed)
    initial = DigitsCNN()
    mask = tost.masks.erk(initial, sparsity=args.sparsity, seed=args.seed)  # made once, used by both
    steps = epochs * -(-len(data.y_train) // BATCH_SIZE)
    console.print(
        f"[bold]Digits[/]: {len(data.y_train)} train / {len(data.y_test)} test (8x8), "
        f"{epochs} epoch{'s' * (epochs != 1)} x {steps // epochs} steps, batch {BATCH_SIZE}, seed {args.seed}"
    )
    console.print(
        f"[bold]Model[/]: {sum(p.numel() for p in initial.parameters()):,} parameters; "
        f"ERK mask keeps {sum(int(m.sum()) for m in mask.values()):,} of "
        f"{sum(m.numel() for m in mask.values()):,} conv/linear weights"
    )

    # deepcopy of one initialized model: identical starting weights for both protocols.
    recipes = {"baseline": tost.Recipe.baseline(), "ToST": tost.Recipe.tost(total_steps=steps)}
    models = {name: tost.prepare(copy.deepcopy(initial), mask, recipe=r) for name, r in recipes.items()}
    warmup = recipes["ToST"].warmup_steps("neurons")
    console.print(f"[bold]ToST[/]: {scaffold_summary(models['ToST'])}; retired after step {warmup} of {steps}")

    columns = (
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        seconds = {name: train(m, data, epochs, args.lr, args.seed, progress, name) for name, m in models.items()}

    results, drifts, ok = {}, {}, True
    for name, model in models.items():
        before = logits(model, data.x_test)
        tost.finalize(model)
        after = logits(model, data.x_test)
        # The scaffolding has retired by now, so finalizing must not change what the model computes.
        drifts[name] = (after - before).abs().max().item()
        nonzero, masked = masked_nonzeros(model, mask)
        ok &= nonzero == 0 and drifts[name] < 1e-4
        results[name] = accuracy(after, data.y_test)
        console.print(
            f"{name:<8} finalized: {nonzero} of {masked:,} masked weights nonzero "
            f"(exactly zero: {'yes' if nonzero == 0 else 'NO'})"
        )
    console.print("Outputs unchanged by finalize: max |Δlogit| " + ", ".join(f"{n} {d:.0e}" for n, d in drifts.items()))

    table = Table(title=f"Test accuracy ({len(data.y_test)} held-out digits, sparsity {args.sparsity:.0%})")
    table.add_column("protocol")
    table.add_column("recipe")
    table.add_column("test accuracy", justify="right")
    table.add_column("train time", justify="right")
    table.add_row(
        "baseline", "Recipe.baseline(): masks only", f"{results['baseline']:.2%}", f"{seconds['baseline']:.1f} s"
    )
    table.add_row("ToST", f"Recipe.tost(total_steps={steps})", f"{results['ToST']:.2%}", f"{seconds['ToST']:.1f} s")
    table.add_section()
    diff = 100 * (results["ToST"] - results["baseline"])
    table.add_row("difference", "ToST - baseline", f"{diff:+.2f} pts", "")
    console.print(table)
    console.print("One seed, one split: a single measurement, not a significance test.")
    console.print(sparsity_table(models["ToST"], mask, args.sparsity))

    clean = models["ToST"].eval()
    example = data.x_test[:16]  # export specializes on this batch size
    exported = torch.export.export(clean, (example,))
    same = torch.allclose(exported.module()(example), logits(clean, example), atol=1e-5)
    ok &= same
    graph = exported.graph_module.graph
    calls = sum(n.op == "call_function" for n in graph.nodes)
    console.print(
        f"[bold]torch.export[/]: ToST model -> {len(graph.nodes)} graph nodes ({calls} ops), "
        f"matches eager: {'yes' if same else 'NO'}"
    )
    ok &= deploy_step(clean, args.quick)
    console.print(f"Total wall time: {time.perf_counter() - start:.1f} s (after imports)")
    if not ok:
        console.print("[bold red]A check failed (see above).[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
