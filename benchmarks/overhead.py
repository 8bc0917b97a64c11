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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.utils import prune

import tost_surgery as tost

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
VARIANTS = {
    "a": "dense",
    "b": "torch prune",
    "c": "masks only (Recipe.baseline)",
    "d": "ToST warm-up",
    "e": "ToST retired",
}
STEP_MODELS = ("resnet18", "mobilenet_v2", "vit_tiny")
PREPARE_MODELS = ("resnet18", "resnet50", "resnet152", "convnext_tiny", "vit_base")
TARGETS = (
    # (what, numerator, denominator, limit)
    ("retired <= 1.03x masks only", "e", "c", 1.03),
    ("masks only <= 1.10x dense", "c", "a", 1.10),
    ("masks only <= torch prune", "c", "b", 1.00),
    ("warm-up <= 1.35x masks only", "d", "c", 1.35),
)
PREPARE_TARGETS = {"resnet50": 2.0, "vit_base": 5.0}
TOST_OVERRIDES: dict[str, Any] = {}
"""Recipe fields ``--set`` changes in (d) and (e), e.g. ``skip_branch="auto"``."""
console = Console(width=160)


# --------------------------------------------------------------------------- models and variants


def build_model(name: str, image_size: int) -> nn.Module:
    """A randomly initialized torchvision / timm model (no download)."""
    import torchvision.models as tv

    if name in ("resnet18", "resnet50", "resnet152", "mobilenet_v2", "convnext_tiny"):
        return getattr(tv, name)()
    if name in ("vit_tiny", "vit_base"):
        import timm

        return timm.create_model(f"{name}_patch16_224", pretrained=False, img_size=image_size)
    if name == "tiny_cnn":  # for smoke tests
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip
    raise SystemExit(f"unknown model {name!r}")


def make_variant(variant: str, base: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh copy of ``base`` set up as ``variant`` (a-e)."""
    model = copy.deepcopy(base)
    if variant == "a":
        return model
    if variant == "b":
        modules = dict(model.named_modules())
        for name, m in mask.items():
            module_name, _, attr = name.rpartition(".")
            prune.custom_from_mask(modules[module_name], attr, m)
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "c":
            return tost.prepare(model, mask, tost.Recipe.baseline())
        if variant == "d":
            return tost.prepare(model, mask, tost.Recipe.tost(total_steps=10**9, **TOST_OVERRIDES))
        if variant == "e":
            recipe = tost.Recipe.tost(total_steps=100, **TOST_OVERRIDES)
            tost.prepare(model, mask, recipe)
            tost.step(model, max(recipe.warmup_steps("neurons"), recipe.warmup_steps("skips")))
            return model
    raise SystemExit(f"unknown variant {variant!r}")


class Stepper:
    """One training step of one model: forward, cross-entropy, backward, SGD step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model.train(), x, y
        # A tiny learning rate: the weights barely move, so every round does the same work.
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def __call__(self) -> None:
        out = self.model(self.x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        loss = F.cross_entropy(out, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def batch(model_name: str, size: int, image_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 3, image_size, image_size, generator=generator)
    y = torch.randint(0, 10, (size,), generator=generator)
    return x.to(device), y.to(device)


def seeded_model_and_mask(name: str, image_size: int, sparsity: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(name, image_size)
    return model, tost.masks.erk(model, sparsity, seed=0)


# --------------------------------------------------------------------------- step time


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Round-robin step times of the five variants of ``name``."""
    base, mask = seeded_model_and_mask(name, args.image_size, args.sparsity)
    base.to(args.device)
    mask = {k: v.to(args.device) for k, v in mask.items()}
    x, y = batch(name, args.batch, args.image_size, args.device)
    steppers = {v: Stepper(make_variant(v, base, mask), x, y) for v in args.variants}
    order = list(args.variants)
    for _ in range(args.warmup_iters):
        for v in order:
            steppers[v]()
    times: dict[str, list[float]] = {v: [] for v in order}
    for r in range(args.repeats):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for v in rotated:
            _sync(args.device)
            start = time.perf_counter()
            steppers[v]()
            _sync(args.device)
            times[v].append(time.perf_counter() - start)
    result: dict[str, Any] = {"model": name, "times_s": times, "median_ms": {}, "ratio_to": {}}
    for v in order:
        result["median_ms"][v] = 1000 * statistics.median(times[v])
    for ref in ("a", "b", "c"):
        if ref in times:
            result["ratio_to"][ref] = {
                v: statistics.median([t / t_ref for t, t_ref in zip(times[v], times[ref])]) for v in order
            }
    return result


# --------------------------------------------------------------------------- peak memory


def _rss_bytes() -> int:
    """Anonymous resident memory (statm's resident minus shared: the code pages of torch's
    libraries, paged in as kernels are first used, are file-backed and left out)."""
    with open("/proc/self/statm") as handle:
        fields = handle.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Samples the resident set size until stopped; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 2e-4) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.samples = interval, _rss_bytes(), 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _libc_release_and_follow() -> None:
    """Give freed heap pages back to the OS, and from now on mmap every new block of 64 KiB or more.

    With a fixed mmap threshold glibc returns each freed tensor to the OS at once, so the
    resident size follows the live tensors instead of glibc's high-water mark. Blocks already
    in glibc's free lists are still reused first; ``malloc_trim`` has released their pages, so
    touching them again raises the resident size as a new allocation would.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_THRESHOLD, 65536)
    libc.mallopt(_M_TRIM_THRESHOLD, 0)


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages alive between steps: parameters, buffers (masks), tensors kept as
    plain attributes (``torch.nn.utils.prune``'s ``weight``) or elsewhere, gradients, optimizer state.

    Call it where the only other live tensors are the batch (counted too: the same for every variant).
    """
    tensors: list[torch.Tensor] = []
    for module in model.modules():
        tensors += [t for t in module._parameters.values() if t is not None]
        tensors += [t for t in module._buffers.values() if t is not None]
        tensors += [t for t in module.__dict__.values() if isinstance(t, torch.Tensor)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    # Tensors held outside modules (e.g. the library's own copy of each mask).
    tensors += [t for t in gc.get_objects() if type(t) is torch.Tensor]  # type(): no lazy-module warnings
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _memory_in_child(name: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Static bytes (counted) + the peak rise of anonymous RSS during steps 2.. (sampled)."""
    gc.collect()
    _libc_release_and_follow()
    x, y = batch(name, args.batch, args.image_size, "cpu")
    base, mask = seeded_model_and_mask(name, args.image_size, args.sparsity)
    stepper = Stepper(make_variant(variant, base, mask), x, y)
    del base, mask
    stepper()  # creates gradients and optimizer state; one-time initialization stays out
    gc.collect()
    static = tensor_bytes(stepper.model, stepper.optimizer)
    # Blocks freed into glibc's bins (by that step, or inherited from the parent's heap) are
    # reused before any new mmap: give their pages back, so that reusing them counts again.
    _libc_release_and_follow()
    before = _rss_bytes()
    sampler = RssSampler()
    sampler.start()
    for _ in range(max(1, args.memory_steps - 1)):
        stepper()
    transient = sampler.stop() - before
    return {
        "peak_bytes": static + transient,
        "static_bytes": static,
        "transient_bytes": transient,
        "samples": sampler.samples,
    }


def measure_memory_cpu(name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant, each in a forked child (a fresh heap, the parent's imports already done)."""
    results = {}
    for v in args.variants:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_end)
            try:
                payload = json.dumps(_memory_in_child(name, v, args))
            except BaseException as error:  # noqa: BLE001 - reported by the parent
                payload = json.dumps({"error": repr(error)})
            os.write(write_end, payload.encode())
            os.close(write_end)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            payload = pipe.read()
        os.waitpid(pid, 0)
        result = json.loads(payload or '{"error": "child died"}')
        if "error" in result:
            raise RuntimeError(f"memory measurement of {name} ({v}) failed: {result['error']}")
        results[v] = result
    return results


def measure_memory_cuda(name: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results = {}
    x, y = batch(name, args.batch, args.image_size, args.device)
    for v in args.variants:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        base, mask = seeded_model_and_mask(name, args.image_size, args.sparsity)
        base.to(args.device)
        mask = {k: m.to(args.device) for k, m in mask.items()}
        model = make_variant(v, base, mask)
        del base, mask
        gc.collect()
        stepper = Stepper(model, x, y)
        stepper()
        torch.cuda.synchronize()
        static = tensor_bytes(stepper.model, stepper.optimizer)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(max(1, args.memory_steps - 1)):
            stepper()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        results[v] = {"peak_bytes": peak, "static_bytes": static, "transient_bytes": peak - static}
        del model, stepper
    return results


# --------------------------------------------------------------------------- prepare / finalize


def time_prepare(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median wall time of erk mask, prepare (full recipe), retirement and finalize on real modules."""
    torch.manual_seed(0)
    base = build_model(name, 224)
    rows: dict[str, list[float]] = {
        "mask_s": [],
        "prepare_s": [],
        "prepare_baseline_s": [],
        "retire_s": [],
        "finalize_s": [],
    }
    for _ in range(args.prepare_repeats):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        mask = tost.masks.erk(model, args.sparsity, seed=0)
        rows["mask_s"].append(time.perf_counter() - start)
        recipe = tost.Recipe.tost(total_steps=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            tost.prepare(model, mask, recipe)
            rows["prepare_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tost.step(model, max(recipe.warmup_steps("neurons"), recipe.warmup_steps("skips")))
            rows["retire_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tost.finalize(model)
            rows["finalize_s"].append(time.perf_counter() - start)
            other = copy.deepcopy(base)
            start = time.perf_counter()
            tost.prepare(other, mask, tost.Recipe.baseline())
            rows["prepare_baseline_s"].append(time.perf_counter() - start)
        del model, other
        gc.collect()
    return {
        "model": name,
        "params": sum(p.numel() for p in base.parameters()),
        **{k: statistics.median(v) for k, v in rows.items()},
        "all": rows,
    }


def warm_up_library() -> None:
    """One prepare / finalize on a tiny model: imports (timm's fx lists) are not billed to the first model."""
    model = build_model("tiny_cnn", 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tost.finalize(tost.prepare(model, tost.masks.erk(model, 0.5, seed=0), tost.Recipe.baseline()))


# --------------------------------------------------------------------------- profile


def profile(name: str, args: argparse.Namespace, argv: list[str] | None = None) -> str:
    """Per-op self CPU time of each variant (torch.profiler), and the ops whose time grew the most.

    The variants take turns, one profiled step each per round, over ``--profile-steps`` rounds,
    so a shared machine's load changes hit them alike; times are means per step.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    base, mask = seeded_model_and_mask(name, args.image_size, args.sparsity)
    x, y = batch(name, args.batch, args.image_size, "cpu")
    steppers = {v: Stepper(make_variant(v, base, mask), x, y) for v in args.variants}
    for stepper in steppers.values():
        for _ in range(2):
            stepper()
    rounds = max(1, args.profile_steps)
    totals: dict[str, dict[str, list[float]]] = {v: {} for v in args.variants}  # op -> [ms, calls]
    for r in range(rounds):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for v in order:
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                steppers[v]()
            for event in prof.key_averages():
                entry = totals[v].setdefault(event.key, [0.0, 0])
                entry[0] += event.self_cpu_time_total / 1000 / rounds
                entry[1] += event.count / rounds
    overrides = f", Recipe.tost overrides {TOST_OVERRIDES}" if TOST_OVERRIDES else ""
    machine = _machine(args)
    text = [
        f"# torch.profiler: {name}, batch {args.batch}, image {args.image_size}, {args.threads} thread(s){overrides}",
        "",
        f"Command: `{command_line(argv)}`. Library: commit {machine['commit']}, sources sha {machine['library_sha']}.",
        f"Self CPU time per training step, mean of {rounds} interleaved profiled steps per variant"
        f" (load average {_load(machine['load_average_start'])}).",
    ]
    for v in args.variants:
        ops = sorted(totals[v].items(), key=lambda kv: -kv[1][0])
        text += ["", f"## ({v}) {VARIANTS[v]}: {sum(ms for ms, _ in totals[v].values()):.1f} ms per step", ""]
        text += ["| op | ms per step | calls per step |", "| --- | ---: | ---: |"]
        text += [f"| `{op}` | {ms:.2f} | {calls:g} |" for op, (ms, calls) in ops[:15]]
    for new, ref in (("b", "a"), ("c", "a"), ("d", "c"), ("e", "c")):
        if new not in totals or ref not in totals:
            continue
        names = set(totals[new]) | set(totals[ref])
        zero = [0.0, 0]
        diffs = sorted(((totals[new].get(k, zero)[0] - totals[ref].get(k, zero)[0], k) for k in names), reverse=True)
        total = sum(ms for ms, _ in totals[new].values()) - sum(ms for ms, _ in totals[ref].values())
        text += ["", f"## ({new}) - ({ref}): {total:+.1f} ms per step; largest increases", ""]
        text += [f"| op | ms per step | calls per step ({new} / {ref}) |", "| --- | ---: | ---: |"]
        for diff, key in diffs[:14]:
            calls = f"{totals[new].get(key, zero)[1]:g} / {totals[ref].get(key, zero)[1]:g}"
            text.append(f"| `{key}` | {diff:+.2f} | {calls} |")
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------- report


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import LIBRARY_SHA, git_state

    return {
        "library_sha": LIBRARY_SHA,
        **git_state(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu": f"{cpu}, {os.cpu_count()} cores visible",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": load,
    }


def _load(value: Any) -> str:
    return "-" if not value else "/".join(f"{v:.1f}" for v in value)


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def step_tables(
    results: list[dict[str, Any]], memory: dict[str, dict], args: argparse.Namespace
) -> tuple[list[Table], list[str]]:
    """Rich tables and Markdown lines of step time and memory."""
    head = [
        "model",
        "variant",
        "median ms",
        "x (a) dense",
        "x (b) prune",
        "x (c) masks",
        "peak MiB",
        "mem x (a)",
        "mem x (b)",
    ]
    md = ["| " + " | ".join(head) + " |", "| --- | --- | " + " | ".join(["---:"] * (len(head) - 2)) + " |"]
    tables = []
    for result in results:
        table = Table(title=f"{result['model']}: training step, batch {args.batch}, image {args.image_size}")
        for column in head[1:]:
            table.add_column(column, justify="right" if column != "variant" else "left")
        mem = memory.get(result["model"], {})
        for v in args.variants:
            peak = mem.get(v, {}).get("peak_bytes")
            mem_a = peak / mem["a"]["peak_bytes"] if peak and "a" in mem else None
            mem_b = peak / mem["b"]["peak_bytes"] if peak and "b" in mem else None
            cells = [
                f"({v}) {VARIANTS[v]}",
                f"{result['median_ms'][v]:.1f}",
                _ratio_cell(result["ratio_to"].get("a", {}).get(v)),
                _ratio_cell(result["ratio_to"].get("b", {}).get(v)),
                _ratio_cell(result["ratio_to"].get("c", {}).get(v)),
                _mib(peak),
                _ratio_cell(mem_a),
                _ratio_cell(mem_b),
            ]
            table.add_row(*cells)
            md.append(f"| {result['model']} | " + " | ".join(cells) + " |")
        tables.append(table)
    return tables, md


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return q1, q2, q3


def target_lines(results: list[dict[str, Any]]) -> list[str]:
    """Each target with the median per-round ratio and its interquartile range over rounds.

    ``yes`` / ``no``: the whole interquartile range is on that side of the limit; otherwise the
    difference is within the machine's noise and the verdict says so.
    """
    lines = ["| model | target | measured (IQR over rounds) | met? |", "| --- | --- | ---: | --- |"]
    for result in results:
        times = result["times_s"]
        for what, num, den, limit in TARGETS:
            if num not in times or den not in times:
                continue
            q1, median, q3 = _quartiles([t / t_ref for t, t_ref in zip(times[num], times[den])])
            if q3 <= limit:
                verdict = "yes"
            elif q1 > limit:
                verdict = "**no**"
            else:
                verdict = f"within noise (median {'meets' if median <= limit else 'misses'} it)"
            lines.append(f"| {result['model']} | {what} | {median:.3f} ({q1:.3f}-{q3:.3f}) | {verdict} |")
    return lines


def prepare_lines(rows: list[dict[str, Any]]) -> tuple[Table, list[str]]:
    head = [
        "model",
        "params (M)",
        "erk mask s",
        "prepare s (ToST)",
        "prepare s (baseline)",
        "retire s",
        "finalize s",
        "target",
    ]
    table = Table(title="prepare / finalize wall time (median)")
    for column in head:
        table.add_column(column, justify="left" if column == "model" else "right")
    md = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
    for row in rows:
        limit = PREPARE_TARGETS.get(row["model"])
        target = "-" if limit is None else f"<= {limit:g} s: {'yes' if row['prepare_s'] <= limit else 'no'}"
        cells = [
            row["model"],
            f"{row['params'] / 1e6:.1f}",
            f"{row['mask_s']:.2f}",
            f"{row['prepare_s']:.2f}",
            f"{row['prepare_baseline_s']:.2f}",
            f"{row['retire_s']:.2f}",
            f"{row['finalize_s']:.2f}",
            target,
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    return table, md


def command_line(argv: list[str] | None) -> str:
    parts = sys.argv[1:] if argv is None else argv
    return "python benchmarks/overhead.py" + ("" if not parts else " " + " ".join(parts))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--render", action="store_true", help="only rewrite overhead.md from <out>/overhead.json")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models if m]
    for item in args.set:
        field, _, text = item.partition("=")
        try:
            TOST_OVERRIDES[field] = json.loads(text)
        except json.JSONDecodeError:
            TOST_OVERRIDES[field] = text
    tost.Recipe.tost(total_steps=100, **TOST_OVERRIDES)  # a bad field fails here, with the library's message
    args.prepare_models = [m for m in args.prepare_models if m]
    if args.image_size is None:
        args.image_size = 224 if args.device.startswith("cuda") else 64
    if args.threads is None:
        args.threads = torch.get_num_threads() if args.device.startswith("cuda") else 1
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.render:
        render(json.loads((out / "overhead.json").read_text()), out)
        console.print(f"wrote {out / 'overhead.md'} from overhead.json")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        text = profile(args.profile, args, argv)
        path = out / f"overhead_profile_{args.profile}.md"
        path.write_text(text)
        console.print(text, markup=False, highlight=False)
        console.print(f"wrote {path}")
        return 0

    report: dict[str, Any] = {"machine": _machine(args), "command": command_line(argv), "settings": {
        k: getattr(args, k)
        for k in (
            "batch", "image_size", "sparsity", "repeats", "warmup_iters", "memory_steps", "prepare_repeats",
            "variants", "device", "threads",
        )
    } | {"tost_overrides": dict(TOST_OVERRIDES)}}  # fmt: skip
    started = time.perf_counter()
    warm_up_library()
    results = []
    memory: dict[str, dict] = {}
    for name in [] if args.no_memory else args.models:
        # All memory first: a forked child reuses the parent's freed heap blocks before mapping
        # new ones, and those would hide its allocations; so the parent must not have trained yet.
        console.print(f"[bold]{name}[/]: peak memory of {len(args.variants)} variants ...")
        measure = measure_memory_cuda if args.device.startswith("cuda") else measure_memory_cpu
        memory[name] = measure(name, args)
    for name in args.models:
        console.print(f"[bold]{name}[/]: {args.repeats} interleaved rounds of {len(args.variants)} variants ...")
        results.append(time_steps(name, args))
    prepare_rows = []
    for name in args.prepare_models:
        console.print(f"[bold]{name}[/]: prepare / finalize x{args.prepare_repeats} ...")
        prepare_rows.append(time_prepare(name, args))
    report.update(steps=results, memory=memory, prepare=prepare_rows)
    report["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["seconds"] = round(time.perf_counter() - started, 1)

    (out / "overhead.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    render(report, out)
    console.print(f"wrote {out / 'overhead.md'} and overhead.json ({report['seconds']:.0f} s)")
    return 0


def render(report: dict[str, Any], out: Path) -> None:
    """Print the tables and write ``overhead.md`` from a report (as saved in ``overhead.json``)."""
    settings = dict(report["settings"])
    settings.setdefault("device", report["machine"]["device"])
    settings.setdefault("threads", report["machine"]["threads"])
    if "variants" not in settings:  # files written before the setting was saved
        settings["variants"] = list(report["steps"][0]["median_ms"]) if report["steps"] else list(VARIANTS)
    args = argparse.Namespace(**settings)
    results, memory, prepare_rows = report["steps"], report["memory"], report["prepare"]
    tables, md_steps = step_tables(results, memory, args)
    for table in tables:
        console.print(table)
    md = [
        "# Cost of the scaffolding",
        "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s).",
        f"Machine: {report['machine']['cpu']}"
        + (f", {report['machine']['gpu']}" if report["machine"]["gpu"] else "")
        + f"; device {args.device}, {args.threads} torch thread(s), torch {report['machine']['torch']};"
        f" load average {_load(report['machine']['load_average_start'])} at start,"
        f" {_load(report['machine']['load_average_end'])} at end (1, 5, 15 min; the machine is shared).",
        f"Library: commit {report['machine']['commit']}, sources sha {report['machine']['library_sha']}"
        + (
            f", uncommitted changes in {', '.join(report['machine']['changed'])}"
            if report["machine"]["changed"]
            else ""
        )
        + ".",
        "",
    ]
    if results:
        memory_note = (
            "`torch.cuda.max_memory_allocated` above the allocation before the variant was built"
            if args.device.startswith("cuda")
            else "static (storages held between steps: weights, masks, gradients, optimizer state, counted) +"
            " transient (peak rise of anonymous RSS during the steps, sampled every 0.2 ms in a forked child with"
            " glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the resident set)"
        )
        md += [
            f"## Training step (batch {args.batch}, image {args.image_size}x{args.image_size},"
            f" ERK sparsity {args.sparsity})",
            "",
            "One SGD step (forward, cross-entropy, backward, step). Variants interleaved round-robin; median ms"
            f" over {args.repeats} rounds after {args.warmup_iters} untimed steps each; ratios are medians over"
            f" rounds of the ratio within a round. Peak memory ({args.memory_steps} steps): {memory_note}.",
            "",
            *md_steps,
            "",
            "### Targets",
            "",
            *target_lines(results),
            "",
        ]
    if prepare_rows:
        table, md_prepare = prepare_lines(prepare_rows)
        console.print(table)
        md += [
            "## prepare / finalize (real modules, ERK mask, median of "
            f"{args.prepare_repeats}; one warm-up prepare on a tiny model first, so timm's import is not billed)",
            "",
            "`prepare s (ToST)`: `Recipe.tost` (trace both modes, passes, codegen, masks, rescale);"
            " `retire s`: the graph rebuild when the warm-up ends; `finalize s`: bake masks, restore forward.",
            "",
            *md_prepare,
            "",
        ]
    if results:
        console.print("\n".join(target_lines(results)), markup=False, highlight=False)
    (out / "overhead.md").write_text("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
