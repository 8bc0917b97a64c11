"""The table of ``benchmarks/gpu_check.py``, from a report as saved in ``gpu_check.json``.

Needs no torch; ``python benchmarks/gpu_check.py --report --out DIR`` prints it from
``DIR/gpu_check.json``.
"""

from __future__ import annotations

from typing import Any

from _common import rich_table
from rich.console import Console
from rich.table import Table

HEAD = (
    "model", "mode", "baseline vs ref", "losses", "skipped", "masked != 0", "finalize vs prepared", "compile vs eager",
    "ok",
)  # fmt: skip


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    (console or Console(width=160)).print(results_table(report))


def results_table(report: dict[str, Any]) -> Table:
    """One line per (model, mode): the measured differences and whether every check held."""
    machine = report["machine"]
    title = f"GPU check on {machine['device']} (torch {machine['torch']})"
    return rich_table(title, HEAD, map(row_cells, report["rows"]))


def row_cells(row: dict[str, Any]) -> list[str]:
    if "error" in row:
        return [row["model"], row["mode"], "error", "", "", "", "", "", "NO"]
    return [
        row["model"],
        row["mode"],
        f"{row['baseline_vs_reference']:.1e}",
        f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}",
        str(row["scaler_skipped"]),
        str(row["masked_nonzero"]),
        f"{row['finalize_vs_prepared']:.1e}",
        f"{row['compile_vs_eager']:.1e}" if "compile_vs_eager" in row else "-",
        "yes" if row["ok"] else "NO",
    ]
