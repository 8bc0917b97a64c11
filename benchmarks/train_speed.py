"""Training speed: sparse kernels vs the masked dense path vs the dense model, one step at a time.

Two tables, each measured in one process with the variants taking turns (the order rotating
every round), a speedup being the median over rounds of ``t(dense) / t(variant)`` from the same
round (with its interquartile range):

``--layers`` (per layer shape): forward + backward (input and weight gradients) of one conv or
Linear of the model, at its real input shape, with a uniform random mask at each sparsity:

    dense      the plain layer
    masked     the layer with tost_surgery's mask parametrization (what prepare runs)
    sparse     the sparse training kernels on the same dense weight

models (the default): a full training step (forward, cross-entropy, backward, SGD with
momentum) of the whole model:

    dense      the plain model (its weights zeroed by the mask)
    masked     tost.prepare(model, mask) (Recipe.baseline: masks only), sparse_kernels="off"
    sparse     tost.prepare(model, mask, sparse_kernels="auto"): each layer decided by paired
               timing at its first training step (done before timing starts, and its wall
               time reported)
    native     (with --native) the same with native_kernels=True: the compiled fused conv
               kernels are a third candidate per layer (in --layers: the native kernel itself)

    python benchmarks/train_speed.py                                  # ResNet-20 b128, ResNet-18 b32
    python benchmarks/train_speed.py --models resnet18_cifar --masks uniform --sparsities 0.98
    python benchmarks/train_speed.py --layers --models resnet18_cifar --sparsities 0.9 0.95 0.98
    python benchmarks/train_speed.py --two-threads                    # one and two threads
    python benchmarks/train_speed.py --native --models resnet18_cifar --sparsities 0.95 0.98

Prints Markdown tables (and writes them to ``--out`` when given). Never a pass/fail on time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import tost_surgery as tost
from tost_surgery._masking import MaskParametrization
from tost_surgery._sparse_kernels import ConvStructure, LinearStructure, sparse_conv, sparse_linear
from tost_surgery._sparse_kernels.native import NativeStructure, native_sparse_conv
from tost_surgery._write_through import plain_reads
from tost_surgery.deploy.kernels import ConvGeometry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cpu_model, git_state, interleaved, load_average, markdown_table, quartiles  # noqa: E402

VARIANTS = ("dense", "masked", "sparse", "native")


def resnet18_cifar() -> nn.Module:
    """torchvision's resnet18 with the CIFAR stem (3x3 stride-1 conv, no max pool): 64-512 channels at 32x32."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet20() -> nn.Module:
    from cifar import resnet20 as build

    return build()


def resnet18() -> nn.Module:
    """torchvision's resnet18 as it is (ImageNet stem, 1000 classes), trained at 224x224."""
    import torchvision

    return torchvision.models.resnet18(weights=None)


def timm_resnet26d() -> nn.Module:
    """timm's resnet26d (deep 3x3 stem, average-pool shortcuts), trained at 224x224."""
    import timm

    return timm.create_model("resnet26d", pretrained=False)


def tiny_cnn() -> nn.Module:
    """A 3-layer CNN for the smoke test."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], int, tuple[int, int, int]]] = {
    "resnet20": (resnet20, 128, (3, 32, 32)),
    "resnet18_cifar": (resnet18_cifar, 32, (3, 32, 32)),
    "resnet18": (resnet18, 8, (3, 224, 224)),
    "timm_resnet26d": (timm_resnet26d, 8, (3, 224, 224)),
    "tiny_cnn": (tiny_cnn, 4, (3, 16, 16)),
}
DEFAULT_MODELS = ("resnet20", "resnet18_cifar")
MASKS = {"erk": tost.masks.erk, "uniform": tost.masks.random}


# --------------------------------------------------------------------------- timing


def paired(runs: dict[str, Callable[[], object]], rounds: int, turn_seconds: float) -> dict[str, object]:
    """Median ms per call of each variant and the median (q1, q3) paired speedup of each over ``dense``."""
    for run in runs.values():
        run()  # warm-up: the allocator, MKL, a first-call decision
    slowest = max(_seconds(run, 1) for run in runs.values())
    repeats = max(1, round(turn_seconds / max(slowest, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for order in interleaved(list(runs), rounds):
        for name in order:
            times[name].append(_seconds(runs[name], repeats))
    speedup = {
        name: quartiles([d / t for d, t in zip(times["dense"], times[name])]) for name in runs if name != "dense"
    }
    return {"ms": {name: 1e3 * statistics.median(t) for name, t in times.items()}, "speedup": speedup}


def _seconds(run: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def ratio(quartile: tuple[float, float, float]) -> str:
    return f"{quartile[1]:.2f}x ({quartile[0]:.2f}-{quartile[2]:.2f})"


# --------------------------------------------------------------------------- whole models


def model_cell(name: str, mask_kind: str, sparsity: float, args: argparse.Namespace) -> list[str]:
    """One row: step times of the variants of ``name`` under one mask."""
    build, batch, shape = MODELS[name]
    torch.manual_seed(0)
    base = build()
    mask = MASKS[mask_kind](base, sparsity, seed=0)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for key, keep in mask.items():
            dense.get_parameter(key).mul_(keep)
    masked = tost.prepare(copy.deepcopy(base), mask)
    models = {"sparse": tost.prepare(copy.deepcopy(base), mask, sparse_kernels="auto")}
    if args.native:
        models["native"] = tost.prepare(copy.deepcopy(base), mask, sparse_kernels="auto", native_kernels=True)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    steps = {"dense": stepper(dense, x, y), "masked": stepper(masked, x, y)}
    steps.update({variant: stepper(model, x, y) for variant, model in models.items()})
    decide_s = {}
    for variant in models:
        start = time.perf_counter()
        steps[variant]()  # the first training step decides each layer
        decide_s[variant] = time.perf_counter() - start
    result = paired(steps, args.rounds, args.turn_seconds)
    row = [
        name, str(batch), mask_kind, f"{sparsity:.0%}", str(torch.get_num_threads()), f"{result['ms']['dense']:.0f}",
        ratio(result["speedup"]["masked"]),
    ]  # fmt: skip
    for variant, model in models.items():
        kernels = tost.status(model).sparse_kernels.values()
        chosen = sum(1 for k in kernels if not k.startswith(("dense", "off", "pending")))
        row += [ratio(result["speedup"][variant]), f"{chosen}/{len(kernels)}", f"{decide_s[variant]:.1f}"]
    return row


def stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD step (momentum 0.9) on the same batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


MODEL_HEAD = ["model", "batch", "mask", "sparsity", "threads", "dense step ms", "masked vs dense"]
SPARSE_HEAD = ["sparse kernels vs dense", "layers sparse", "decide s"]
NATIVE_HEAD = ["native vs dense", "layers sparse or native", "native decide s"]


# --------------------------------------------------------------------------- layers


def layer_shapes(name: str) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Each distinct conv / Linear of the model with its input shape at the model's batch."""
    build, batch, shape = MODELS[name]
    model = build()
    seen: dict[tuple, tuple[str, nn.Module, tuple[int, ...]]] = {}

    def record(layer_name: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple) -> None:
            key = (repr(module), tuple(inputs[0].shape))
            seen.setdefault(key, (layer_name, module, tuple(inputs[0].shape)))

        return hook

    handles = [
        m.register_forward_pre_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(torch.randn(batch, *shape))
    for handle in handles:
        handle.remove()
    return list(seen.values())


def layer_cell(
    model: str, layer_name: str, layer: nn.Module, shape: tuple[int, ...], sparsity: float, args
) -> list[str]:  # noqa: ANN001
    """One row: forward + backward of one layer, three ways (four with ``--native``)."""
    torch.manual_seed(0)
    layer = copy.deepcopy(layer)
    keep = torch.rand(layer.weight.shape) >= sparsity
    keep.view(-1)[0] = True
    with torch.no_grad():
        layer.weight.mul_(keep)
    masked = copy.deepcopy(layer)
    parametrize.register_parametrization(masked, "weight", MaskParametrization(keep.to(layer.weight.dtype)))
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn_like(layer(x))
    if isinstance(layer, nn.Linear):
        structure = LinearStructure.of(keep)
        sparse = lambda: sparse_linear(x, layer.weight, layer.bias, structure)  # noqa: E731
    else:
        structure = ConvStructure.of(keep, ConvGeometry.of(layer))
        sparse = lambda: sparse_conv(x, layer.weight, layer.bias, structure)  # noqa: E731
        fused = NativeStructure.of(keep, ConvGeometry.of(layer)) if args.native else None
        native = lambda: native_sparse_conv(x, layer.weight, layer.bias, fused)  # noqa: E731
    params = [layer.weight, masked.parametrizations.weight.original]

    def step(forward: Callable[[], torch.Tensor], weight: torch.Tensor) -> Callable[[], object]:
        return lambda: torch.autograd.grad(forward(), [x, weight], grad)

    runs = {"dense": step(lambda: layer(x), params[0]), "masked": step(lambda: masked(x), params[1]),
            "sparse": step(sparse, params[0])}  # fmt: skip
    if args.native:
        runs["native"] = step(sparse if isinstance(layer, nn.Linear) else native, params[0])  # Linear: torch-only
    with plain_reads:
        result = paired(runs, args.rounds, args.turn_seconds)
    kind = (
        "linear" if isinstance(layer, nn.Linear) else f"{layer.kernel_size[0]}x{layer.kernel_size[1]}/{layer.stride[0]}"
    )
    return [
        model, layer_name, kind, f"{shape[1]}->{layer.weight.shape[0]}", "x".join(map(str, shape[2:])) or "-",
        str(shape[0]), f"{sparsity:.0%}", str(torch.get_num_threads()), f"{result['ms']['dense']:.1f}",
        ratio(result["speedup"]["masked"]), ratio(result["speedup"]["sparse"]),
    ] + ([ratio(result["speedup"]["native"])] if args.native else [])  # fmt: skip


LAYER_HEAD = [
    "model", "layer", "kind", "channels", "input", "batch", "sparsity", "threads", "dense ms", "masked vs dense",
    "sparse vs dense",
]  # fmt: skip


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--masks", nargs="+", default=["erk", "uniform"], choices=list(MASKS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--layers", action="store_true", help="per layer shape (uniform masks), not whole models")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--turn-seconds", type=float, default=0.2, help="each variant's turn lasts about this long")
    parser.add_argument("--two-threads", action="store_true", help="also at two threads")
    parser.add_argument("--native", action="store_true", help="also the compiled kernels (native_kernels=True)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines = [
        f"CPU: {cpu_model()}; torch {torch.__version__}; commit {git_state(['tost_surgery'])['commit']}; "
        f"load average before: {load_average()}",
        "",
    ]
    rows = []
    for threads in (1, 2) if args.two_threads else (1,):
        torch.set_num_threads(threads)
        for model in args.models:
            if args.layers:
                for layer_name, layer, shape in layer_shapes(model):
                    for sparsity in args.sparsities:
                        rows.append(layer_cell(model, layer_name, layer, shape, sparsity, args))
                        print(" | ".join(rows[-1]), flush=True)
                continue
            for mask_kind in args.masks:
                for sparsity in args.sparsities:
                    rows.append(model_cell(model, mask_kind, sparsity, args))
                    print(" | ".join(rows[-1]), flush=True)
    if args.layers:
        head = LAYER_HEAD + (["native vs dense"] if args.native else [])
    else:
        head = MODEL_HEAD + SPARSE_HEAD + (NATIVE_HEAD if args.native else [])
    right = range(5, len(head)) if args.layers else range(3, len(head))
    lines += markdown_table(head, rows, right=right)
    lines += ["", f"load average after: {load_average()}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
