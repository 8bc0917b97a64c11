"""The report of ``benchmarks/accuracy.py``: ``accuracy.json``, ``.md`` and ``.png`` from ``accuracy.jsonl`` alone.

    python benchmarks/accuracy.py --report     # rewrite the three files from the jsonl

Trains nothing: every figure comes from the records the runs appended. It imports the library
all the same, since a record is reported under the variants whose Recipe, with today's defaults,
it trained with (:func:`accuracy_keys.labels_of`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cifar
from _common import RESULTS, markdown_table, write_atomic
from accuracy_keys import ABLATION_SPARSITY, ABLATION_VARIANTS, MASKS, SPARSITIES, labels_of, read_results

Chosen = dict[tuple, dict[str, Any]]
"""(mask, sparsity, seed, variant, overrides JSON) -> the latest record under that name."""


def write_report(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Rewrite ``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` in ``out`` from its ``accuracy.jsonl``."""
    report = build_report(read_results(out / "accuracy.jsonl"), args)
    write_atomic(out / "accuracy.json", report_json(report))
    write_atomic(out / "accuracy.md", render_markdown(report, args))
    render_plot(report, out / "accuracy.png")
    return report


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True, default=str) + "\n"


# --------------------------------------------------------------------------- statistics


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _summary(values: Iterable[float]) -> dict[str, float | None]:
    """``{"mean": ..., "std": ...}`` of the values (None where there are too few)."""
    return dict(zip(("mean", "std"), _mean_std(list(values))))


def _gain(base: dict[int, float], other: dict[int, float]) -> list[float]:
    return [other[s] - base[s] for s in sorted(set(base) & set(other))]


def _verdict(gains: list[float]) -> str:
    if not gains:
        return "pending"
    mean, std = _mean_std(gains)
    if std is None:
        return "yes (1 seed)" if mean > 0 else "no (1 seed)"
    noise = 2 * std / math.sqrt(len(gains))
    if mean > noise:
        return "yes"
    if mean < -noise:
        return "no (worse)"
    return "yes, within noise" if mean > 0 else "no, within noise"


# --------------------------------------------------------------------------- records to tables


def _select(
    records: list[dict[str, Any]], args: argparse.Namespace, arch: str, kernels: str = "off", **fixed: Any
) -> Chosen:
    """Latest record of ``arch`` per (mask, sparsity, seed, variant, overrides) matching the report's protocol,
    trained with ``kernels`` (``off``: the dense runs every table but the kernels' one is made of).

    A record counts under every variant name whose Recipe it trained with (see :func:`labels_of`).
    """
    chosen: Chosen = {}
    for record in records:
        key = record["key"]
        if (
            key["arch"] != arch
            or key.get("kernels", "off") != kernels
            or key["epochs"] != args.epochs
            or key.get("subset") != args.subset
            or not math.isclose(key.get("val_split", 0.1), args.val_split)
        ):
            continue
        if any(key.get(k) != v for k, v in fixed.items()):
            continue
        for variant, overrides in labels_of(record):
            chosen[(key["mask"], round(key["sparsity"], 6), key["seed"], variant, overrides)] = record
    return chosen


def _cell(chosen: Chosen, mask: str, sparsity: float, variant: str, metric: str, overrides: str = "{}"):
    """seed -> ``metric`` of the records under (mask, sparsity, variant, overrides)."""
    return {
        k[2]: r[metric]
        for k, r in chosen.items()
        if k[0] == mask and k[1] == round(sparsity, 6) and k[3] == variant and k[4] == overrides
    }


def _pooled(rows: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """The masks of ``main`` rows with a pair, and every (mask, seed) gain of them."""
    rows = [r for r in rows if r["paired"]]
    gains = [
        r["per_seed"]["tost"][seed] - r["per_seed"]["baseline"][seed]
        for r in rows
        for seed in sorted(set(r["per_seed"]["tost"]) & set(r["per_seed"]["baseline"]))
    ]
    return [r["mask"] for r in rows], gains


def _main_rows(test: Chosen, masks: list[str], sparsities: list[float]) -> list[dict[str, Any]]:
    """Default protocol against ToST on test, per (mask, sparsity), paired by seed."""
    rows = []
    for mask in masks:
        for sparsity in sparsities:
            base = _cell(test, mask, sparsity, "baseline", "test_acc")
            ours = _cell(test, mask, sparsity, "tost", "test_acc")
            gains = _gain(base, ours)
            rows.append(
                {
                    "mask": mask,
                    "sparsity": sparsity,
                    "baseline": _summary(base.values()),
                    "tost": _summary(ours.values()),
                    "gain": _summary(gains),
                    "seeds_baseline": sorted(base),
                    "seeds_tost": sorted(ours),
                    "paired": len(gains),
                    "per_seed": {"baseline": base, "tost": ours},
                    "per_seed_val": {v: _cell(test, mask, sparsity, v, "val_acc") for v in ("baseline", "tost")},
                    "verdict": _verdict(gains),
                }
            )
    return rows


def _pooled_row(sparsity: float, group: str, names: list[str], gains: list[float]) -> dict[str, Any]:
    """A row of pooled pairs: ``group`` names what was pooled (``masks`` or ``archs``)."""
    return {
        "sparsity": sparsity,
        group: names,
        "pairs": len(gains),
        "gain": _summary(gains),
        "verdict": _verdict(gains),
    }


def _pooled_rows(main: list[dict[str, Any]], sparsities: list[float]) -> list[dict[str, Any]]:
    """Per sparsity, every (mask, seed) pair of the main rows."""
    rows = []
    for sparsity in sparsities:
        masks, gains = _pooled([r for r in main if r["sparsity"] == sparsity])
        rows.append(_pooled_row(sparsity, "masks", masks, gains))
    return rows


def _ablation_rows(test: Chosen, masks: list[str]) -> list[dict[str, Any]]:
    """Each ablation variant against the default protocol, for the masks the ablation was run for."""
    rows = []
    ablated = [m for m in masks if any(_cell(test, m, ABLATION_SPARSITY, v, "test_acc") for v in ABLATION_VARIANTS)]
    for mask in ablated:
        base = _cell(test, mask, ABLATION_SPARSITY, "baseline", "test_acc")
        for variant in ("baseline", *ABLATION_VARIANTS, "tost"):
            values = _cell(test, mask, ABLATION_SPARSITY, variant, "test_acc")
            gains = _gain(base, values) if variant != "baseline" else []
            rows.append(
                {
                    "mask": mask,
                    "sparsity": ABLATION_SPARSITY,
                    "variant": variant,
                    "acc": _summary(values.values()),
                    "gain": _summary(gains),
                    "seeds": sorted(values),
                    "per_seed": values,
                }
            )
    return rows


def _tuning_rows(val: Chosen) -> list[dict[str, Any]]:
    """Validation accuracy of every (mask, sparsity, variant, overrides) against the default protocol."""
    rows = []
    for mask, sparsity, variant, overrides in sorted({(k[0], k[1], k[3], k[4]) for k in val}):
        values = _cell(val, mask, sparsity, variant, "val_acc", overrides)
        base = _cell(val, mask, sparsity, "baseline", "val_acc")
        gains = _gain(base, values) if (variant, overrides) != ("baseline", "{}") else []
        rows.append(
            {
                "mask": mask,
                "sparsity": sparsity,
                "variant": variant,
                "overrides": json.loads(overrides),
                "val_acc": _summary(values.values()),
                "gain": _summary(gains),
                "seeds": sorted(values),
                "verdict": _verdict(gains) if gains else "",
            }
        )
    return rows


def _kernel_rows(records: list[dict[str, Any]], args: argparse.Namespace, arch: str, dense: Chosen) -> list[dict]:
    """Each run with sparse kernels against the dense run of its (mask, sparsity, seed, Recipe), on test."""
    rows = []
    for kernels in sorted({r["key"].get("kernels", "off") for r in records} - {"off"}):
        sparse = _select(records, args, arch, kernels, eval="test")
        for mask, sparsity, variant, overrides in sorted({(k[0], k[1], k[3], k[4]) for k in sparse}):
            ours = _cell(sparse, mask, sparsity, variant, "test_acc", overrides)
            base = _cell(dense, mask, sparsity, variant, "test_acc", overrides)
            rows.append(
                {
                    "kernels": kernels,
                    "mask": mask,
                    "sparsity": sparsity,
                    "variant": variant,
                    "overrides": json.loads(overrides),
                    "dense": _summary(base.values()),
                    "sparse": _summary(ours.values()),
                    "difference": _summary(_gain(base, ours)),
                    "per_seed": {"dense": base, "sparse": ours},
                }
            )
    return rows


def _candidate_pairs(val: Chosen, sparsity: float, overrides: str) -> tuple[list[float], list[float], dict]:
    """Per (mask, seed) of one tuned setting: its difference to today's ToST and its gain over the default."""
    diffs, gains, mask_diffs = [], [], {}
    for (mask, s, seed, variant, over), record in sorted(val.items()):
        if s != sparsity or variant != "tost" or over != overrides:
            continue
        default = val.get((mask, s, seed, "tost", "{}"))
        base = val.get((mask, s, seed, "baseline", "{}"))
        if default is not None:
            diff = record["val_acc"] - default["val_acc"]
            diffs.append(diff)
            mask_diffs.setdefault(mask, []).append(diff)
        if base is not None:
            gains.append(record["val_acc"] - base["val_acc"])
    return diffs, gains, mask_diffs


def _candidates(val: Chosen) -> list[dict[str, Any]]:
    """Each tuned ToST setting against today's ``Recipe.tost``, on validation, pooled over masks.

    Differences are paired by (mask, seed): same mask, initial weights and batches. This is the
    table a default is changed from (never ``x_test``).
    """
    rows = []
    for sparsity, overrides in sorted({(k[1], k[4]) for k in val if k[3] == "tost" and k[4] != "{}"}):
        diffs, gains, mask_diffs = _candidate_pairs(val, sparsity, overrides)
        rows.append(
            {
                "sparsity": sparsity,
                "overrides": json.loads(overrides),
                "masks": sorted(mask_diffs),
                "pairs": len(diffs),
                "vs_tost": _summary(diffs),
                "vs_tost_per_mask": {mask: statistics.fmean(d) for mask, d in sorted(mask_diffs.items())},
                "vs_baseline": _summary(gains),
                "verdict": _verdict(diffs),
            }
        )
    return rows


# --------------------------------------------------------------------------- the report


def build_report(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Every architecture's tables, the pairs of all of them pooled, and the budget."""
    sections = [build_arch_report(records, arch, args) for arch in _arch_order(records, args)]
    return {
        "architectures": sections,
        "across": _across(sections),
        "split_noise": _split_noise(sections),
        "budget": _budget(records),
    }


def _arch_order(records: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The architectures to report: those asked for, else every one with a record, in ``ARCHITECTURES`` order."""
    if args.arch:
        return list(args.arch)
    seen = {r["key"]["arch"] for r in records}
    return [a for a in cifar.ARCHITECTURES if a in seen] + sorted(seen - set(cifar.ARCHITECTURES))


def build_arch_report(records: list[dict[str, Any]], arch: str, args: argparse.Namespace) -> dict[str, Any]:
    """One architecture's tables: main grid, pooled over masks, ablation, validation, tuned settings."""
    test = _select(records, args, arch, eval="test")
    masks = list(dict.fromkeys([*args.masks, *sorted({k[0] for k in test})]))
    sparsities = sorted({*args.sparsities, *{k[1] for k in test}})
    main = _main_rows(test, masks, sparsities)
    # Every run trains on the same split and records its validation accuracy, so test-grid runs
    # count here too: this table (never x_test) is what the defaults are chosen from.
    val = _select(records, args, arch)
    return {
        "protocol": {
            "arch": arch,
            "description": cifar.DESCRIPTIONS.get(arch, arch),
            "epochs": args.epochs,
            "val_split": args.val_split,
            "subset": args.subset,
            "data": "cifar10-subset.npz: train on the seeded train split of x_train, accuracy on x_test",
        },
        "main": main,
        "pooled": _pooled_rows(main, sparsities),
        "ablation": _ablation_rows(test, masks),
        "tuning": _tuning_rows(val),
        "candidates": _candidates(val),
        "kernels": _kernel_rows(records, args, arch, test),
    }


def _across(sections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sparsity, every (architecture, mask, seed) pair of the main grids pooled."""
    rows = []
    for sparsity in sorted({r["sparsity"] for s in sections for r in s["main"]}):
        gains: list[float] = []
        archs = []
        for section in sections:
            _, arch_gains = _pooled([r for r in section["main"] if r["sparsity"] == sparsity])
            if arch_gains:
                archs.append(section["protocol"]["arch"])
                gains += arch_gains
        rows.append(_pooled_row(sparsity, "archs", archs, gains))
    return rows


def _split_noise(sections: list[dict[str, Any]]) -> dict[str, Any]:
    """How far a pair's gain on test and its gain on validation (the same two runs) differ, over every pair."""
    test, val = [], []
    for section in sections:
        for row in section["main"]:
            test += _gain(row["per_seed"]["baseline"], row["per_seed"]["tost"])
            val += _gain(row["per_seed_val"]["baseline"], row["per_seed_val"]["tost"])
    diffs = [t - v for t, v in zip(test, val, strict=True)]
    return {
        "pairs": len(diffs),
        "test_minus_val": _summary(diffs),
        "correlation": statistics.correlation(test, val) if len(diffs) > 2 else None,
    }


def _cpu_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full-size runs on a CPU: the ones whose times compare."""
    return [r for r in records if r["key"]["subset"] is None and r["device"] == "cpu"]


def _budget(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs, wall time in all and per machine, seconds per epoch and per run on CPU, the commits."""
    by_device: dict[str, float] = {}
    for r in records:
        label = r.get("gpu") or f"{r['device']} x{r['threads']} thread(s): {r.get('cpu', '?')}"
        by_device[label] = by_device.get(label, 0.0) + r["wall_s"]
    per_arch: dict[str, dict[str, Any]] = {}
    for arch in dict.fromkeys(r["key"]["arch"] for r in records):
        mine = [r for r in records if r["key"]["arch"] == arch]
        cpu = _cpu_runs(mine)
        per_arch[arch] = {
            "runs": len(mine),
            "median_cpu_epoch_s": round(statistics.median(r["train_s"] / r["key"]["epochs"] for r in cpu), 2)
            if cpu
            else None,
            "median_cpu_wall_s": round(statistics.median(r["wall_s"] for r in cpu), 1) if cpu else None,
        }
    train_s = [r["train_s"] / r["key"]["epochs"] for r in _cpu_runs(records)]
    return {
        "runs": len(records),
        "wall_s_total": round(sum(r["wall_s"] for r in records), 1),
        "wall_s_by_machine": {k: round(v, 1) for k, v in by_device.items()},
        "median_cpu_epoch_s": round(statistics.median(train_s), 2) if train_s else None,
        "per_arch": per_arch,
        "commits": sorted({str(r.get("commit")) for r in records}),
    }


# --------------------------------------------------------------------------- markdown


def _pct(mean: float | None, std: float | None, n: int, *, signed: bool = False) -> str:
    if mean is None:
        return "pending"
    sign = "+" if signed else ""
    text = f"{100 * mean:{sign}.2f}"
    text += f" ± {100 * std:.2f}" if std is not None else " ± n/a"
    return text


def _gain_pct(stats: dict[str, float | None]) -> str:
    return _pct(stats["mean"], stats["std"], 0, signed=True)


def _overrides_text(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def _main_lines(section: dict[str, Any]) -> list[str]:
    p = section["protocol"]
    head = ["mask", "sparsity", "default (baseline)", "ToST", "gain", "seeds", "ToST beats default?"]
    rows = [
        [
            row["mask"],
            f"{row['sparsity']:.2f}",
            _pct(row["baseline"]["mean"], row["baseline"]["std"], len(row["seeds_baseline"])),
            _pct(row["tost"]["mean"], row["tost"]["std"], len(row["seeds_tost"])),
            _gain_pct(row["gain"]),
            str(row["paired"]),
            row["verdict"],
        ]
        for row in section["main"]
    ]
    return [
        f"## `{p['arch']}`: {p['description']}",
        "",
        f"{p['arch']}, {p['epochs']} epochs, {p['data']} (val split {p['val_split']}"
        + (f", subset {p['subset']}" if p["subset"] else "")
        + "). Test accuracy in %, mean ± sample std over seeds; gain = ToST - default, paired by seed"
        " (same mask, same initial weights, same batches). `pending`: not run yet.",
        "",
        "### Main grid",
        "",
        *markdown_table(head, rows, right=range(1, 6)),
        "",
        "`yes` / `no (worse)`: the mean gain is more than two standard errors from zero; otherwise `within noise`.",
    ]


def _pooled_table(rows: list[dict[str, Any]], group: str, heading: str) -> list[str]:
    """Per sparsity: what was pooled (masks or architectures), the pairs, the gain and the verdict."""
    cells = [
        [f"{r['sparsity']:.2f}", ", ".join(r[group]) or "-", str(r["pairs"]), _gain_pct(r["gain"]), r["verdict"]]
        for r in rows
    ]
    return markdown_table(["sparsity", heading, "pairs", "gain", "ToST beats default?"], cells, right=(0, 2, 3))


def _pooled_lines(section: dict[str, Any]) -> list[str]:
    return [
        "",
        "Pooled over masks: every (mask, seed) pair at a sparsity, so more pairs and a smaller standard error.",
        "",
        *_pooled_table(section["pooled"], "masks", "masks"),
    ]


def _ablation_lines(section: dict[str, Any]) -> list[str]:
    if not section["ablation"]:
        return []
    rows = [
        [
            row["mask"],
            row["variant"],
            _pct(row["acc"]["mean"], row["acc"]["std"], len(row["seeds"])),
            "" if row["variant"] == "baseline" else _gain_pct(row["gain"]),
            str(len(row["seeds"])),
        ]
        for row in section["ablation"]
    ]
    return [
        "",
        f"### Ablation at sparsity {ABLATION_SPARSITY}",
        "",
        "`only_X`: the default protocol plus technique X alone (with the recipe's settings);"
        " `no_X`: the full recipe without X. Gain vs the default protocol, paired by seed.",
        "",
        *markdown_table(["mask", "variant", "test acc", "gain vs default", "seeds"], rows, right=(2, 3, 4)),
    ]


def _tuning_row(row: dict[str, Any]) -> list[str]:
    overrides = _overrides_text(row["overrides"]) or "-"
    is_default = row["variant"] == "baseline" and overrides == "-"
    return [
        row["mask"],
        f"{row['sparsity']:.2f}",
        row["variant"],
        overrides,
        _pct(row["val_acc"]["mean"], row["val_acc"]["std"], len(row["seeds"])),
        "" if is_default else _gain_pct(row["gain"]),
        str(len(row["seeds"])),
        row.get("verdict", ""),
    ]


def _tuning_lines(section: dict[str, Any]) -> list[str]:
    if not section["tuning"]:
        return []
    head = ["mask", "sparsity", "variant", "overrides", "val acc", "gain vs default", "seeds", "better than default?"]
    return [
        "",
        "### Validation accuracy of every recipe run (held-out 10% of x_train, never x_test)",
        "",
        "What the defaults are chosen from: every run, of the test grid or a tuning run, trains on the same"
        " split and records its validation accuracy. Gain vs the default protocol, paired by seed.",
        "",
        *markdown_table(head, [_tuning_row(row) for row in section["tuning"]], right=(1, 4, 5, 6)),
    ]


def _candidate_row(row: dict[str, Any]) -> list[str]:
    per_mask = " / ".join(f"{m} {100 * d:+.2f}" for m, d in row["vs_tost_per_mask"].items())
    return [
        f"{row['sparsity']:.2f}",
        _overrides_text(row["overrides"]),
        str(row["pairs"]),
        _gain_pct(row["vs_tost"]),
        per_mask or "-",
        _gain_pct(row["vs_baseline"]),
        row["verdict"],
    ]


def _candidate_lines(section: dict[str, Any]) -> list[str]:
    if not section["candidates"]:
        return []
    head = ["sparsity", "overrides", "pairs", "vs today's ToST", "per mask, vs today's ToST", "vs default protocol",
            "better than today's ToST?"]  # fmt: skip
    return [
        "",
        "### Tuned settings against today's `Recipe.tost` (validation, pooled over masks)",
        "",
        "Each row: ToST with the overrides, minus ToST with today's defaults, paired by (mask, seed) on the"
        " validation split; and its gain over the default protocol, paired by (mask, seed) the same way.",
        "",
        *markdown_table(head, [_candidate_row(row) for row in section["candidates"]], right=(0, 2, 3, 5)),
    ]


def _kernel_row(row: dict[str, Any]) -> list[str]:
    seeds = sorted(set(row["per_seed"]["dense"]) & set(row["per_seed"]["sparse"]))
    per_seed = ", ".join(f"{100 * (row['per_seed']['sparse'][s] - row['per_seed']['dense'][s]):+.2f}" for s in seeds)
    return [
        row["kernels"],
        row["mask"],
        f"{row['sparsity']:.2f}",
        row["variant"] + (f" ({_overrides_text(row['overrides'])})" if row["overrides"] else ""),
        _pct(row["dense"]["mean"], row["dense"]["std"], 0),
        _pct(row["sparse"]["mean"], row["sparse"]["std"], 0),
        per_seed or "-",
    ]


def _kernel_lines(section: dict[str, Any]) -> list[str]:
    if not section["kernels"]:
        return []
    head = ["kernels", "mask", "sparsity", "variant", "dense (test acc)", "sparse kernels", "difference per seed"]
    return [
        "",
        "### Sparse training kernels against dense (test)",
        "",
        "The same run (mask, initial weights, batches, Recipe) trained with `prepare(sparse_kernels=...)` and"
        " without; the dense column's ± is the seed noise the difference compares to.",
        "",
        *markdown_table(head, [_kernel_row(row) for row in section["kernels"]], right=(2, 4, 5)),
    ]


def render_arch_markdown(section: dict[str, Any]) -> list[str]:
    """One architecture's part of ``accuracy.md``."""
    parts = (_main_lines, _pooled_lines, _ablation_lines, _tuning_lines, _candidate_lines, _kernel_lines)
    return [line for part in parts for line in part(section)] + [""]


def _across_lines(report: dict[str, Any]) -> list[str]:
    return [
        "## Across architectures",
        "",
        "Pooled over architectures and masks: every (architecture, mask, seed) pair of the main grids at a"
        " sparsity, test accuracy. The spread mixes seed noise with real differences between networks.",
        "",
        *_pooled_table(report["across"], "archs", "architectures"),
        *_split_noise_lines(report["split_noise"]),
    ]


def _split_noise_lines(noise: dict[str, Any]) -> list[str]:
    """The evaluation split's share of a pair's noise: test gain against validation gain of the same runs."""
    spread = noise["test_minus_val"]
    if spread["std"] is None:
        return []
    corr = f", correlation {noise['correlation']:.2f}" if noise["correlation"] is not None else ""
    return [
        "",
        f"Evaluation noise: over the {noise['pairs']} pairs above, the gain on test minus the gain on validation"
        f" of the same two runs is {_gain_pct(spread)} points (mean ± sample std{corr}). The training is the"
        " same and only the images differ, so this spread is what the choice of evaluation images adds to a"
        " pair's gain (the two splits' shares together), before any seed noise.",
    ]


def _budget_lines(b: dict[str, Any]) -> list[str]:
    rows = [
        [arch, str(a["runs"]), str(a["median_cpu_epoch_s"] or "-"), str(a["median_cpu_wall_s"] or "-")]
        for arch, a in b["per_arch"].items()
    ]
    head = ["architecture", "runs", "median s per epoch (CPU)", "median wall s per run (CPU)"]
    return [
        "",
        "## Budget",
        "",
        f"{b['runs']} finished runs in the results file, {b['wall_s_total'] / 3600:.2f} h of wall time in all"
        + (f"; median {b['median_cpu_epoch_s']} s per epoch on CPU" if b["median_cpu_epoch_s"] else "")
        + f". Library commit(s): {', '.join(b['commits']) or '-'}.",
        "",
        *(f"- {machine_name}: {seconds / 3600:.2f} h" for machine_name, seconds in b["wall_s_by_machine"].items()),
        "",
        *markdown_table(head, rows, right=(1, 2, 3)),
    ]


def render_markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    """``accuracy.md``: each architecture's tables, the pairs of all of them, the budget, the command."""
    lines = ["# Accuracy: default protocol (masks only) vs ToST", ""]
    for section in report["architectures"]:
        lines += render_arch_markdown(section)
    lines += _across_lines(report) + _budget_lines(report["budget"])
    lines += [
        "",
        "Regenerate this file, `accuracy.json` and `accuracy.png` from `accuracy.jsonl`:",
        "",
        "```bash",
        f"python benchmarks/accuracy.py --report{_report_flags(args)}",
        "```",
        "",
    ]
    return "\n".join(lines)


def _report_flags(args: argparse.Namespace) -> str:
    flags = ""
    if args.arch:
        flags += " --arch " + " ".join(args.arch)
    if list(args.masks) != list(MASKS):
        flags += " --masks " + " ".join(args.masks)
    if list(args.sparsities) != list(SPARSITIES):
        flags += " --sparsities " + " ".join(f"{s:g}" for s in args.sparsities)
    if args.epochs != 20:
        flags += f" --epochs {args.epochs}"
    if args.subset is not None:
        flags += f" --subset {args.subset}"
    if Path(args.out).resolve() != RESULTS.resolve():
        flags += f" --out {args.out}"
    return flags


# --------------------------------------------------------------------------- plot


def render_plot(report: dict[str, Any], path: Path) -> bool:
    """Accuracy vs sparsity, one panel per architecture: a solid (ToST) and a dashed (default) line per mask.

    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    sections = report["architectures"] or [{"protocol": {"arch": "-", "epochs": 0}, "main": []}]
    columns = min(3, len(sections))
    rows = math.ceil(len(sections) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.4 * rows), squeeze=False)
    for ax, section in zip(axes.flat, sections):
        _plot_arch(ax, section, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for ax in list(axes.flat)[len(sections) :]:
        ax.set_visible(False)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _plot_arch(ax: Any, section: dict[str, Any], colors: list[str]) -> None:
    main = section["main"]
    masks = list(dict.fromkeys(row["mask"] for row in main))
    for i, mask in enumerate(masks):
        for j, (variant, style, marker) in enumerate((("baseline", "--", "o"), ("tost", "-", "s"))):
            rows = [r for r in main if r["mask"] == mask and r[variant]["mean"] is not None]
            if not rows:
                continue
            dodge = 0.0012 * (2 * i + j - len(masks))  # keep error bars at one sparsity apart
            ax.errorbar(
                [r["sparsity"] + dodge for r in rows],
                [100 * r[variant]["mean"] for r in rows],
                yerr=[100 * (r[variant]["std"] or 0.0) for r in rows],
                linestyle=style,
                marker=marker,
                color=colors[i % len(colors)],
                capsize=3,
                label=f"{mask} {'ToST' if variant == 'tost' else 'default'}",
            )
    _label_axes(ax, section["protocol"], sorted({r["sparsity"] for r in main}))


def _label_axes(ax: Any, protocol: dict[str, Any], ticks: list[float]) -> None:
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xlim(ticks[0] - 0.01, ticks[-1] + 0.01)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    title = f"{protocol['arch']}, CIFAR-10 subset, {protocol['epochs']} epochs (mean ± std over seeds)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
