"""The tables of ``benchmarks/overhead.py``: ``overhead.md`` and the console, from ``overhead.json`` alone.

    python benchmarks/overhead.py --render --out benchmarks/results   # rewrite overhead.md from the JSON

Needs no torch: everything it shows was measured and saved by ``overhead.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _common import markdown_table, paired_ratios, quartiles, rich_table, write_atomic
from rich.console import Console
from rich.table import Table

VARIANTS = {
    "a": "dense",
    "b": "torch prune",
    "c": "masks only (Recipe.baseline)",
    "d": "ToST warm-up",
    "e": "ToST retired",
}
TARGETS = (
    # (what, numerator, denominator, limit)
    ("retired <= 1.03x masks only", "e", "c", 1.03),
    ("masks only <= 1.10x dense", "c", "a", 1.10),
    ("masks only <= torch prune", "c", "b", 1.00),
    ("warm-up <= 1.35x masks only", "d", "c", 1.35),
)
PREPARE_TARGETS = {"resnet50": 2.0, "vit_base": 5.0}
STEP_HEAD = (
    "model", "variant", "median ms", "x (a) dense", "x (b) prune", "x (c) masks", "peak MiB", "mem x (a)", "mem x (b)",
)  # fmt: skip
PREPARE_HEAD = (
    "model", "params (M)", "erk mask s", "prepare s (ToST)", "prepare s (baseline)", "retire s", "finalize s", "target",
)  # fmt: skip
console = Console(width=160)


def render(report: dict[str, Any], out: Path) -> None:
    """Print the tables and write ``overhead.md`` from a report (as saved in ``overhead.json``)."""
    settings = settings_of(report)
    for table in tables(report, settings):
        console.print(table)
    if report["steps"]:
        console.print("\n".join(target_lines(report["steps"])), markup=False, highlight=False)
    write_atomic(out / "overhead.md", markdown(report, settings))


def settings_of(report: dict[str, Any]) -> argparse.Namespace:
    """The run's settings, with what files written before a setting was saved imply."""
    settings = dict(report["settings"])
    settings.setdefault("device", report["machine"]["device"])
    settings.setdefault("threads", report["machine"]["threads"])
    if "variants" not in settings:
        settings["variants"] = list(report["steps"][0]["median_ms"]) if report["steps"] else list(VARIANTS)
    return argparse.Namespace(**settings)


def markdown(report: dict[str, Any], settings: argparse.Namespace) -> str:
    """The text of ``overhead.md``."""
    lines = ["# Cost of the scaffolding", "", *header_lines(report, settings), ""]
    if report["steps"]:
        lines += step_section(report["steps"], report["memory"], settings)
    if report["prepare"]:
        lines += prepare_section(report["prepare"], settings)
    return "\n".join(lines)


def tables(report: dict[str, Any], settings: argparse.Namespace) -> list[Table]:
    """The console tables: one per step-time model, then prepare / finalize (in the order printed)."""
    shown = [step_table(result, report["memory"], settings) for result in report["steps"]]
    if report["prepare"]:
        rows = map(prepare_cells, report["prepare"])
        title = "prepare / finalize wall time (median)"
        shown.append(rich_table(title, PREPARE_HEAD, rows, right=range(1, len(PREPARE_HEAD))))
    return shown


# --------------------------------------------------------------------------- sections


def header_lines(report: dict[str, Any], settings: argparse.Namespace) -> list[str]:
    """Command, machine and library of the run."""
    machine = report["machine"]
    gpu = f", {machine['gpu']}" if machine["gpu"] else ""
    changed = f", uncommitted changes in {', '.join(machine['changed'])}" if machine["changed"] else ""
    return [
        f"Command: `{report['command']}` ({report['seconds']:.0f} s).",
        f"Machine: {machine['cpu']}{gpu}; device {settings.device}, {settings.threads} torch thread(s),"
        f" torch {machine['torch']}; load average {load_cell(machine['load_average_start'])} at start,"
        f" {load_cell(machine['load_average_end'])} at end (1, 5, 15 min; the machine is shared).",
        f"Library: commit {machine['commit']}, sources sha {machine['library_sha']}{changed}.",
    ]


def step_section(results: list[dict], memory: dict[str, dict], settings: argparse.Namespace) -> list[str]:
    """Training step time and memory of every variant, and the targets."""
    rows = [[result["model"], *cells] for result in results for cells in step_cells(result, memory, settings)]
    return [
        f"## Training step (batch {settings.batch}, image {settings.image_size}x{settings.image_size},"
        f" ERK sparsity {settings.sparsity})",
        "",
        "One SGD step (forward, cross-entropy, backward, step). Variants interleaved round-robin; median ms"
        f" over {settings.repeats} rounds after {settings.warmup_iters} untimed steps each; ratios are medians over"
        f" rounds of the ratio within a round. Peak memory ({settings.memory_steps} steps): {memory_note(settings)}.",
        "",
        *markdown_table(STEP_HEAD, rows, right=range(2, len(STEP_HEAD))),
        "",
        "### Targets",
        "",
        *target_lines(results),
        "",
    ]


def memory_note(settings: argparse.Namespace) -> str:
    if settings.device.startswith("cuda"):
        return "`torch.cuda.max_memory_allocated` above the allocation before the variant was built"
    return (
        "static (storages held between steps: weights, masks, gradients, optimizer state, counted) +"
        " transient (peak rise of anonymous RSS during the steps, sampled every 0.2 ms in a forked child with"
        " glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the resident set)"
    )


def prepare_section(rows: list[dict[str, Any]], settings: argparse.Namespace) -> list[str]:
    return [
        "## prepare / finalize (real modules, ERK mask, median of "
        f"{settings.prepare_repeats}; one warm-up prepare on a tiny model first, so timm's import is not billed)",
        "",
        "`prepare s (ToST)`: `Recipe.tost` (trace both modes, passes, codegen, masks, rescale);"
        " `retire s`: the graph rebuild when the warm-up ends; `finalize s`: bake masks, restore forward.",
        "",
        *markdown_table(PREPARE_HEAD, map(prepare_cells, rows), right=range(1, len(PREPARE_HEAD))),
        "",
    ]


# --------------------------------------------------------------------------- rows


def step_table(result: dict[str, Any], memory: dict[str, dict], settings: argparse.Namespace) -> Table:
    title = f"{result['model']}: training step, batch {settings.batch}, image {settings.image_size}"
    rows = step_cells(result, memory, settings)
    return rich_table(title, STEP_HEAD[1:], rows, right=range(1, len(STEP_HEAD) - 1))


def step_cells(result: dict[str, Any], memory: dict[str, dict], settings: argparse.Namespace) -> list[list[str]]:
    """Per variant: median ms, its ratios to (a), (b), (c), peak MiB and its ratios to (a), (b)."""
    mem = memory.get(result["model"], {})
    rows = []
    for v in settings.variants:
        peak = mem.get(v, {}).get("peak_bytes")
        mem_a = peak / mem["a"]["peak_bytes"] if peak and "a" in mem else None
        mem_b = peak / mem["b"]["peak_bytes"] if peak and "b" in mem else None
        ratios = [result["ratio_to"].get(ref, {}).get(v) for ref in "abc"]
        rows.append([
            f"({v}) {VARIANTS[v]}", f"{result['median_ms'][v]:.1f}", *map(ratio_cell, ratios),
            mib_cell(peak), ratio_cell(mem_a), ratio_cell(mem_b),
        ])  # fmt: skip
    return rows


def target_lines(results: list[dict[str, Any]]) -> list[str]:
    """Each target with the median per-round ratio and its interquartile range over rounds.

    ``yes`` / ``no``: the whole interquartile range is on that side of the limit; otherwise the
    difference is within the machine's noise and the verdict says so.
    """
    rows = []
    for result in results:
        times = result["times_s"]
        for what, num, den, limit in TARGETS:
            if num in times and den in times:
                q1, median, q3 = quartiles(paired_ratios(times[num], times[den]))
                measured = f"{median:.3f} ({q1:.3f}-{q3:.3f})"
                rows.append([result["model"], what, measured, verdict(q1, median, q3, limit)])
    return markdown_table(["model", "target", "measured (IQR over rounds)", "met?"], rows, right=[2])


def verdict(q1: float, median: float, q3: float, limit: float) -> str:
    if q3 <= limit:
        return "yes"
    if q1 > limit:
        return "**no**"
    return f"within noise (median {'meets' if median <= limit else 'misses'} it)"


def prepare_cells(row: dict[str, Any]) -> list[str]:
    limit = PREPARE_TARGETS.get(row["model"])
    target = "-" if limit is None else f"<= {limit:g} s: {'yes' if row['prepare_s'] <= limit else 'no'}"
    seconds = [f"{row[k]:.2f}" for k in ("mask_s", "prepare_s", "prepare_baseline_s", "retire_s", "finalize_s")]
    return [row["model"], f"{row['params'] / 1e6:.1f}", *seconds, target]


def load_cell(value: Any) -> str:
    return "-" if not value else "/".join(f"{v:.1f}" for v in value)


def ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def mib_cell(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


# --------------------------------------------------------------------------- profile


def render_profile(profiled: dict[str, Any]) -> str:
    """``overhead_profile_<model>.md`` from what ``overhead.py --profile`` measured.

    ``profiled``: ``model``, ``settings`` (batch, image_size, threads, variants, tost_overrides),
    ``command``, ``machine``, ``rounds`` and ``totals`` (variant -> op -> [ms, calls] per step).
    """
    settings, machine, totals = profiled["settings"], profiled["machine"], profiled["totals"]
    overrides = settings["tost_overrides"]
    text = [
        f"# torch.profiler: {profiled['model']}, batch {settings['batch']}, image {settings['image_size']},"
        f" {settings['threads']} thread(s)" + (f", Recipe.tost overrides {overrides}" if overrides else ""),
        "",
        f"Command: `{profiled['command']}`. Library: commit {machine['commit']}, sources sha {machine['library_sha']}.",
        f"Self CPU time per training step, mean of {profiled['rounds']} interleaved profiled steps per variant"
        f" (load average {load_cell(machine['load_average_start'])}).",
    ]
    for v in settings["variants"]:
        text += variant_ops(v, totals[v])
    for new, ref in (("b", "a"), ("c", "a"), ("d", "c"), ("e", "c")):
        if new in totals and ref in totals:
            text += largest_increases(new, ref, totals)
    return "\n".join(text) + "\n"


def variant_ops(variant: str, ops: dict[str, list[float]]) -> list[str]:
    """The 15 ops of a variant with the most self CPU time."""
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    total = sum(ms for ms, _ in ops.values())
    rows = [[f"`{op}`", f"{ms:.2f}", f"{calls:g}"] for op, (ms, calls) in top]
    return [
        "",
        f"## ({variant}) {VARIANTS[variant]}: {total:.1f} ms per step",
        "",
        *markdown_table(["op", "ms per step", "calls per step"], rows, right=[1, 2]),
    ]


def largest_increases(new: str, ref: str, totals: dict[str, dict[str, list[float]]]) -> list[str]:
    """The 14 ops whose self CPU time grew the most from variant ``ref`` to ``new``."""
    zero = [0.0, 0]
    names = set(totals[new]) | set(totals[ref])
    diffs = sorted(((totals[new].get(k, zero)[0] - totals[ref].get(k, zero)[0], k) for k in names), reverse=True)
    total = sum(ms for ms, _ in totals[new].values()) - sum(ms for ms, _ in totals[ref].values())
    rows = [
        [f"`{key}`", f"{diff:+.2f}", f"{totals[new].get(key, zero)[1]:g} / {totals[ref].get(key, zero)[1]:g}"]
        for diff, key in diffs[:14]
    ]
    return [
        "",
        f"## ({new}) - ({ref}): {total:+.1f} ms per step; largest increases",
        "",
        *markdown_table(["op", "ms per step", f"calls per step ({new} / {ref})"], rows, right=[1, 2]),
    ]
