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
    python benchmarks/accuracy.py --report                             # tables + plot from the jsonl only
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar  # noqa: E402  (benchmarks/ is not a package)

import tost_surgery as tost  # noqa: E402

ROOT = cifar.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "results"
MASKS = ("erk", "snip", "synflow")
EXTRA_MASKS = ("random",)
SPARSITIES = (0.9, 0.95, 0.98)
SEEDS = (0, 1, 2)
ABLATION_SPARSITY = 0.98
MAIN_VARIANTS = ("baseline", "tost")
TECHNIQUES = {t.name: dict(t.off) for t in tost.Recipe.techniques()}
"""technique -> the Recipe fields that turn it off (the library's table of techniques)."""
ABLATION_VARIANTS = tuple(f"only_{t}" for t in TECHNIQUES) + tuple(f"no_{t}" for t in TECHNIQUES)
VARIANTS = MAIN_VARIANTS + ABLATION_VARIANTS
SNIP_BATCHES = 2
"""SNIP scores on this many (unaugmented) training batches of 128, in the seed's order."""
GRADINIT_STEPS = 100
"""Steps of :func:`tost_surgery.init.gradinit` for ``rescale_rule="gradinit"`` (its default)."""
GRADINIT_BATCHES = 24
"""Unaugmented training batches of 128 it reads, in the seed's order (3 per step, reused in turn)."""


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunKey:
    """Everything that decides a run's result (besides the code and the machine)."""

    arch: str
    mask: str
    sparsity: float
    seed: int
    variant: str
    epochs: int
    eval: str
    val_split: float = 0.1
    subset: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overrides"] = dict(self.overrides)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunKey:
        data = dict(data)
        data["overrides"] = tuple(sorted(data.get("overrides", {}).items()))
        return cls(**data)

    def protocol(self) -> dict[str, Any]:
        """The key without the Recipe's names (variant, overrides)."""
        data = self.to_dict()
        del data["variant"], data["overrides"]
        return data

    def recipe(self) -> dict[str, Any]:
        """The resolved Recipe fields (``total_steps`` left out: it follows from the protocol)."""
        return recipe_fields(recipe_for(self.variant, 1, dict(self.overrides)).to_dict())

    @property
    def id(self) -> str:
        return content_id(self.protocol(), self.recipe())

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.overrides)
        return f"{self.arch} {self.mask} s={self.sparsity} seed={self.seed} {self.variant}{extra} ({self.eval})"


RECIPE_DEFAULTS = {f.name: f.default for f in fields(tost.Recipe) if f.default is not MISSING}
BEFORE_ADDED = {"skip_pointwise": True}
"""What a field added to Recipe later was, in effect, before it existed (when it differs from today's default)."""
SETTINGS_OF = {t.switch: t.settings for t in tost.Recipe.techniques()}
"""switch -> the fields that only matter while it is on (label smoothing's schedule, while it is above 0)."""


def recipe_fields(recipe: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide a run, in canonical form: without ``total_steps``, without the
    settings of a technique that is off, and with fields a record predates filled in as they
    behaved then."""
    filled = {**RECIPE_DEFAULTS, **BEFORE_ADDED, **recipe}
    filled.pop("total_steps", None)
    for switch, settings in SETTINGS_OF.items():
        if not filled[switch]:
            for name in settings:
                filled.pop(name)
    return filled


def content_id(protocol: dict[str, Any], recipe: dict[str, Any]) -> str:
    text = json.dumps({"protocol": protocol, "recipe": recipe}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def record_id(record: dict[str, Any]) -> str:
    """The id of the run a record holds, from the Recipe it actually trained with."""
    return content_id(RunKey.from_dict(record["key"]).protocol(), recipe_fields(record["recipe"]))


def labels_of(record: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (variant, overrides JSON) whose Recipe is, with today's defaults, the one the record used.

    A record whose own name means another Recipe today (a default changed since) is labelled by its
    variant and the overrides that give back the Recipe it used, e.g. ``tost`` with
    ``{"skip_pointwise": true}``.
    """
    used = recipe_fields(record["recipe"])
    key = record["key"]
    labels = [(v, "{}") for v in VARIANTS if recipe_fields(recipe_for(v, 1, {}).to_dict()) == used]
    # Overrides a default has since caught up with name nothing: ``--set skip_branch=auto`` is ``tost`` today.
    plain = recipe_for(key["variant"], 1, {}).to_dict()
    needed = {k: v for k, v in key["overrides"].items() if plain.get(k) != v}
    own = (key["variant"], json.dumps(needed, sort_keys=True))
    if own not in labels and recipe_fields(recipe_for(own[0], 1, key["overrides"]).to_dict()) == used:
        labels.append(own)
    if not labels:
        now = recipe_fields(recipe_for(key["variant"], 1, key["overrides"]).to_dict())
        diff = {**key["overrides"], **{k: v for k, v in used.items() if now.get(k) != v}}
        if recipe_fields(recipe_for(key["variant"], 1, diff).to_dict()) == used:
            labels.append((key["variant"], json.dumps(diff, sort_keys=True)))
    return labels


def recipe_for(variant: str, total_steps: int, overrides: dict[str, Any]) -> tost.Recipe:
    """The Recipe of a variant: ``baseline``, ``tost``, ``only_<technique>`` or ``no_<technique>``.

    Ablations start from ``Recipe.tost`` so each technique keeps the recipe's settings;
    ``overrides`` (from ``--set``) apply last.
    """
    if variant == "baseline":
        return tost.Recipe.baseline(**overrides)
    if variant == "tost":
        return tost.Recipe.tost(total_steps, **overrides)
    kind, _, technique = variant.partition("_")
    if technique not in TECHNIQUES or kind not in ("only", "no"):
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    off: dict[str, Any] = {}
    for name, switched_off in TECHNIQUES.items():
        if (kind == "no") == (name == technique):
            off.update(switched_off)
    return tost.Recipe.tost(total_steps, **{**off, **overrides})


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


def run_one(key: RunKey, data_path: str, device: str, threads: int, log=print) -> dict[str, Any]:
    """Train one run and return its record (what goes in the jsonl)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    data = cifar.load_cifar(data_path, val_split=key.val_split, subset=key.subset, device="cpu")
    config = cifar.TrainConfig(epochs=key.epochs)
    total_steps = config.total_steps(len(data.y_train))
    recipe = recipe_for(key.variant, total_steps, dict(key.overrides))

    torch.manual_seed(key.seed)
    model = cifar.ARCHITECTURES[key.arch]()
    init_sha = _sha(iter(model.state_dict().values()))
    mask = make_mask(model, key.mask, key.sparsity, key.seed, data)
    mask_sha = _sha(mask[name] for name in sorted(mask))
    if device != "cpu":
        data = cifar.CifarData(*(getattr(data, f).to(device) for f in cifar.CifarData.__dataclass_fields__))
        model.to(device)
        mask = {name: m.to(device) for name, m in mask.items()}
    prepare_start = time.perf_counter()
    tost.prepare(model, mask, recipe)
    prepare_s = time.perf_counter() - prepare_start
    gradinit: dict[str, Any] = {}
    if recipe.rescale_init and recipe.rescale_rule == "gradinit":  # a learned scale per layer, before training
        gradinit_start = time.perf_counter()
        batches = seeded_batches(data.x_train, data.y_train, key.seed, GRADINIT_BATCHES)
        report = tost.init.gradinit(model, batches, steps=GRADINIT_STEPS)
        gradinit = {"gradinit": report.to_dict(), "gradinit_s": round(time.perf_counter() - gradinit_start, 2)}

    def on_epoch(e: cifar.EpochLog) -> None:
        log(
            f"  {key.label()}: epoch {e.epoch}/{key.epochs} loss {e.loss:.4f}"
            f" train acc {e.accuracy:.4f} ({e.seconds:.1f} s)"
        )

    train_start = time.perf_counter()
    history = cifar.train(
        model,
        data,
        config,
        key.seed,
        label_smoothing=lambda: tost.label_smoothing(model),
        after_optimizer=lambda optimizer: tost.bind(model, optimizer),
        on_epoch=on_epoch,
    )
    train_s = time.perf_counter() - train_start
    tost.finalize(model)  # evaluate the plain sparse model the user gets
    masked_nonzero = sum(int((model.get_parameter(n)[~m.bool()] != 0).sum()) for n, m in mask.items())
    x_eval, y_eval = data.eval_split("val")
    record: dict[str, Any] = {
        "key": key.to_dict(),
        "id": key.id,
        "val_acc": cifar.evaluate(model, x_eval, y_eval),
        "test_acc": cifar.evaluate(model, *data.eval_split("test")) if key.eval == "test" else None,
        "train_loss": history[-1].loss,
        "train_acc": history[-1].accuracy,
        "epoch_s": [round(e.seconds, 2) for e in history],
        "wall_s": round(time.perf_counter() - started, 2),
        "train_s": round(train_s, 2),
        "prepare_s": round(prepare_s, 3),
        **gradinit,
        "steps": total_steps,
        "kept": int(sum(int(m.sum()) for m in mask.values())),
        "total": int(sum(m.numel() for m in mask.values())),
        "masked_nonzero": masked_nonzero,
        "mask_sha": mask_sha,
        "init_sha": init_sha,
        "recipe": recipe.to_dict(),
        **machine(device, threads),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return record


def library_fingerprint() -> str:
    """sha256 of the library's sources as this process imported them (others edit the tree concurrently)."""
    digest = hashlib.sha256()
    package = Path(tost.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


LIBRARY_SHA = library_fingerprint()
_MACHINE: dict[str, Any] = {}


def machine(device: str, threads: int) -> dict[str, Any]:
    """Where and with what a run ran: device, threads, versions, commit (and whether the library was edited)."""
    if not _MACHINE:
        _MACHINE.update(
            host=socket.gethostname(),
            cpu=_cpu_name(),
            torch=torch.__version__,
            python=platform.python_version(),
            library_sha=LIBRARY_SHA,
            **git_state(),
        )
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "threads": threads, **_MACHINE}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores visible)"
    return platform.processor() or "unknown"


def git_state() -> dict[str, Any]:
    """The commit, and the library / benchmark files that differ from it (read-only git calls)."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        return result.stdout if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "tost_surgery", "benchmarks/accuracy.py", "benchmarks/cifar.py")
    return {
        "commit": git("rev-parse", "HEAD").strip()[:12] or None,
        "changed": [line[3:] for line in changed.splitlines() if line.strip()],
    }


# --------------------------------------------------------------------------- results file


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of the jsonl; a torn last line (a run killed mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and "key" in record:
                records.append(record)
    return records


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


def plan(args: argparse.Namespace) -> list[RunKey]:
    """The runs asked for, in order: sparsity (as given), architecture, mask, seed, variant."""
    overrides = parse_overrides(args.set)
    variants: list[str] = []
    if args.variants:
        variants = list(args.variants)
    else:
        if args.grid in ("main", "all"):
            variants += MAIN_VARIANTS
        if args.grid in ("ablation", "all"):
            variants += [v for v in ABLATION_VARIANTS if v not in variants]
    keys = []
    for sparsity in args.sparsities:
        for arch in args.arch or ["resnet20"]:
            for mask in args.masks:
                for seed in args.seeds:
                    for variant in variants:
                        if (
                            variant in ABLATION_VARIANTS
                            and not args.variants
                            and not math.isclose(sparsity, ABLATION_SPARSITY)
                        ):
                            continue
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
                            )
                        )
    return keys


def run_grid(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "accuracy.jsonl"
    keys = plan(args)
    done = done_ids(jsonl)
    todo = [k for k in keys if k.id not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    print(
        f"{len(keys)} runs planned, {len(keys) - len([k for k in keys if k.id not in done])} done, "
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
    failed = 0

    def failure(job: tuple, error: BaseException) -> str:
        nonlocal failed
        failed += 1
        detail = "".join(traceback.format_exception(error)).rstrip()
        return f"FAILED (not recorded; retried next time): {RunKey.from_dict(job[0]).label()}\n{detail}"

    if args.jobs <= 1:
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {RunKey.from_dict(job[0]).label()}", flush=True)
            try:
                message = worker(*job)
            except Exception as error:  # noqa: BLE001 - one bad run must not stop the grid
                message = failure(job, error)
            print(f"[{i}/{len(jobs)}] {message}", flush=True)
            write_report(out, report_args)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(worker, *job): job for job in jobs}
            for i, future in enumerate(cf.as_completed(futures), 1):
                try:
                    message = future.result()
                except Exception as error:  # noqa: BLE001
                    message = failure(futures[future], error)
                print(f"[{i}/{len(jobs)}] {message}", flush=True)
                write_report(out, report_args)
    print(f"finished {len(jobs)} run(s), {failed} failed, in {time.perf_counter() - started:.0f} s", flush=True)
    write_report(out, report_args)
    return 0


# --------------------------------------------------------------------------- report


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pct(mean: float | None, std: float | None, n: int, *, signed: bool = False) -> str:
    if mean is None:
        return "pending"
    sign = "+" if signed else ""
    text = f"{100 * mean:{sign}.2f}"
    text += f" ± {100 * std:.2f}" if std is not None else " ± n/a"
    return text


def _select(
    records: list[dict[str, Any]], args: argparse.Namespace, arch: str, **fixed: Any
) -> dict[tuple, dict[str, Any]]:
    """Latest record of ``arch`` per (mask, sparsity, seed, variant, overrides) matching the report's protocol.

    A record counts under every variant name whose Recipe it trained with (see :func:`labels_of`).
    """
    chosen: dict[tuple, dict[str, Any]] = {}
    for record in records:
        key = record["key"]
        if (
            key["arch"] != arch
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


def _cell(chosen: dict[tuple, dict], mask: str, sparsity: float, variant: str, metric: str, overrides: str = "{}"):
    by_seed = {
        k[2]: r[metric]
        for k, r in chosen.items()
        if k[0] == mask and k[1] == round(sparsity, 6) and k[3] == variant and k[4] == overrides
    }
    return by_seed


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


def _candidates(val: dict[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tuned ToST setting against today's ``Recipe.tost``, on validation, pooled over masks.

    Differences are paired by (mask, seed): same mask, initial weights and batches. This is the
    table a default is changed from (never ``x_test``).
    """
    rows = []
    settings = sorted({(k[1], k[4]) for k in val if k[3] == "tost" and k[4] != "{}"})
    for sparsity, overrides in settings:
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
        rows.append(
            {
                "sparsity": sparsity,
                "overrides": json.loads(overrides),
                "masks": sorted(mask_diffs),
                "pairs": len(diffs),
                "vs_tost": dict(zip(("mean", "std"), _mean_std(diffs))),
                "vs_tost_per_mask": {mask: statistics.fmean(d) for mask, d in sorted(mask_diffs.items())},
                "vs_baseline": dict(zip(("mean", "std"), _mean_std(gains))),
                "verdict": _verdict(diffs),
            }
        )
    return rows


def _arch_order(records: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The architectures to report: those asked for, else every one with a record, in ``ARCHITECTURES`` order."""
    if args.arch:
        return list(args.arch)
    seen = {r["key"]["arch"] for r in records}
    return [a for a in cifar.ARCHITECTURES if a in seen] + sorted(seen - set(cifar.ARCHITECTURES))


def _pooled(rows: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """The masks of ``main`` rows with a pair, and every (mask, seed) gain of them."""
    rows = [r for r in rows if r["paired"]]
    gains = [
        r["per_seed"]["tost"][seed] - r["per_seed"]["baseline"][seed]
        for r in rows
        for seed in sorted(set(r["per_seed"]["tost"]) & set(r["per_seed"]["baseline"]))
    ]
    return [r["mask"] for r in rows], gains


def build_arch_report(records: list[dict[str, Any]], arch: str, args: argparse.Namespace) -> dict[str, Any]:
    """One architecture's tables: main grid, pooled over masks, ablation, validation, tuned settings."""
    test = _select(records, args, arch, eval="test")
    report: dict[str, Any] = {
        "protocol": {
            "arch": arch,
            "description": cifar.DESCRIPTIONS.get(arch, arch),
            "epochs": args.epochs,
            "val_split": args.val_split,
            "subset": args.subset,
            "data": "cifar10-subset.npz: train on the seeded train split of x_train, accuracy on x_test",
        },
        "main": [],
        "pooled": [],
        "ablation": [],
        "tuning": [],
    }
    masks = list(dict.fromkeys([*args.masks, *sorted({k[0] for k in test})]))
    sparsities = sorted({*args.sparsities, *{k[1] for k in test}})
    for mask in masks:
        for sparsity in sparsities:
            base = _cell(test, mask, sparsity, "baseline", "test_acc")
            ours = _cell(test, mask, sparsity, "tost", "test_acc")
            gains = _gain(base, ours)
            report["main"].append(
                {
                    "mask": mask,
                    "sparsity": sparsity,
                    "baseline": dict(zip(("mean", "std"), _mean_std(list(base.values())))),
                    "tost": dict(zip(("mean", "std"), _mean_std(list(ours.values())))),
                    "gain": dict(zip(("mean", "std"), _mean_std(gains))),
                    "seeds_baseline": sorted(base),
                    "seeds_tost": sorted(ours),
                    "paired": len(gains),
                    "per_seed": {"baseline": base, "tost": ours},
                    "verdict": _verdict(gains),
                }
            )
    for sparsity in sparsities:
        pooled_masks, gains = _pooled([r for r in report["main"] if r["sparsity"] == sparsity])
        report["pooled"].append(
            {
                "sparsity": sparsity,
                "masks": pooled_masks,
                "pairs": len(gains),
                "gain": dict(zip(("mean", "std"), _mean_std(gains))),
                "verdict": _verdict(gains),
            }
        )
    ablated = [m for m in masks if any(_cell(test, m, ABLATION_SPARSITY, v, "test_acc") for v in ABLATION_VARIANTS)]
    for mask in ablated:  # the masks the ablation was run for
        base = _cell(test, mask, ABLATION_SPARSITY, "baseline", "test_acc")
        for variant in ("baseline", *ABLATION_VARIANTS, "tost"):
            values = _cell(test, mask, ABLATION_SPARSITY, variant, "test_acc")
            gains = _gain(base, values) if variant != "baseline" else []
            report["ablation"].append(
                {
                    "mask": mask,
                    "sparsity": ABLATION_SPARSITY,
                    "variant": variant,
                    "acc": dict(zip(("mean", "std"), _mean_std(list(values.values())))),
                    "gain": dict(zip(("mean", "std"), _mean_std(gains))),
                    "seeds": sorted(values),
                    "per_seed": values,
                }
            )
    # Every run trains on the same split and records its validation accuracy, so test-grid runs
    # count here too: this table (never x_test) is what the defaults are chosen from.
    val = _select(records, args, arch)
    groups = sorted({(k[0], k[1], k[3], k[4]) for k in val})
    for mask, sparsity, variant, overrides in groups:
        values = _cell(val, mask, sparsity, variant, "val_acc", overrides)
        base = _cell(val, mask, sparsity, "baseline", "val_acc")
        gains = _gain(base, values) if (variant, overrides) != ("baseline", "{}") else []
        report["tuning"].append(
            {
                "mask": mask,
                "sparsity": sparsity,
                "variant": variant,
                "overrides": json.loads(overrides),
                "val_acc": dict(zip(("mean", "std"), _mean_std(list(values.values())))),
                "gain": dict(zip(("mean", "std"), _mean_std(gains))),
                "seeds": sorted(values),
                "verdict": _verdict(gains) if gains else "",
            }
        )
    report["candidates"] = _candidates(val)
    return report


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
        rows.append(
            {
                "sparsity": sparsity,
                "archs": archs,
                "pairs": len(gains),
                "gain": dict(zip(("mean", "std"), _mean_std(gains))),
                "verdict": _verdict(gains),
            }
        )
    return rows


def _budget(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_device: dict[str, float] = {}
    for r in records:
        label = r.get("gpu") or f"{r['device']} x{r['threads']} thread(s): {r.get('cpu', '?')}"
        by_device[label] = by_device.get(label, 0.0) + r["wall_s"]
    per_arch: dict[str, dict[str, Any]] = {}
    for arch in dict.fromkeys(r["key"]["arch"] for r in records):
        mine = [r for r in records if r["key"]["arch"] == arch]
        cpu = [r for r in mine if r["key"]["subset"] is None and r["device"] == "cpu"]
        per_arch[arch] = {
            "runs": len(mine),
            "median_cpu_epoch_s": round(statistics.median(r["train_s"] / r["key"]["epochs"] for r in cpu), 2)
            if cpu
            else None,
            "median_cpu_wall_s": round(statistics.median(r["wall_s"] for r in cpu), 1) if cpu else None,
        }
    train_s = [
        r["train_s"] / r["key"]["epochs"] for r in records if r["key"]["subset"] is None and r["device"] == "cpu"
    ]
    return {
        "runs": len(records),
        "wall_s_total": round(sum(r["wall_s"] for r in records), 1),
        "wall_s_by_machine": {k: round(v, 1) for k, v in by_device.items()},
        "median_cpu_epoch_s": round(statistics.median(train_s), 2) if train_s else None,
        "per_arch": per_arch,
        "commits": sorted({str(r.get("commit")) for r in records}),
    }


def build_report(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every architecture's tables, the pairs of all of them pooled, and the budget."""
    records = read_results(out / "accuracy.jsonl")
    sections = [build_arch_report(records, arch, args) for arch in _arch_order(records, args)]
    return {"architectures": sections, "across": _across(sections), "budget": _budget(records)}


def render_arch_markdown(section: dict[str, Any]) -> list[str]:
    """One architecture's part of ``accuracy.md``."""
    p = section["protocol"]
    lines = [
        f"## `{p['arch']}`: {p['description']}",
        "",
        f"{p['arch']}, {p['epochs']} epochs, {p['data']} (val split {p['val_split']}"
        + (f", subset {p['subset']}" if p["subset"] else "")
        + "). Test accuracy in %, mean ± sample std over seeds; gain = ToST - default, paired by seed"
        " (same mask, same initial weights, same batches). `pending`: not run yet.",
        "",
        "### Main grid",
        "",
        "| mask | sparsity | default (baseline) | ToST | gain | seeds | ToST beats default? |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in section["main"]:
        lines.append(
            f"| {row['mask']} | {row['sparsity']:.2f} "
            f"| {_pct(row['baseline']['mean'], row['baseline']['std'], len(row['seeds_baseline']))} "
            f"| {_pct(row['tost']['mean'], row['tost']['std'], len(row['seeds_tost']))} "
            f"| {_pct(row['gain']['mean'], row['gain']['std'], row['paired'], signed=True)} "
            f"| {row['paired']} | {row['verdict']} |"
        )
    lines += [
        "",
        "`yes` / `no (worse)`: the mean gain is more than two standard errors from zero; otherwise `within noise`.",
        "",
        "Pooled over masks: every (mask, seed) pair at a sparsity, so more pairs and a smaller standard error.",
        "",
        "| sparsity | masks | pairs | gain | ToST beats default? |",
        "| ---: | --- | ---: | ---: | --- |",
        *(
            f"| {row['sparsity']:.2f} | {', '.join(row['masks']) or '-'} | {row['pairs']} "
            f"| {_pct(row['gain']['mean'], row['gain']['std'], row['pairs'], signed=True)} | {row['verdict']} |"
            for row in section["pooled"]
        ),
    ]
    if section["ablation"]:
        lines += [
            "",
            f"### Ablation at sparsity {ABLATION_SPARSITY}",
            "",
            "`only_X`: the default protocol plus technique X alone (with the recipe's settings);"
            " `no_X`: the full recipe without X. Gain vs the default protocol, paired by seed.",
            "",
            "| mask | variant | test acc | gain vs default | seeds |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
    for row in section["ablation"]:
        gain = "" if row["variant"] == "baseline" else _pct(row["gain"]["mean"], row["gain"]["std"], 0, signed=True)
        lines.append(
            f"| {row['mask']} | {row['variant']} | {_pct(row['acc']['mean'], row['acc']['std'], len(row['seeds']))} "
            f"| {gain} | {len(row['seeds'])} |"
        )
    if section["tuning"]:
        lines += [
            "",
            "### Validation accuracy of every recipe run (held-out 10% of x_train, never x_test)",
            "",
            "What the defaults are chosen from: every run, of the test grid or a tuning run, trains on the same"
            " split and records its validation accuracy. Gain vs the default protocol, paired by seed.",
            "",
            "| mask | sparsity | variant | overrides | val acc | gain vs default | seeds | better than default? |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | --- |",
        ]
        for row in section["tuning"]:
            overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "-"
            is_default = row["variant"] == "baseline" and overrides == "-"
            gain = "" if is_default else _pct(row["gain"]["mean"], row["gain"]["std"], 0, signed=True)
            lines.append(
                f"| {row['mask']} | {row['sparsity']:.2f} | {row['variant']} | {overrides} "
                f"| {_pct(row['val_acc']['mean'], row['val_acc']['std'], len(row['seeds']))} "
                f"| {gain} | {len(row['seeds'])} | {row.get('verdict', '')} |"
            )
    if section["candidates"]:
        lines += [
            "",
            "### Tuned settings against today's `Recipe.tost` (validation, pooled over masks)",
            "",
            "Each row: ToST with the overrides, minus ToST with today's defaults, paired by (mask, seed) on the"
            " validation split; and its gain over the default protocol, paired by (mask, seed) the same way.",
            "",
            "| sparsity | overrides | pairs | vs today's ToST | per mask, vs today's ToST | vs default protocol"
            " | better than today's ToST? |",
            "| ---: | --- | ---: | ---: | --- | ---: | --- |",
        ]
        for row in section["candidates"]:
            overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items())
            per_mask = " / ".join(f"{m} {100 * d:+.2f}" for m, d in row["vs_tost_per_mask"].items())
            lines.append(
                f"| {row['sparsity']:.2f} | {overrides} | {row['pairs']} "
                f"| {_pct(row['vs_tost']['mean'], row['vs_tost']['std'], 0, signed=True)} | {per_mask or '-'} "
                f"| {_pct(row['vs_baseline']['mean'], row['vs_baseline']['std'], 0, signed=True)} "
                f"| {row['verdict']} |"
            )
    return lines + [""]


def render_markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["# Accuracy: default protocol (masks only) vs ToST", ""]
    for section in report["architectures"]:
        lines += render_arch_markdown(section)
    lines += [
        "## Across architectures",
        "",
        "Pooled over architectures and masks: every (architecture, mask, seed) pair of the main grids at a"
        " sparsity, test accuracy. The spread mixes seed noise with real differences between networks.",
        "",
        "| sparsity | architectures | pairs | gain | ToST beats default? |",
        "| ---: | --- | ---: | ---: | --- |",
        *(
            f"| {row['sparsity']:.2f} | {', '.join(row['archs']) or '-'} | {row['pairs']} "
            f"| {_pct(row['gain']['mean'], row['gain']['std'], row['pairs'], signed=True)} | {row['verdict']} |"
            for row in report["across"]
        ),
    ]
    b = report["budget"]
    lines += [
        "",
        "## Budget",
        "",
        f"{b['runs']} finished runs in the results file, {b['wall_s_total'] / 3600:.2f} h of wall time in all"
        + (f"; median {b['median_cpu_epoch_s']} s per epoch on CPU" if b["median_cpu_epoch_s"] else "")
        + f". Library commit(s): {', '.join(b['commits']) or '-'}.",
        "",
    ]
    lines += [f"- {machine_name}: {seconds / 3600:.2f} h" for machine_name, seconds in b["wall_s_by_machine"].items()]
    lines += [
        "",
        "| architecture | runs | median s per epoch (CPU) | median wall s per run (CPU) |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {arch} | {a['runs']} | {a['median_cpu_epoch_s'] or '-'} | {a['median_cpu_wall_s'] or '-'} |"
            for arch, a in b["per_arch"].items()
        ),
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
    if args.epochs != 20:
        flags += f" --epochs {args.epochs}"
    if args.subset is not None:
        flags += f" --subset {args.subset}"
    if Path(args.out).resolve() != DEFAULT_OUT.resolve():
        flags += f" --out {args.out}"
    return flags


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
    p = section["protocol"]
    ticks = sorted({r["sparsity"] for r in main})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xlim(ticks[0] - 0.01, ticks[-1] + 0.01)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{p['arch']}, CIFAR-10 subset, {p['epochs']} epochs (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    report = build_report(out, args)
    _write_atomic(out / "accuracy.json", json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    _write_atomic(out / "accuracy.md", render_markdown(report, args))
    render_plot(report, out / "accuracy.png")
    return report


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", choices=("main", "ablation", "all"), default="main")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="run these variants instead of the grid's")
    parser.add_argument("--masks", nargs="+", choices=MASKS + EXTRA_MASKS, default=list(MASKS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--arch",
        nargs="+",
        choices=list(cifar.ARCHITECTURES),
        default=None,
        help="architectures to run (default resnet20) or to report (default: every one with a record)",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--eval-on", choices=("test", "val"), default="test", help="test: the reported grid; val: tuning"
    )
    parser.add_argument("--val-split", type=float, default=0.1, help="fraction of x_train held out (seeded, fixed)")
    parser.add_argument("--subset", type=int, default=None, help="use only this many images per split (smoke runs)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Recipe overrides, part of the key")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many runs now")
    parser.add_argument("--dry-run", action="store_true", help="list the planned runs and which are done")
    parser.add_argument("--report", action="store_true", help="only regenerate accuracy.md/.json/.png from the jsonl")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results directory")
    parser.add_argument("--data", default=str(cifar.DEFAULT_DATA), help="path of cifar10-subset.npz")
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
    if not Path(args.data).is_file():
        parser.error(f"data file not found: {args.data} (the CIFAR-10 subset lives in ../shared/data/)")
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
