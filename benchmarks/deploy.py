"""Deploy: accelerated vs dense CPU inference, the multiply-add limit, and checkpoint bytes.

For each model, mask (ERK or uniform), sparsity, batch and thread count, in one process:
``tost_surgery.deploy.accelerate`` builds the inference copy (its wall time is recorded), then
three variants take turns for ``--rounds`` rounds, the order rotating every round:

    dense           the pruned model as given (NCHW), eval, no autograd
    accelerated     what accelerate returned
    dense_cl        the same dense model in channels-last memory format (the best dense layout
                    we know of on these CPUs, reported beside for honesty; not a target)

Speedup = median over rounds of ``t(dense) / t(accelerated)`` from the same round (and its
interquartile range), which cancels slow drifts of a shared machine's load. Beside it: the
multiply-add ratio dense / nonzero of the convs and Linears (what the model would gain if those
layers cost only their nonzeros and nothing else cost anything), and the checkpoint bytes of
``torch.save`` against ``deploy.save``. Weights are zeroed by the mask (no training is needed
for speed), BatchNorm statistics are those of a fresh model.

    python benchmarks/deploy.py                                  # the grid -> results/deploy.jsonl, .md
    python benchmarks/deploy.py --models resnet18 --sparsities 0.98 --batches 1
    python benchmarks/deploy.py --render                         # deploy.md again from deploy.jsonl
    python benchmarks/deploy.py --profile resnet18 --masks erk --sparsities 0.98 --batches 1
                                          # torch.profiler: where dense and accelerated spend a forward

Cells already in the JSONL (same model, mask, sparsity, batch, threads, kernels) are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tost_surgery as tost
from tost_surgery import deploy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _resnet20() -> nn.Module:
    from cifar import resnet20

    return resnet20()


def _tiny_cnn() -> nn.Module:
    """A 3-layer CNN for the smoke test."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "resnet18": (_torchvision("resnet18"), (3, 224, 224)),
    "resnet50": (_torchvision("resnet50"), (3, 224, 224)),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), (3, 224, 224)),
    "timm:regnetx_016": (_timm("regnetx_016"), (3, 224, 224)),
    "resnet20_cifar": (_resnet20, (3, 32, 32)),
    "tiny_cnn": (_tiny_cnn, (3, 16, 16)),
}
DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "timm:regnetx_016", "resnet20_cifar")
MASKS = {"erk": tost.masks.erk, "uniform": tost.masks.random}
TARGETS = (
    # (what, model, mask, sparsity, limit): resnet18 at batch 1, one thread
    ("resnet18 ERK 98% >= 2.0x", "resnet18", "erk", 0.98, 2.0),
    ("resnet18 uniform 98% >= 2.5x", "resnet18", "uniform", 0.98, 2.5),
    ("resnet18 ERK 95% >= 1.4x", "resnet18", "erk", 0.95, 1.4),
)


def pruned_model(name: str, mask: str, sparsity: float) -> nn.Module:
    """The model with a seeded mask applied by zeroing its weights, in eval mode."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    keep = MASKS[mask](model, sparsity, seed=0)
    with torch.no_grad():
        for param_name, kept in keep.items():
            model.get_parameter(param_name).mul_(kept)
    return model.eval()


def measure(variants: dict[str, Callable[[], object]], rounds: int, turn_seconds: float) -> dict[str, list[float]]:
    """Seconds per call of each variant in each round; the starting variant rotates every round."""
    names = list(variants)
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        slowest = max(_seconds(fn, 1) for fn in variants.values())
        repeats = max(1, int(turn_seconds / max(slowest, 1e-9)))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(_seconds(variants[name], repeats))
    return times


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and quartiles over rounds of the paired ratio."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}


def run_cell(cell: dict[str, Any], args: argparse.Namespace, sizes: dict[tuple, tuple[int, int]]) -> dict[str, Any]:
    model = pruned_model(cell["model"], cell["mask"], cell["sparsity"])
    shape = MODELS[cell["model"]][1]
    x = torch.randn(cell["batch"], *shape, generator=torch.Generator().manual_seed(1))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    fast = deploy.accelerate(model, x, threads=cell["threads"], min_speedup=args.min_speedup, native=cell["native"])
    accelerate_s = time.perf_counter() - start
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with _threads(cell["threads"]):
        times = measure(
            {"dense": lambda: model(x), "accelerated": lambda: fast(x), "dense_cl": lambda: channels_last(x_cl)},
            args.rounds, args.turn_seconds,
        )  # fmt: skip
    key = (cell["model"], cell["mask"], cell["sparsity"])
    if key not in sizes:
        sizes[key] = deploy.checkpoint_bytes(model)
    report = deploy.report(fast)
    return {
        **cell,
        "accelerate_s": accelerate_s,
        "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "speedup": ratio_stats(times["dense"], times["accelerated"]),
        "speedup_vs_dense_cl": ratio_stats(times["dense_cl"], times["accelerated"]),
        "accelerate_estimate": report.speedup,
        "mac_ratio": report.mac_ratio,
        "sparse_layers": sum(row.kernel in ("csr", "native") for row in report.rows),
        "layers": sum(row.density is not None for row in report.rows),
        "kernels": sorted({row.kernel for row in report.rows}),
        "dense_bytes": sizes[key][0],
        "compressed_bytes": sizes[key][1],
        "rounds": args.rounds,
        "load_average": [load_before, os.getloadavg()[0]],
        "rows": [row.__dict__ for row in report.rows],
        **machine(),
    }


@contextlib.contextmanager
def _threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_MACHINE: dict[str, Any] = {}


def machine() -> dict[str, Any]:
    """CPU, versions and commit of this run."""
    if not _MACHINE:
        cpu = platform.processor() or "unknown"
        with contextlib.suppress(OSError):
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        _MACHINE.update(
            cpu=f"{cpu} ({os.cpu_count()} cores visible)", torch=torch.__version__, commit=commit.stdout.strip(),
            mkl=torch.backends.mkl.is_available(),
        )  # fmt: skip
    return dict(_MACHINE)


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid: every model, mask, sparsity and batch at one thread; two threads at batch 1 for --two-threads."""
    grid = []
    for model in args.models:
        for mask in args.masks:
            for sparsity in args.sparsities:
                for batch in args.batches:
                    threads = [1, 2] if model in args.two_threads and batch == 1 else [1]
                    grid += [
                        dict(model=model, mask=mask, sparsity=sparsity, batch=batch, threads=t, native=args.native)
                        for t in threads
                    ]
    return sorted(grid, key=lambda c: c["batch"])  # batch 1 first: the targets are there


def cell_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k, False) for k in ("model", "mask", "sparsity", "batch", "threads", "native"))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of the JSONL, the last one of a cell winning; a torn last line is ignored."""
    records: dict[tuple, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                records[cell_key(record)] = record
    return list(records.values())


def render(records: list[dict[str, Any]]) -> str:
    """The Markdown tables: every cell, then the targets."""
    lines = [
        "| model | mask | sparsity | batch | threads | kernels | dense ms | accelerated ms | speedup (IQR) "
        "| vs dense channels-last | sparse layers | MAC limit | checkpoint | accelerate s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {name: i for i, name in enumerate(MODELS)}
    for r in sorted(
        records, key=lambda r: (order.get(r["model"], 99), r["mask"], r["sparsity"], r["batch"], r["threads"])
    ):
        s, c = r["speedup"], r["speedup_vs_dense_cl"]
        lines.append(
            f"| {r['model']} | {r['mask']} | {r['sparsity']:.2f} | {r['batch']} | {r['threads']} "
            f"| {'native' if r.get('native') else 'torch'} "
            f"| {r['ms']['dense']:.1f} | {r['ms']['accelerated']:.1f} "
            f"| {s['median']:.2f}x ({s['q1']:.2f}-{s['q3']:.2f}) | {c['median']:.2f}x "
            f"| {r['sparse_layers']}/{r['layers']} | {r['mac_ratio']:.1f}x "
            f"| {100 * r['compressed_bytes'] / r['dense_bytes']:.1f}% | {r['accelerate_s']:.1f} |"
        )
    lines += ["", *render_targets(records)]
    machines = sorted({f"{r['cpu']}, torch {r['torch']}, commit {r['commit']}" for r in records})
    lines += ["", "Machine: " + "; ".join(machines) + "."]
    return "\n".join(lines) + "\n"


def render_targets(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | met? |", "| --- | --- | --- |"]
    by_key = {cell_key(r): r for r in records}
    for what, model, mask, sparsity, limit in TARGETS:
        for native in (False, True):
            record = by_key.get((model, mask, sparsity, 1, 1, native))
            if record is not None:
                value = record["speedup"]["median"]
                label = f"{what}{' (native kernel)' if native else ''}"
                lines.append(f"| {label} | {value:.2f}x | {'yes' if value >= limit else 'no'} |")
    one_thread = [r for r in records if r["threads"] == 1]  # the targets are stated at one thread
    if one_thread:
        worst = min(one_thread, key=lambda r: r["speedup"]["median"])
        value = worst["speedup"]["median"]
        where = f"{worst['model']} {worst['mask']} {worst['sparsity']:.2f} b{worst['batch']} t{worst['threads']}"
        met = "yes" if value >= 0.97 else "no"
        lines.append(f"| every one-thread cell >= 0.97x | lowest {value:.2f}x ({where}) | {met} |")
    for mask, sparsity, limit in (("erk", 0.98, 0.08), ("erk", 0.95, 0.12)):
        record = next(
            (r for r in records if (r["model"], r["mask"], r["sparsity"]) == ("resnet18", mask, sparsity)), None
        )
        if record is not None:
            fraction = record["compressed_bytes"] / record["dense_bytes"]
            lines.append(
                f"| resnet18 checkpoint {mask.upper()} {sparsity:.0%} <= {limit:.0%} | {fraction:.1%} "
                f"| {'yes' if fraction <= limit else 'no'} |"
            )
    for batch in sorted({r["batch"] for r in records if r["model"] == "resnet50"}):
        cells = [r for r in records if (r["model"], r["batch"], r["threads"]) == ("resnet50", batch, 1)]
        seconds = [r["accelerate_s"] for r in cells]
        met = "yes" if max(seconds) <= 60 else "no"
        lines.append(f"| accelerate(resnet50) <= 60 s, batch {batch} | longest {max(seconds):.1f} s | {met} |")
    return lines


CATEGORIES = {
    "sparse matmul (MKL CSR)": ("aten::addmm", "aten::addmm_"),
    "dense conv / linear": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::linear",
                            "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::mm"),
    "BatchNorm": ("aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit_no_training"),
    "ReLU / add": ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::add", "aten::add_"),
    "pooling": ("aten::max_pool2d_with_indices", "aten::max_pool2d", "aten::adaptive_avg_pool2d", "aten::mean",
                "aten::avg_pool2d"),
    "copies, padding, layout": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::constant_pad_nd",
                                "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::empty",
                                "aten::empty_like", "aten::new_empty", "aten::new_zeros", "aten::zeros"),
}  # fmt: skip


def profile(args: argparse.Namespace) -> str:
    """Self CPU time per forward by kind of op: dense, accelerated (torch kernels), accelerated (native)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = pruned_model(args.profile, args.masks[0], args.sparsities[0])
    x = torch.randn(args.batches[0], *MODELS[args.profile][1], generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(1)
    variants = {"dense": model, "accelerated": deploy.accelerate(model, x, threads=1)}
    if deploy.kernels.native_available()[0]:
        variants["accelerated, native"] = deploy.accelerate(model, x, threads=1, native=True)
    totals = {name: {} for name in variants}
    walls = {name: 0.0 for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn(x)
        for _ in range(args.rounds):
            for name, fn in variants.items():
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    fn(x)
                    walls[name] += time.perf_counter() - start
                for event in prof.key_averages():
                    totals[name][event.key] = totals[name].get(event.key, 0.0) + event.self_cpu_time_total / 1e3
    cell = f"{args.profile}, {args.masks[0]} {args.sparsities[0]:.0%}, batch {args.batches[0]}, 1 thread"
    lines = [
        f"# torch.profiler: {cell}",
        "",
        f"Milliseconds per forward by kind of op (self CPU time, mean of {args.rounds} interleaved profiled "
        "forwards; 'outside torch ops' is wall time no aten op accounts for: Python, and the native kernel).",
        "",
        "| kind | " + " | ".join(variants) + " |",
        "| --- |" + " --- |" * len(variants),
    ]
    kinds = [*CATEGORIES, "other torch ops", "outside torch ops", "wall"]
    for kind in kinds:
        cells = []
        for name in variants:
            ops = totals[name]
            known = {op for members in CATEGORIES.values() for op in members}
            if kind in CATEGORIES:
                value = sum(ops.get(op, 0.0) for op in CATEGORIES[kind])
            elif kind == "other torch ops":
                value = sum(t for op, t in ops.items() if op not in known)
            elif kind == "outside torch ops":
                value = max(0.0, 1e3 * walls[name] - sum(ops.values()))
            else:
                value = 1e3 * walls[name]
            cells.append(f"{value / args.rounds:.2f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    report = deploy.report(variants["accelerated"])
    lines += ["", f"accelerate (torch kernels): {report.summary}", "", "```", str(report).rstrip(), "```", ""]
    lines.append(f"Machine: {machine()['cpu']}, torch {machine()['torch']}, commit {machine()['commit']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument(
        "--two-threads", nargs="*", default=["resnet18", "resnet50"], help="models also run at 2 threads (batch 1)"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--turn-seconds", type=float, default=0.05, help="wall time of one variant's turn")
    parser.add_argument("--min-speedup", type=float, default=1.1)
    parser.add_argument("--native", action="store_true", help="accelerate(..., native=True): the compiled kernel too")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--render", action="store_true", help="only write deploy.md from deploy.jsonl")
    parser.add_argument("--redo", action="store_true", help="run finished cells again (the new record wins)")
    parser.add_argument("--profile", metavar="MODEL", choices=list(MODELS), help="only profile one cell's forwards")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        text = profile(args)
        (args.out / f"deploy_profile_{args.profile}.md").write_text(text)
        print(text)
        return 0
    jsonl, markdown = args.out / "deploy.jsonl", args.out / "deploy.md"
    if not args.render:
        machine()  # the commit as the run starts, not as its first cell ends
        done = set() if args.redo else {cell_key(r) for r in read_records(jsonl)}
        todo = [c for c in cells(args) if cell_key(c) not in done]
        print(f"{len(todo)} cells to run ({len(done)} already in {jsonl})", flush=True)
        sizes: dict[tuple, tuple[int, int]] = {}
        for cell in todo:
            record = run_cell(cell, args, sizes)
            with jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
            s = record["speedup"]
            print(
                f"{cell['model']:<18} {cell['mask']:<7} {cell['sparsity']:.2f} b{cell['batch']} t{cell['threads']}: "
                f"{s['median']:.2f}x ({s['q1']:.2f}-{s['q3']:.2f}), vs channels-last "
                f"{record['speedup_vs_dense_cl']['median']:.2f}x, accelerate {record['accelerate_s']:.1f} s",
                flush=True,
            )
    markdown.write_text(render(read_records(jsonl)))
    print(markdown.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
