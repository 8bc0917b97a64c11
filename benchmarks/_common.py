"""Helpers the benchmark scripts share: where a run ran, files, tables, interleaved rounds.

Imports only the standard library and rich at module level: the report modules use it to
render from saved results without importing torch. Helpers that need torch import it inside.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- the machine and the code


def cpu_model(default: str = "unknown") -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or ``default`` where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return default


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 min load averages (the machine is shared), or None where the OS has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def library_fingerprint() -> str:
    """sha256 of the library's sources as this process imported them (the tree may change meanwhile)."""
    import tost_surgery

    digest = hashlib.sha256()
    package = Path(tost_surgery.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git_state(paths: Sequence[str]) -> dict[str, Any]:
    """The commit, and which of ``paths`` (git pathspecs) differ from it; read-only git calls."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        return result.stdout if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", *paths)
    return {
        "commit": git("rev-parse", "HEAD").strip()[:12] or None,
        "changed": [line[3:] for line in changed.splitlines() if line.strip()],
    }


def package_versions(names: Iterable[str]) -> str | None:
    """``"torch 2.14.1, timm 1.0.31"``, or None when one is not installed (versions are informative only)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ", ".join(f"{name} {version(name)}" for name in names)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV with a header line; no file, no rows."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Rewrite a whole CSV atomically (columns not in ``columns`` are dropped)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tables


def markdown_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(
    head: Sequence[str], rows: Iterable[Sequence[str]], *, right: Iterable[int] = (), compact_rule: bool = False
) -> list[str]:
    """Lines of a Markdown table; ``right``: indices of right-aligned columns.

    Example:
        >>> markdown_table(["model", "ms"], [["resnet18", "3.1"]], right=[1])
        ['| model | ms |', '| --- | ---: |', '| resnet18 | 3.1 |']
    """
    right = set(right)
    marks = ["---:" if i in right else "---" for i in range(len(head))]
    rule = "|" + "|".join(marks) + "|" if compact_rule else markdown_row(marks)
    return [markdown_row(head), rule, *(markdown_row(r) for r in rows)]


def rich_table(title: str, head: Sequence[str], rows: Iterable[Sequence[str]], *, right: Iterable[int] = ()) -> Table:
    """A rich table of strings; ``right``: indices of right-justified columns."""
    right = set(right)
    table = Table(title=title)
    for i, column in enumerate(head):
        table.add_column(column, justify="right" if i in right else "left")
    for row in rows:
        table.add_row(*row)
    return table


# --------------------------------------------------------------------------- interleaved rounds


def interleaved(order: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The order of each round: every variant once, the first one rotating from round to round.

    Example:
        >>> list(interleaved("abc", 4))
        [['a', 'b', 'c'], ['b', 'c', 'a'], ['c', 'a', 'b'], ['a', 'b', 'c']]
    """
    order = list(order)
    for r in range(rounds):
        k = r % len(order)
        yield order[k:] + order[:k]


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """``t / t_ref`` round by round: both timed in the same round, so slow drifts of the load cancel."""
    return [t / t_ref for t, t_ref in zip(times, reference)]


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """Q1, median, Q3 (inclusive method); one value is its own quartiles."""
    if len(values) > 1:
        q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q1, q2, q3
    return values[0], values[0], values[0]


# --------------------------------------------------------------------------- models


def masked_copy(model: Any, mask: dict[str, Any]) -> Any:
    """A deep copy of the plain model with each masked weight multiplied by its mask (no surgery)."""
    import torch

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in mask.items():
            weight = reference.get_parameter(name)
            weight.mul_(keep.to(weight.dtype))
    return reference


def processor() -> str:
    """The processor as the platform names it (``x86_64`` where it says no more)."""
    return platform.processor() or platform.machine()
