"""Coverage sweep: the ToST round trip on every torchvision and timm classification model.

For each model, in its own process (one thread, a wall-time limit; forked from a server that
imported torch, torchvision and timm once, so a model costs no start-up), this script builds the
model (no pretrained weights), picks an input (batch 2; 64x64 when the model accepts it; a timm
model with a fixed input size is built with ``img_size=64`` where it takes that, else it runs
at its own size), makes an ERK mask at 90% sparsity, and then:

* ``tost.prepare(model, mask, Recipe.tost(**SWEEP_RECIPE))`` (timed; every conv site gets a ghost
  skip with the paper's 1x1 conv + BatchNorm branch, 1x1 convs included);
* two SGD steps (lr 1e-3, label-smoothed cross-entropy) with ``tost.bind``, then
  ``tost.step(model, 2)`` to reach the end of the schedule;
* checks (a) same object and class, (b) masked effective weights exactly zero, (c) the prepared
  model's eval output equals the finalized model's, (d) after ``finalize``: the original
  ``state_dict`` keys in order, no parametrizations, no ``tost`` attribute, no instance
  ``forward``, and the original forward runs (twice: caches filled by the first call are read
  by the second);
* (e) a separate fresh build prepared with ``Recipe.baseline()`` gives, in eval mode, the eval
  output of a by-hand masked copy (skipped above 100M parameters).

Rows are appended one at a time to ``benchmarks/results/coverage.csv`` (models already there are
skipped, so an interrupted sweep resumes), and ``benchmarks/COVERAGE.md`` is regenerated from it.

Usage::

    .venv/bin/python benchmarks/coverage.py                       # everything (hours)
    .venv/bin/python benchmarks/coverage.py --only resnet18 timm:vit_tiny_patch16_224
    .venv/bin/python benchmarks/coverage.py --source tv --limit 10 --jobs 2
    .venv/bin/python benchmarks/coverage.py --report              # Markdown from the CSV only

A bare name in ``--only`` selects it in every source that has it; ``tv:NAME`` / ``timm:NAME``
pick one. ``--retry`` re-runs the selected models even when they already have a row (the old
row is dropped).

This file is the command line; ``coverage_driver.py`` runs the models (one process each) and
writes the CSV, ``coverage_worker.py`` is one model's run and checks, and ``coverage_report.py``
renders the Markdown from the CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from _common import RESULTS  # noqa: E402
from coverage_checks import restore_buffers  # noqa: E402, F401 - re-exported: tests load this file alone
from coverage_driver import Driver  # noqa: E402
from coverage_report import write_report  # noqa: E402
from coverage_worker import Worker, list_models, listed_counts, worker_main  # noqa: E402, F401

DEFAULT_CSV_DIR = RESULTS
DEFAULT_MD = RESULTS.parent / "COVERAGE.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", metavar="NAME", help="models to run: NAME, tv:NAME or timm:NAME")
    p.add_argument("--source", choices=("tv", "timm", "all"), default="all")
    p.add_argument("--limit", type=int, help="run at most N models not yet in the CSV")
    p.add_argument("--jobs", type=int, default=1, help="parallel model processes (default 1)")
    p.add_argument("--timeout", type=float, default=240.0, help="wall-time limit per model, seconds (default 240)")
    p.add_argument("--max-params", type=float, default=6e8, help="skip (not buildable) models above this; every "
                   "model above 600M that the first sweep built ran out of 12 GiB or out of time")  # fmt: skip
    p.add_argument("--max-mem-gb", type=float, default=12.0, help="memory per model process, GiB (0: no limit)")
    p.add_argument("--order", choices=("mixed", "name"), default="mixed", help="run order (mixed: stable shuffle)")
    p.add_argument("--reverse", action="store_true", help="run in reverse order (a second driver on the same CSV "
                   "meets the first in the middle; models another driver holds are skipped)")  # fmt: skip
    p.add_argument("--retry", action="store_true", help="re-run selected models that already have a row")
    p.add_argument("--report", action="store_true", help="only regenerate the Markdown from the CSV")
    p.add_argument("--out", type=Path, help="directory for coverage.csv and COVERAGE.md (default: benchmarks/results "
                   "for the CSV, benchmarks/COVERAGE.md)")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out, args.markdown = DEFAULT_CSV_DIR, DEFAULT_MD
    else:
        args.markdown = args.out / "COVERAGE.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "coverage.csv"
    if args.report:
        for source in ("tv", "timm"):
            list_models(source)  # for the "N of M run so far" counts
        write_report(csv_path, args.markdown, args.max_params, listed_counts())
        return
    driver = Driver(args)
    driver.sweep()
    write_report(csv_path, args.markdown, args.max_params, listed_counts())
    if driver.unknown:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
