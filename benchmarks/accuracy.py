"""Accuracy: the default protocol (masks only) against the ToST recipe, same mask, init and seed.

CIFAR networks (``--arch``: ResNet-20 by default; ResNet-32, VGG-16, MobileNetV2 and PreAct
ResNet-18, the last three narrowed to fit a CPU, see ``cifar.ARCHITECTURES``) on the CIFAR-10
subset (``../shared/data/cifar10-subset.npz``): trains on a seeded 90% split of ``x_train``,
reports on ``x_test`` (``--eval-on test``, the reported grid) or on the held-out 10% of
``x_train`` (``--eval-on val``, for choosing the recipe's settings). The report has one
section per architecture and the pairs of all of them pooled.

A run is (arch, mask, sparsity, seed, epochs, eval split) and the Recipe it trains with: the
variant (``baseline``, ``tost``, ``no_skips``...) and ``--set`` overrides only name that Recipe,
so a run is identified by its resolved Recipe. Two names of one Recipe share one run, and a
changed ``Recipe.tost`` default leaves the old ``tost`` records stale (kept, not reported)
instead of mixing them in. Each finished run is appended as one JSON line to
``<out>/accuracy.jsonl``; runs already there are skipped, so the grid resumes where it stopped,
and several invocations can share it (a run in progress is claimed with a lock file). The mask
and the initial weights depend only on (arch, mask, sparsity, seed): both protocols of a seed
start from the same masked network and see the same batches.

    python benchmarks/accuracy.py --grid main --masks erk --sparsities 0.98 --seeds 0 1 2 --threads 1
    python benchmarks/accuracy.py --grid main --arch resnet32 vgg16_x0.5 --sparsities 0.98 --seeds 0
    python benchmarks/accuracy.py --grid ablation --jobs 2            # each technique alone / all but one, 0.98
    python benchmarks/accuracy.py --grid main --device cuda --jobs 4  # on a GPU
    python benchmarks/accuracy.py --eval-on val --variants tost --set warmup=0.6   # tuning (never on test)
    python benchmarks/accuracy.py --variants baseline --sparse-kernels on   # kernels on vs the dense runs
    python benchmarks/accuracy.py --report                             # tables + plot from the jsonl only

This file plans the grid and runs it (one worker per run); ``accuracy_keys.py`` says what a run
is and reads the jsonl, and ``accuracy_report.py`` builds the report from the jsonl alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import cifar  # noqa: E402
from _common import RESULTS, cpu_model, git_state, library_fingerprint  # noqa: E402
from accuracy_keys import (  # noqa: E402, F401 - RECIPE_DEFAULTS, labels_of, record_id: re-exported for tests
    ABLATION_SPARSITY,
    ABLATION_VARIANTS,
    EXTRA_MASKS,
    MAIN_VARIANTS,
    MASKS,
    RECIPE_DEFAULTS,
    SEEDS,
    SPARSITIES,
    VARIANTS,
    RunKey,
    labels_of,
    read_results,
    recipe_for,
    record_id,
)
from accuracy_report import write_report  # noqa: E402

import tost_surgery as tost  # noqa: E402

DEFAULT_OUT = RESULTS
SNIP_BATCHES = 2
"""SNIP scores on this many (unaugmented) training batches of 128, in the seed's order."""
GRADINIT_STEPS = 100
"""Steps of :func:`tost_surgery.init.gradinit` for ``rescale_rule="gradinit"`` (its default)."""
GRADINIT_BATCHES = 24
"""Unaugmented training batches of 128 it reads, in the seed's order (3 per step, reused in turn)."""
CODE_PATHS = ("tost_surgery", "benchmarks/accuracy.py", "benchmarks/accuracy_keys.py", "benchmarks/cifar.py")
"""What decides a run's result besides its key: a record lists those that differ from its commit."""


# --------------------------------------------------------------------------- one run


def seeded_batches(x: torch.Tensor, y: torch.Tensor, seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of 128 (fewer if the split is smaller) in the seed's order, unaugmented."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
    return [(x[order[i : i + 128]], y[order[i : i + 128]]) for i in range(0, min(count * 128, len(y)), 128)]


def make_mask(model: torch.nn.Module, method: str, sparsity: float, seed: int, data: cifar.CifarData):
    """The mask of (method, sparsity, seed), always computed on the CPU (same mask on any device)."""
    if method == "erk":
        return tost.masks.erk(model, sparsity, seed=seed)
    if method == "random":
        return tost.masks.random(model, sparsity, seed=seed)
    if method == "snip":
        x, y = data.x_train.cpu(), data.y_train.cpu()
        return tost.masks.snip(model, sparsity, seeded_batches(x, y, seed, SNIP_BATCHES))
    if method == "synflow":
        return tost.masks.synflow(model, sparsity, input_shape=tuple(data.x_train.shape[1:]))
    raise ValueError(f"unknown mask {method!r}; choose from {list(MASKS + EXTRA_MASKS)}")


def _sha(tensors: Iterator[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _seeded_start(key: RunKey, data: cifar.CifarData) -> tuple[torch.nn.Module, dict, dict[str, str]]:
    """The seeded network and its mask, both made on the CPU, and their fingerprints."""
    torch.manual_seed(key.seed)
    model = cifar.ARCHITECTURES[key.arch]()
    init_sha = _sha(iter(model.state_dict().values()))
    mask = make_mask(model, key.mask, key.sparsity, key.seed, data)
    return model, mask, {"mask_sha": _sha(mask[name] for name in sorted(mask)), "init_sha": init_sha}


def _to_device(model: torch.nn.Module, mask: dict, data: cifar.CifarData, device: str) -> tuple[dict, cifar.CifarData]:
    if device == "cpu":
        return mask, data
    model.to(device)
    data = cifar.CifarData(*(getattr(data, f).to(device) for f in cifar.CifarData.__dataclass_fields__))
    return {name: m.to(device) for name, m in mask.items()}, data


def _prepare(model: torch.nn.Module, mask: dict, recipe: tost.Recipe, data: cifar.CifarData, key: RunKey) -> dict:
    """``tost.prepare`` (with the key's sparse kernels), then GradInit where the recipe asks; their times and
    GradInit's report."""
    seed = key.seed
    start = time.perf_counter()
    tost.prepare(model, mask, recipe, **key.prepare_kwargs())
    timings: dict[str, Any] = {"prepare_s": round(time.perf_counter() - start, 3)}
    if recipe.rescale_init and recipe.rescale_rule == "gradinit":  # a learned scale per layer, before training
        start = time.perf_counter()
        batches = seeded_batches(data.x_train, data.y_train, seed, GRADINIT_BATCHES)
        report = tost.init.gradinit(model, batches, steps=GRADINIT_STEPS)
        timings.update(gradinit=report.to_dict(), gradinit_s=round(time.perf_counter() - start, 2))
    return timings


def _train(model: torch.nn.Module, data: cifar.CifarData, config: cifar.TrainConfig, key: RunKey, log) -> tuple:
    """Train with the recipe's label smoothing and schedule; the history and the seconds it took."""

    def on_epoch(e: cifar.EpochLog) -> None:
        log(
            f"  {key.label()}: epoch {e.epoch}/{key.epochs} loss {e.loss:.4f}"
            f" train acc {e.accuracy:.4f} ({e.seconds:.1f} s)"
        )

    start = time.perf_counter()
    history = cifar.train(
        model,
        data,
        config,
        key.seed,
        label_smoothing=lambda: tost.label_smoothing(model),
        after_optimizer=lambda optimizer: tost.bind(model, optimizer),
        on_epoch=on_epoch,
    )
    return history, round(time.perf_counter() - start, 2)


def _evaluation(model: torch.nn.Module, mask: dict, data: cifar.CifarData, key: RunKey, history: list) -> dict:
    """The finalized model's accuracies, its last epoch, and the masked weights that are not zero."""
    return {
        "val_acc": cifar.evaluate(model, *data.eval_split("val")),
        "test_acc": cifar.evaluate(model, *data.eval_split("test")) if key.eval == "test" else None,
        "train_loss": history[-1].loss,
        "train_acc": history[-1].accuracy,
        "epoch_s": [round(e.seconds, 2) for e in history],
        "masked_nonzero": sum(int((model.get_parameter(n)[~m.bool()] != 0).sum()) for n, m in mask.items()),
    }


def run_one(key: RunKey, data_path: str, device: str, threads: int, log=print) -> dict[str, Any]:
    """Train one run and return its record (what goes in the jsonl)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    data = cifar.load_cifar(data_path, val_split=key.val_split, subset=key.subset, device="cpu")
    config = cifar.TrainConfig(epochs=key.epochs)
    total_steps = config.total_steps(len(data.y_train))
    recipe = recipe_for(key.variant, total_steps, dict(key.overrides))
    model, mask, shas = _seeded_start(key, data)
    mask, data = _to_device(model, mask, data, device)
    timings = _prepare(model, mask, recipe, data, key)
    history, train_s = _train(model, data, config, key, log)
    kernels = tost.status(model).sparse_kernels  # the per-layer choices, before finalize drops them
    tost.finalize(model)  # evaluate the plain sparse model the user gets
    return {
        "key": key.to_dict(),
        "id": key.id,
        **_evaluation(model, mask, data, key, history),
        "wall_s": round(time.perf_counter() - started, 2),
        "train_s": train_s,
        **timings,
        "steps": total_steps,
        "kept": int(sum(int(m.sum()) for m in mask.values())),
        "total": int(sum(m.numel() for m in mask.values())),
        **shas,
        "recipe": recipe.to_dict(),
        **({"kernel_choices": kernels} if kernels else {}),
        **machine(device, threads),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


LIBRARY_SHA = library_fingerprint()
"""The library's sources as this process imported them (others edit the tree concurrently)."""
_MACHINE: dict[str, Any] = {}


def machine(device: str, threads: int) -> dict[str, Any]:
    """Where and with what a run ran: device, threads, versions, commit (and whether the code was edited)."""
    if not _MACHINE:
        _MACHINE.update(
            host=socket.gethostname(),
            cpu=_cpu_name(),
            torch=torch.__version__,
            python=platform.python_version(),
            library_sha=LIBRARY_SHA,
            **git_state(CODE_PATHS),
        )
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "threads": threads, **_MACHINE}


def _cpu_name() -> str:
    name = cpu_model(default="")
    return f"{name} ({os.cpu_count()} cores visible)" if name else platform.processor() or "unknown"


# --------------------------------------------------------------------------- results file


def done_ids(path: Path) -> set[str]:
    return {record_id(r) for r in read_results(path)}


def append_result(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def claimed(out: Path, key: RunKey) -> Iterator[bool]:
    """Hold a lock on ``run-<id>.tmp`` while a run trains; False when another process holds it."""
    lock_path = out / f"run-{key.id}.tmp"
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.write(f"{os.getpid()} {key.label()}\n")
            handle.flush()
            yield True
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker(key_dict: dict[str, Any], out: str, data_path: str, device: str, threads: int) -> str:
    """Run one key unless it is done or claimed; append its record. Returns what happened."""
    key = RunKey.from_dict(key_dict)
    out_dir = Path(out)
    jsonl = out_dir / "accuracy.jsonl"
    with claimed(out_dir, key) as mine:
        if not mine:
            return f"skipped (running elsewhere): {key.label()}"
        if key.id in done_ids(jsonl):
            return f"skipped (done): {key.label()}"

        def log(message: str) -> None:
            print(message, flush=True)

        record = run_one(key, data_path, device, threads, log=log)
        append_result(jsonl, record)
    acc = record["test_acc"] if key.eval == "test" else record["val_acc"]
    return f"done in {record['wall_s']:.0f} s: {key.label()} -> {key.eval} acc {acc:.4f}"


# --------------------------------------------------------------------------- grid


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``["warmup=0.6", "soft_activation=mish"]`` -> sorted ``(field, value)`` pairs, checked against Recipe."""
    known = {f for f in tost.Recipe.__dataclass_fields__}
    pairs = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in known or name == "total_steps":
            raise SystemExit(
                f"--set takes FIELD=VALUE with FIELD a Recipe setting, found {item!r}; fields: {sorted(known)}"
            )
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = {"True": True, "False": False, "None": None}.get(text, text)
        pairs[name] = value
    return tuple(sorted(pairs.items()))


def _variants(args: argparse.Namespace) -> list[str]:
    """The variants asked for: ``--variants``, else those of the grid."""
    if args.variants:
        return list(args.variants)
    variants: list[str] = []
    if args.grid in ("main", "all"):
        variants += MAIN_VARIANTS
    if args.grid in ("ablation", "all"):
        variants += [v for v in ABLATION_VARIANTS if v not in variants]
    return variants


def plan(args: argparse.Namespace) -> list[RunKey]:
    """The runs asked for, in order: sparsity (as given), architecture, mask, seed, variant."""
    overrides = parse_overrides(args.set)
    grid = itertools.product(args.sparsities, args.arch or ["resnet20"], args.masks, args.seeds, _variants(args))
    keys = []
    for sparsity, arch, mask, seed, variant in grid:
        if variant in ABLATION_VARIANTS and not args.variants and not math.isclose(sparsity, ABLATION_SPARSITY):
            continue  # the ablation grid has one sparsity
        keys.append(
            RunKey(
                arch=arch,
                mask=mask,
                sparsity=sparsity,
                seed=seed,
                variant=variant,
                epochs=args.epochs,
                eval=args.eval_on,
                val_split=args.val_split,
                subset=args.subset,
                overrides=overrides,
                kernels=args.sparse_kernels + ("+native" if args.native_kernels else ""),
            )
        )
    return keys


def _failure(job: tuple, error: BaseException) -> str:
    detail = "".join(traceback.format_exception(error)).rstrip()
    return f"FAILED (not recorded; retried next time): {RunKey.from_dict(job[0]).label()}\n{detail}"


def _outcomes_here(jobs: list[tuple]) -> Iterator[tuple[str, bool]]:
    """(message, failed) of each job, run one after the other in this process."""
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {RunKey.from_dict(job[0]).label()}", flush=True)
        try:
            outcome = worker(*job), False
        except Exception as error:  # noqa: BLE001 - one bad run must not stop the grid
            outcome = _failure(job, error), True
        yield outcome


def _outcomes_in_pool(jobs: list[tuple], processes: int) -> Iterator[tuple[str, bool]]:
    """(message, failed) of each job as it ends, run in spawned worker processes."""
    with cf.ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(worker, *job): job for job in jobs}
        for future in cf.as_completed(futures):
            try:
                outcome = future.result(), False
            except Exception as error:  # noqa: BLE001
                outcome = _failure(futures[future], error), True
            yield outcome


def run_grid(args: argparse.Namespace) -> int:
    """Run the planned runs not in the jsonl yet; rewrite the whole report after each."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "accuracy.jsonl"
    keys = plan(args)
    done = done_ids(jsonl)
    todo = [k for k in keys if k.id not in done][: args.limit]
    print(
        f"{len(keys)} runs planned, {sum(k.id in done for k in keys)} done, "
        f"{len(todo)} to run now on {args.device} ({args.jobs} job(s) x {args.threads} thread(s)); results: {jsonl}",
        flush=True,
    )
    if args.dry_run:
        for key in keys:
            print(f"  {'done ' if key.id in done else 'todo '} {key.id} {key.label()}")
        return 0
    started = time.perf_counter()
    # The files written between runs are the whole report, the one ``--report`` writes, whatever subset this grid runs.
    whole = {"arch": None, "masks": list(MASKS), "sparsities": list(SPARSITIES)}
    report_args = argparse.Namespace(**{**vars(args), **whole})
    jobs = [(k.to_dict(), str(out), str(args.data), args.device, args.threads) for k in todo]
    outcomes = _outcomes_here(jobs) if args.jobs <= 1 else _outcomes_in_pool(jobs, args.jobs)
    failed = 0
    for i, (message, has_failed) in enumerate(outcomes, 1):
        failed += has_failed
        print(f"[{i}/{len(jobs)}] {message}", flush=True)
        write_report(out, report_args)
    print(f"finished {len(jobs)} run(s), {failed} failed, in {time.perf_counter() - started:.0f} s", flush=True)
    write_report(out, report_args)
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--grid", choices=("main", "ablation", "all"), default="main")
    add("--variants", nargs="+", choices=VARIANTS, help="run these variants instead of the grid's")
    add("--masks", nargs="+", choices=MASKS + EXTRA_MASKS, default=list(MASKS))
    add("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    add("--seeds", nargs="+", type=int, default=list(SEEDS))
    add("--arch", nargs="+", choices=list(cifar.ARCHITECTURES), default=None,
        help="architectures to run (default resnet20) or to report (default: every one with a record)")  # fmt: skip
    add("--epochs", type=int, default=20)
    add("--eval-on", choices=("test", "val"), default="test", help="test: the reported grid; val: tuning")
    add("--val-split", type=float, default=0.1, help="fraction of x_train held out (seeded, fixed)")
    add("--subset", type=int, default=None, help="use only this many images per split (smoke runs)")
    add("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Recipe overrides, part of the key")
    add("--sparse-kernels", choices=("off", "auto", "on"), default="off",
        help="prepare(sparse_kernels=...): train through the sparse kernels once scaffolding retires (part of the key)")
    add("--native-kernels", action="store_true", help="with --sparse-kernels: the compiled kernels too")
    add("--jobs", type=int, default=1, help="parallel worker processes")
    add("--threads", type=int, default=1, help="torch threads per worker")
    add("--device", default="cpu", help="cpu or cuda")
    add("--limit", type=int, default=None, help="run at most this many runs now")
    add("--dry-run", action="store_true", help="list the planned runs and which are done")
    add("--report", action="store_true", help="only regenerate accuracy.md/.json/.png from the jsonl")
    add("--out", default=str(DEFAULT_OUT), help="results directory")
    add("--data", default=str(cifar.DEFAULT_DATA), help="path of cifar10-subset.npz")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = write_report(out, args)
        print((out / "accuracy.md").read_text())
        print(f"wrote {out / 'accuracy.md'}, accuracy.json, accuracy.png ({report['budget']['runs']} runs)")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.native_kernels and args.sparse_kernels == "off":
        parser.error("--native-kernels needs --sparse-kernels auto or on")
    if not Path(args.data).is_file():
        parser.error(f"data file not found: {args.data} (the CIFAR-10 subset lives in ../shared/data/)")
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
