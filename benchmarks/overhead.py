"""Cost: training-step time and peak memory of the ToST scaffolding, and prepare / finalize wall time.

Five variants of one model, the same ERK mask for (b)-(e), measured in one process:

    (a) dense        the plain model
    (b) torch prune  ``torch.nn.utils.prune.custom_from_mask`` on every masked weight
    (c) masks only   ``tost.prepare(model, mask, Recipe.baseline())``
    (d) ToST warm-up ``Recipe.tost`` at step 0: ghost neurons and ghost skips in the graph
    (e) ToST retired ``Recipe.tost`` after its warm-up: scaffolding retired from the graph

Step time: one SGD training step (forward, cross-entropy, backward, optimizer step) on a fixed
batch; the variants take turns (round-robin, the starting variant rotating every round) and
the table gives medians over ``--repeats`` rounds, and ratios as the median over rounds of
``t(variant) / t(reference)`` measured in the same round, which cancels slow drifts of a
shared machine's load.

Peak memory of a training step (steps 2.. of ``--memory-steps``, after a first step created the
gradients and optimizer state): on CUDA, ``torch.cuda.max_memory_allocated`` above what was
allocated before the variant was built. On CPU there is no allocator statistic, and the process's
resident size mixes in torch's code pages and glibc's retained heap, so the figure is
``static + transient``: ``static`` counts the distinct storages the model holds between steps
(parameters, buffers such as masks, plain tensor attributes such as prune's ``weight``,
gradients, optimizer state); ``transient`` is the peak rise of the anonymous resident size
(``/proc/self/statm`` resident minus shared, sampled every 0.2 ms by a thread) during the
steps, in a forked child per variant that first returned freed heap to the OS (``malloc_trim``)
and fixed glibc's mmap threshold at 64 KiB (``mallopt``), so every tensor of 64 KiB or more is
mapped when allocated and unmapped when freed (it trims again after the first step). All memory
is measured before the parent trains anything: a child reuses blocks in glibc's free lists before
mapping new ones, so a parent's freed heap would blur the figure. Spikes shorter than a sample
can be missed.

    python benchmarks/overhead.py                          # CPU: image 64, 1 thread
    python benchmarks/overhead.py --device cuda            # image 224
    python benchmarks/overhead.py --profile resnet18       # torch.profiler: where (c) and (d) spend it
    python benchmarks/overhead.py --render                 # overhead.md again from overhead.json

This file runs the measurements and saves them (``overhead.json``); ``overhead_variants.py``
builds the variants, ``overhead_memory.py`` measures memory and ``overhead_report.py`` renders
the tables from the saved JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import torch  # noqa: E402
from _common import (  # noqa: E402
    RESULTS,
    cpu_model,
    git_state,
    interleaved,
    library_fingerprint,
    load_average,
    paired_ratios,
    write_atomic,
)
from overhead_memory import measure_memory  # noqa: E402
from overhead_report import VARIANTS, console, render, render_profile  # noqa: E402
from overhead_variants import (  # noqa: E402
    Stepper,
    batch,
    build_model,
    make_variant,
    seeded_model_and_mask,
    steps_to_retire,
)

import tost_surgery as tost  # noqa: E402

DEFAULT_OUT = RESULTS
STEP_MODELS = ("resnet18", "mobilenet_v2", "vit_tiny")
PREPARE_MODELS = ("resnet18", "resnet50", "resnet152", "convnext_tiny", "vit_base")
SETTINGS = (
    "batch", "image_size", "sparsity", "repeats", "warmup_iters", "memory_steps", "prepare_repeats", "variants",
    "device", "threads",
)  # fmt: skip
"""The settings saved with a report (and the Recipe overrides, as ``tost_overrides``)."""
CODE = ("tost_surgery", "benchmarks/_common.py", "benchmarks/overhead*.py")
"""What a run reports as uncommitted changes: the library and this benchmark's files."""


# --------------------------------------------------------------------------- step time


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Round-robin step times of the variants of ``name``: medians, and medians of in-round ratios."""
    steppers = _steppers(name, args, args.device)
    for _ in range(args.warmup_iters):
        for v in args.variants:
            steppers[v]()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for order in interleaved(args.variants, args.repeats):
        for v in order:
            _sync(args.device)
            start = time.perf_counter()
            steppers[v]()
            _sync(args.device)
            times[v].append(time.perf_counter() - start)
    result: dict[str, Any] = {"model": name, "times_s": times, "median_ms": {}, "ratio_to": {}}
    for v in args.variants:
        result["median_ms"][v] = 1000 * statistics.median(times[v])
    for ref in ("a", "b", "c"):
        if ref in times:
            result["ratio_to"][ref] = {v: statistics.median(paired_ratios(times[v], times[ref])) for v in times}
    return result


def _steppers(name: str, args: argparse.Namespace, device: str) -> dict[str, Stepper]:
    """A training step of each variant of ``name``, on one seeded model, mask and batch."""
    base, mask = seeded_model_and_mask(name, args.image_size, args.sparsity)
    base.to(device)
    mask = {k: v.to(device) for k, v in mask.items()}
    x, y = batch(args.batch, args.image_size, device)
    return {v: Stepper(make_variant(v, base, mask, args.tost_overrides), x, y) for v in args.variants}


# --------------------------------------------------------------------------- prepare / finalize


def time_prepare(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median wall time of erk mask, prepare (full recipe), retirement and finalize on real modules."""
    torch.manual_seed(0)
    base = build_model(name, 224)
    keys = ("mask_s", "prepare_s", "prepare_baseline_s", "retire_s", "finalize_s")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(args.prepare_repeats):
        for key, seconds in _prepare_once(base, args.sparsity).items():
            rows[key].append(seconds)
        gc.collect()
    return {
        "model": name,
        "params": sum(p.numel() for p in base.parameters()),
        **{k: statistics.median(v) for k, v in rows.items()},
        "all": rows,
    }


def _prepare_once(base: torch.nn.Module, sparsity: float) -> dict[str, float]:
    """One timed pass: mask, prepare, retire and finalize a copy of ``base``; prepare another as the baseline."""
    seconds, model = {}, copy.deepcopy(base)
    start = time.perf_counter()
    mask = tost.masks.erk(model, sparsity, seed=0)
    seconds["mask_s"] = time.perf_counter() - start
    recipe = tost.Recipe.tost(total_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        tost.prepare(model, mask, recipe)
        seconds["prepare_s"] = time.perf_counter() - start
        steps = steps_to_retire(recipe)
        start = time.perf_counter()
        tost.step(model, steps)
        seconds["retire_s"] = time.perf_counter() - start
        start = time.perf_counter()
        tost.finalize(model)
        seconds["finalize_s"] = time.perf_counter() - start
        other = copy.deepcopy(base)
        start = time.perf_counter()
        tost.prepare(other, mask, tost.Recipe.baseline())
        seconds["prepare_baseline_s"] = time.perf_counter() - start
    return seconds


def warm_up_library() -> None:
    """One prepare / finalize on a tiny model: imports (timm's fx lists) are not billed to the first model."""
    model = build_model("tiny_cnn", 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tost.finalize(tost.prepare(model, tost.masks.erk(model, 0.5, seed=0), tost.Recipe.baseline()))


# --------------------------------------------------------------------------- profile


def profile_ops(name: str, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Per-op self CPU time and calls per step of each variant (torch.profiler): variant -> op -> [ms, calls].

    The variants take turns, one profiled step each per round, over ``--profile-steps`` rounds,
    so a shared machine's load changes hit them alike; times are means per step.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steppers = _steppers(name, args, "cpu")
    for stepper in steppers.values():
        for _ in range(2):
            stepper()
    rounds = max(1, args.profile_steps)
    totals: dict[str, dict[str, list[float]]] = {v: {} for v in args.variants}
    for order in interleaved(args.variants, rounds):
        for v in order:
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                steppers[v]()
            for event in prof.key_averages():
                entry = totals[v].setdefault(event.key, [0.0, 0])
                entry[0] += event.self_cpu_time_total / 1000 / rounds
                entry[1] += event.count / rounds
    return totals


def run_profile(args: argparse.Namespace, argv: list[str] | None, out: Path) -> None:
    """Profile ``args.profile``'s variants; save ``overhead_profile_<model>.json`` and its ``.md``."""
    totals = profile_ops(args.profile, args)
    profiled = {
        "model": args.profile,
        "command": command_line(argv),
        "machine": machine(args),
        "settings": {k: getattr(args, k) for k in ("batch", "image_size", "threads", "variants", "tost_overrides")},
        "rounds": max(1, args.profile_steps),
        "totals": totals,
    }
    stem = out / f"overhead_profile_{args.profile}"
    write_atomic(stem.with_suffix(".json"), json.dumps(profiled, indent=1) + "\n")
    text = render_profile(profiled)
    write_atomic(stem.with_suffix(".md"), text)
    console.print(text, markup=False, highlight=False)
    console.print(f"wrote {stem.with_suffix('.md')} and .json")


# --------------------------------------------------------------------------- the run


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """Where and with which code this run measures (saved in the report)."""
    return {
        "library_sha": library_fingerprint(),
        **git_state(CODE),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores visible",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": load_average(),
    }


def command_line(argv: list[str] | None) -> str:
    parts = sys.argv[1:] if argv is None else argv
    return "python benchmarks/overhead.py" + ("" if not parts else " " + " ".join(parts))


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Measure memory, step time and prepare / finalize time as ``args`` asks; the report as saved."""
    settings = {k: getattr(args, k) for k in SETTINGS} | {"tost_overrides": dict(args.tost_overrides)}
    report: dict[str, Any] = {"machine": machine(args), "command": command_line(argv), "settings": settings}
    started = time.perf_counter()
    warm_up_library()
    memory: dict[str, dict] = {}
    for name in [] if args.no_memory else args.models:
        # All memory first: a forked child reuses the parent's freed heap blocks before mapping
        # new ones, and those would hide its allocations; so the parent must not have trained yet.
        console.print(f"[bold]{name}[/]: peak memory of {len(args.variants)} variants ...")
        memory[name] = measure_memory(name, args)
    results = []
    for name in args.models:
        console.print(f"[bold]{name}[/]: {args.repeats} interleaved rounds of {len(args.variants)} variants ...")
        results.append(time_steps(name, args))
    prepare_rows = []
    for name in args.prepare_models:
        console.print(f"[bold]{name}[/]: prepare / finalize x{args.prepare_repeats} ...")
        prepare_rows.append(time_prepare(name, args))
    report.update(steps=results, memory=memory, prepare=prepare_rows)
    report["machine"]["load_average_end"] = load_average()
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=list(STEP_MODELS), help="step-time models ('' for none)")
    parser.add_argument("--prepare-models", nargs="*", default=list(PREPARE_MODELS), help="prepare/finalize models")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup-iters", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on cuda, 64 on cpu")
    parser.add_argument("--sparsity", type=float, default=0.9, help="ERK mask sparsity")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on cpu)")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps per memory measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--prepare-repeats", type=int, default=3)
    parser.add_argument("--profile", metavar="MODEL", help="only profile MODEL's variants with torch.profiler")
    parser.add_argument("--profile-steps", type=int, default=8, help="interleaved profiled rounds")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Recipe.tost overrides for (d), (e)"
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--render", action="store_true", help="only rewrite overhead.md from <out>/overhead.json "
                        "(with --profile MODEL: overhead_profile_MODEL.md from its .json)")  # fmt: skip
    args = parser.parse_args(argv)
    args.models = [m for m in args.models if m]
    args.prepare_models = [m for m in args.prepare_models if m]
    args.tost_overrides = recipe_overrides(args.set)
    if args.image_size is None:
        args.image_size = 224 if args.device.startswith("cuda") else 64
    if args.threads is None:
        args.threads = torch.get_num_threads() if args.device.startswith("cuda") else 1
    return args


def recipe_overrides(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` items as Recipe fields (a value is JSON where it parses, else a string)."""
    overrides: dict[str, Any] = {}
    for item in items:
        field, _, text = item.partition("=")
        try:
            overrides[field] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field] = text
    tost.Recipe.tost(total_steps=100, **overrides)  # a bad field fails here, with the library's message
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.render:
        name = f"overhead_profile_{args.profile}" if args.profile else "overhead"
        source = json.loads((out / f"{name}.json").read_text())
        if args.profile:
            write_atomic(out / f"{name}.md", render_profile(source))
        else:
            render(source, out)
        console.print(f"wrote {out / name}.md from {name}.json")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        run_profile(args, argv, out)
        return 0
    report = run(args, argv)
    write_atomic(out / "overhead.json", json.dumps(report, indent=1, default=str) + "\n")
    render(report, out)
    console.print(f"wrote {out / 'overhead.md'} and overhead.json ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
