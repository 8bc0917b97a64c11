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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import csv
import hashlib
import json
import math
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CSV_DIR = HERE / "results"
DEFAULT_MD = HERE / "COVERAGE.md"

COLUMNS = [
    "source",
    "model",
    "params",
    "input_size",
    "traced",
    "ghost_neurons",
    "ghost_skips",
    "masked_layers",
    "prepare_s",
    "finalize_s",
    "round_trip_ok",
    "baseline_exact",
    "failure",
    "wall_s",
    # Extra columns (after the ones the issue asks for).
    "status",  # ok | failed | not buildable
    "stage",  # the last stage reached (where a failure or timeout happened)
    "round_trip_diff",  # (c): max |prepared eval - finalized eval|
    "baseline_diff",  # (e): max |baseline-prepared eval - masked reference eval|
]

SPARSITY = 0.9
SMALL_SIZE = 64
SMALL_ALTERNATIVES = (56, 96, 112)
"""Tried after 64x64 fails, before the model's own (often 384-768) size: multiples of 14 and 48."""
SWEEP_RECIPE = dict(total_steps=4, warmup=0.5, skip_pointwise=True, skip_branch="conv_bn")
"""The heaviest scaffolding, pinned so that the sweep's rows keep their meaning as defaults change."""
BASELINE_MAX_PARAMS = 100_000_000
# Forward-pass equivalents the checks need (probe, reference, 2 train steps, evals, baseline):
# a model whose one eval forward takes longer than timeout / FORWARDS_NEEDED cannot finish.
FORWARDS_NEEDED = 15
BUILD_STAGES = ("start", "import", "meta", "build", "input")


# --------------------------------------------------------------------------------------------
# Model lists
# --------------------------------------------------------------------------------------------


_LISTED: dict[str, list[str]] = {}


def list_models(source: str) -> list[str]:
    """Every classification model of ``source`` (``tv`` or ``timm``); cached per process."""
    if source not in _LISTED:
        if source == "tv":
            import torchvision

            _LISTED[source] = sorted(torchvision.models.list_models(module=torchvision.models))
        else:
            import timm

            _LISTED[source] = sorted(timm.list_models())
    return _LISTED[source]


def select(args: argparse.Namespace) -> list[str]:
    """Keys ``source:name`` to run, in run order."""
    sources = ["tv", "timm"] if args.source == "all" else [args.source]
    if args.only and all(item.partition(":")[0] in ("tv", "timm") and ":" in item for item in args.only):
        # Fully named: no listing here (importing timm costs seconds); the worker checks the name.
        return list(dict.fromkeys(args.only))
    available = {s: list_models(s) for s in sources}
    if args.only:
        keys = []
        for item in args.only:
            source, _, name = item.rpartition(":")
            if source and source not in ("tv", "timm"):
                raise SystemExit(f"--only {item!r}: the prefix must be tv: or timm:")
            wanted = [source] if source else sources
            found = [f"{s}:{name}" for s in wanted if s in available and name in available[s]]
            if not found:
                raise SystemExit(f"--only {item!r}: no such model in {'/'.join(wanted)}")
            keys += [k for k in found if k not in keys]
        return keys
    keys = [f"{s}:{n}" for s in sources for n in available[s]]
    if args.order == "mixed":  # deterministic shuffle: partial sweeps and time estimates stay representative
        keys.sort(key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    return keys


# --------------------------------------------------------------------------------------------
# The worker: one model, in its own process
# --------------------------------------------------------------------------------------------


class Worker:
    """Runs every check on one model, saving the row after each stage (so a timeout says where)."""

    def __init__(self, key: str, result_path: Path, args: argparse.Namespace) -> None:
        self.source, _, self.name = key.partition(":")
        self.path = result_path
        self.args = args
        self.build_kwargs: dict[str, object] = {}
        self.row: dict[str, object] = {c: "" for c in COLUMNS}
        self.row.update(source=self.source, model=self.name, stage="start")
        self.started = time.perf_counter()
        self.save()

    # -- bookkeeping ------------------------------------------------------------------------
    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.row))
        os.replace(tmp, self.path)

    def stage(self, name: str) -> None:
        self.row["stage"] = name
        self.save()

    def fail(self, reason: str) -> None:
        if not self.row["failure"]:
            self.row["failure"] = reason
        self.row["status"] = "failed"

    def not_buildable(self, reason: str) -> None:
        self.row.update(status="not buildable", failure=reason, round_trip_ok="", baseline_exact="")

    # -- building ---------------------------------------------------------------------------
    def create(self, device: str | None = None):
        import torch

        if self.source == "tv":
            import torchvision

            build = lambda: torchvision.models.get_model(self.name, weights=None)  # noqa: E731
        else:
            import timm

            build = lambda: timm.create_model(self.name, pretrained=False, **self.build_kwargs)  # noqa: E731
        if device is not None:
            with torch.device(device):
                return build()
        torch.manual_seed(0)
        return build()

    def fixed_size(self) -> bool:
        """Whether timm says the model runs only at its own input size (position embeddings etc.)."""
        if self.source != "timm":
            return False
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(self.name)
        return bool(cfg is not None and cfg.fixed_input_size)

    def build_small(self):
        """A fixed-size timm model built for small inputs (``img_size=``), or None where that fails.

        Such models (ViTs, Swin, CaiT, ...) take ``img_size`` and size their position tables to
        it; the layers prepare sees are the same, at a fraction of the forward cost of 224-518.
        Tries 64, then 56, 96 and 112 (patch 14, pooling 48); stops at a constructor that refuses
        ``img_size``.
        """
        for side in (SMALL_SIZE, *SMALL_ALTERNATIVES):
            self.build_kwargs = {"img_size": side}
            try:
                model = self.create()
            except Exception as error:  # noqa: BLE001 - no img_size here: the model's own size
                if is_oom(error):
                    raise
                break
            try:
                x, forward_s = self.probe(model, (3, side, side))
            except Exception as error:  # noqa: BLE001 - try the next size
                if is_oom(error):
                    raise
                del model
                continue
            self.row["input_size"] = f"{side}x{side} (img_size={side})"
            return model, x, forward_s
        self.build_kwargs = {}
        return None

    def input_sizes(self, model) -> list[tuple[int, int, int]]:
        """Sizes to try, in order: 64x64 (then 56, 96, 112: patch 14, pooling 48) unless the model
        needs a fixed size, then its own size(s)."""
        if self.source == "timm":
            cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
            size = tuple(int(v) for v in cfg.get("input_size") or (3, 224, 224))
            own = [size]
            fixed = self.fixed_size()
        else:  # torchvision: 224, else the model's image_size (ViT), else its weights' crop size
            import torchvision

            own = [224]
            if isinstance(getattr(model, "image_size", None), int):
                own.append(model.image_size)
            try:
                weights = torchvision.models.get_model_weights(self.name).DEFAULT
                own.append(int(weights.transforms.keywords["crop_size"]))
            except Exception:  # noqa: BLE001 - no weights enum or no crop size: 224 only
                pass
            own = [(3, s, s) for s in own]
            fixed = False
        sizes = [] if fixed else [(own[0][0], side, side) for side in (SMALL_SIZE, *SMALL_ALTERNATIVES)]
        for size in own:
            if size not in sizes:
                sizes.append(size)
        return sizes

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # noqa: BLE001 - every failure becomes a row
            stage = str(self.row["stage"])
            reason = f"{stage}: {describe(error)}"
            if is_oom(error):  # this machine's limit (--max-mem-gb), at whatever stage: listed, with the stage
                self.not_buildable(
                    f"out of memory in {stage} (--max-mem-gb {self.args.max_mem_gb:g}): {describe(error)}"
                )
            elif stage in BUILD_STAGES:
                self.not_buildable(reason)
            else:
                self.fail(reason)
            if os.environ.get("COVERAGE_TRACEBACK"):
                traceback.print_exc()
        self.row["wall_s"] = round(time.perf_counter() - self.started, 2)
        self.save()

    def _run(self) -> None:
        import torch

        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        self.stage("import")
        import tost_surgery as tost

        if self.name not in list_models(self.source):
            self.row.update(status="unknown", failure=f"no model {self.name!r} in {self.source}")
            return

        # Parameter count on the meta device first: cheap, and decides "too big".
        self.stage("meta")
        params = None
        try:
            meta = self.create("meta")
            params = sum(p.numel() for p in meta.parameters())
            del meta
        except Exception:  # noqa: BLE001 - count after the real build instead
            pass
        if params is not None:
            self.row["params"] = params
            if params > self.args.max_params:
                self.not_buildable(f"too big: {params / 1e6:.0f}M parameters > --max-params {self.args.max_params:.3g}")
                return

        self.stage("build")
        small = self.build_small() if self.fixed_size() else None
        model = small[0] if small else self.create()
        params = sum(p.numel() for p in model.parameters())
        self.row["params"] = params
        if params > self.args.max_params:
            self.not_buildable(f"too big: {params / 1e6:.0f}M parameters > --max-params {self.args.max_params:.3g}")
            return

        self.stage("input")
        x, forward_s = small[1:] if small else self.pick_input(model)
        budget = self.args.timeout / FORWARDS_NEEDED
        if forward_s > budget:
            self.not_buildable(
                f"too slow on this machine: one eval forward at {self.row['input_size']} takes {forward_s:.1f} s, "
                f"the checks need ~{FORWARDS_NEEDED} (--timeout {self.args.timeout:g} s)"
            )
            return

        cls = type(model)
        original_keys = list(model.state_dict().keys())

        self.stage("mask")
        mask = tost.masks.erk(model, SPARSITY, seed=0)

        reference = y_reference = None
        do_baseline = params <= BASELINE_MAX_PARAMS
        if do_baseline:
            self.stage("reference")
            reference = copy.deepcopy(model)
            with torch.no_grad():
                for name, keep in mask.items():
                    reference.get_parameter(name).mul_(keep.to(reference.get_parameter(name).dtype))
            reference.eval()
            with torch.no_grad():
                y_reference = tensors(reference(x))

        self.stage("prepare")
        t0 = time.perf_counter()
        returned = tost.prepare(model, mask, tost.Recipe.tost(**SWEEP_RECIPE))
        self.row["prepare_s"] = round(time.perf_counter() - t0, 3)
        self.stage("inspect")
        status = tost.status(model)
        whole = sum("called whole" in note for note in status.notes)
        if not status.traced:
            self.row["traced"] = "eager"
            self.row["ghost_neurons"], self.row["ghost_skips"] = status.sites.get("neurons", 0), 0
        else:
            self.row["traced"] = f"partial: {whole} blocks whole" if whole else "full"
            g = tost.graph(model, training=True).graph
            self.row["ghost_neurons"] = sum(n.op == "call_function" and n.target is torch.lerp for n in g.nodes)
            self.row["ghost_skips"] = sum(n.op == "call_function" and n.target is torch.addcmul for n in g.nodes)
        self.row["masked_layers"] = status.masked
        problems: list[str] = []
        if returned is not model or type(model) is not cls:
            problems.append(f"(a) prepare returned a {type(returned).__name__}, not the model itself")
        self.save()

        self.stage("train")
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        tost.bind(model, optimizer)
        for _ in range(2):
            out = first_tensor(model(x))
            if out.dim() == 2 and out.shape[1] > 1:
                labels = torch.arange(out.shape[0]) % out.shape[1]
                loss = torch.nn.functional.cross_entropy(
                    out.float(), labels, label_smoothing=tost.label_smoothing(model)
                )
            else:
                loss = out.float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        del out, loss
        optimizer.zero_grad(set_to_none=True)
        tost.step(model, 2)

        self.stage("checks")
        if type(model) is not cls:
            problems.append(f"(a) class changed to {type(model).__name__}")
        nonzero = masked_nonzero(model, mask)
        if nonzero:
            problems.append(f"(b) masked effective weights not zero: {nonzero}")

        model.eval()
        with torch.no_grad():
            y_prepared = tensors(model(x))

        self.stage("finalize")
        t0 = time.perf_counter()
        finalized = tost.finalize(model)
        self.row["finalize_s"] = round(time.perf_counter() - t0, 3)
        if finalized is not model or type(model) is not cls:
            problems.append("(a) finalize returned another object or class")

        self.stage("after finalize")
        from torch.nn.utils import parametrize

        keys = list(model.state_dict().keys())
        if keys != original_keys:
            extra = [k for k in keys if k not in original_keys][:3]
            missing = [k for k in original_keys if k not in keys][:3]
            order = "" if extra or missing else " (order differs)"
            problems.append(f"(d) state_dict keys changed{order}: +{extra} -{missing}")
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            problems.append("(d) parametrizations left after finalize")
        if hasattr(model, "tost"):
            problems.append("(d) model.tost left after finalize")
        if "forward" in model.__dict__:
            problems.append("(d) instance forward left after finalize")
        nonzero = masked_nonzero(model, mask)
        if nonzero:
            problems.append(f"(b) masked weights not zero after finalize: {nonzero}")
        try:
            with torch.no_grad():
                y_final = tensors(model(x))
                y_again = tensors(model(x))
        except Exception as error:  # noqa: BLE001
            problems.append(f"(d) original forward fails after finalize: {describe(error)}")
        else:
            diff, ok = compare(y_prepared, y_final, relative=1e-5, floor=1.0)
            self.row["round_trip_diff"] = fmt(diff)
            if not ok:
                problems.append(f"(c) finalize changed the eval output: max diff {fmt(diff)}")
            diff2, ok2 = compare(y_final, y_again, relative=0.0, floor=1.0)
            if not ok2:
                problems.append(f"(d) original forward not repeatable after finalize: max diff {fmt(diff2)}")
        self.row["round_trip_ok"] = not problems
        if problems:
            self.fail("; ".join(problems))
        self.save()
        del model, finalized, returned, optimizer, y_prepared

        if do_baseline:
            self.stage("baseline")
            try:
                fresh = self.create()
                fresh.load_state_dict(reference.state_dict())
                del reference
                tost.prepare(fresh, mask, tost.Recipe.baseline())
                fresh.eval()
                with torch.no_grad():
                    y_baseline = tensors(fresh(x))
                diff, ok = compare(y_reference, y_baseline, relative=1e-5, floor=0.0)
                self.row["baseline_diff"] = fmt(diff)
                self.row["baseline_exact"] = ok
                if not ok:
                    self.fail(f"(e) baseline graph differs from the masked model: max diff {fmt(diff)}")
            except Exception as error:  # noqa: BLE001
                self.row["baseline_exact"] = False
                self.fail(f"(e) baseline: {describe(error)}")
        if not self.row["status"]:
            self.row["status"] = "ok"
        self.row["stage"] = "done"

    def pick_input(self, model):
        """The input to use (64x64 when the model runs at it) and one eval forward's time."""
        errors = []
        for size in self.input_sizes(model):
            try:
                x, forward_s = self.probe(model, size)
            except Exception as error:  # noqa: BLE001
                if is_oom(error):
                    raise
                errors.append(f"{'x'.join(map(str, size[1:]))}: {describe(error)}")
                continue
            self.row["input_size"] = "x".join(map(str, size[1:]))
            return x, forward_s
        raise RuntimeError("eager forward fails at every size tried: " + " | ".join(errors))

    @staticmethod
    def probe(model, size: tuple[int, int, int]):
        """A batch-2 input of ``size`` and one eval forward's time; train mode must run too.

        The model's buffers are restored afterwards (running statistics, caches a forward fills).
        """
        import torch

        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        try:
            with torch.no_grad():
                model.eval()
                t0 = time.perf_counter()
                model(x)
                forward_s = time.perf_counter() - t0
                model.train()
                model(x)  # train mode too (batch statistics, dropout paths)
        finally:
            restore_buffers(model, buffers)
            model.train()
        return x, forward_s


def restore_buffers(model, saved: dict) -> None:
    """Put every buffer back as it was: values copied in place, and a buffer the forward replaced
    (a cache such as timm ConViT's ``rel_indices``, resized to the input) set back to its old tensor."""
    import torch

    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, value in list(module._buffers.items()):
                key = f"{module_name}.{name}" if module_name else name
                if key not in saved or value is None:
                    continue
                if value.shape == saved[key].shape:
                    value.copy_(saved[key])
                else:
                    module._buffers[name] = saved[key].clone()


def tensors(output) -> list:
    """Every tensor in a model output (tensor, tuple/list, dict, namedtuple, dataclass-like)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output.detach()]
    if isinstance(output, dict):
        return [t for v in output.values() for t in tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors(v)]
    if hasattr(output, "__dict__"):
        return [t for v in vars(output).values() for t in tensors(v)]
    return []


def first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    if isinstance(output, (tuple, list, dict)):
        return None
    raise TypeError(f"the model output holds no tensor: {type(output).__name__}")


def compare(expected: list, actual: list, *, relative: float, floor: float) -> tuple[float, bool]:
    """``(max abs diff, ok)``: NaN/inf must sit at the same places; finite values within tolerance."""
    import torch

    if len(expected) != len(actual):
        return math.inf, False
    worst, ok = 0.0, True
    for a, b in zip(expected, actual):
        if a.shape != b.shape:
            return math.inf, False
        a, b = a.double(), b.double()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb):
            return math.nan, False
        na, nb = a[~fa], b[~fb]
        if not bool(((na == nb) | (na.isnan() & nb.isnan())).all()):
            return math.nan, False
        if fa.any():
            scale = float(a[fa].abs().max())
            diff = float((a[fa] - b[fa]).abs().max())
            worst = max(worst, diff)
            ok = ok and diff <= relative * max(floor, scale)
    return worst, ok


def masked_nonzero(model, mask: dict) -> str:
    """Masked layers whose (effective) weight is not zero where the mask is zero."""
    import torch

    bad = []
    with torch.no_grad():
        for name, keep in mask.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            weight = getattr(module, attr)  # when parametrized: the effective (masked) weight
            count = int((weight[~keep] != 0).sum())
            if count:
                bad.append(f"{name} ({count})")
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}"


def is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error) or "out of memory" in str(error)


def fmt(value: float) -> str:
    return f"{value:.3g}"


def worker_main(args: argparse.Namespace) -> None:
    if args.max_mem_gb:
        import resource

        page = os.sysconf("SC_PAGE_SIZE")
        # The address-space limit turns an allocation beyond the budget into a MemoryError
        # (a row) instead of the kernel's OOM killer (no row, and other processes at risk).
        import torch  # noqa: F401 - count the libraries' own mappings in the base

        base = int(Path("/proc/self/statm").read_text().split()[0]) * page
        limit = base + int(args.max_mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    Worker(args.worker, Path(args.result), args).run()


PRELOAD = ["torch", "torchvision", "timm", "tost_surgery"]
"""Imported once by the fork server; every model process starts from that state."""


def _noop() -> None:
    pass


def _child_main(args: argparse.Namespace, errlog: str) -> None:
    """Entry of a model process (forked by the server): own session, stderr to ``errlog``, one thread."""
    os.setsid()  # the driver kills the whole group on timeout
    err = os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(out, 1)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    worker_main(args)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def file_stem(key: str) -> str:
    """A file name for ``source:name`` (claims, result files)."""
    return key.replace(":", "__").replace("/", "_")


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.csv_path = args.out / "coverage.csv"
        self.claims = args.out / "coverage.claims"
        self.lock = threading.Lock()
        self.done = 0
        self.unknown = 0
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        warm = self.context.Process(target=_noop)  # start the server now, outside every model's time limit
        warm.start()
        warm.join()

    def append(self, row: dict) -> None:
        with self.lock:
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            with self.csv_path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({c: row.get(c, "") for c in COLUMNS})
                f.flush()
                os.fsync(f.fileno())

    # -- claims: several drivers may share one CSV (e.g. one with --reverse), each model runs once
    def claim(self, key: str) -> bool:
        """Take ``key`` for this driver unless it has a row or a live driver holds it."""
        if key in {f"{r['source']}:{r['model']}" for r in read_rows(self.csv_path)} and not self.args.retry:
            return False
        self.claims.mkdir(parents=True, exist_ok=True)
        path = self.claims / (file_stem(key) + ".pid")
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                try:
                    holder = int(path.read_text() or 0)
                    os.kill(holder, 0)  # alive: another driver runs it
                    return False
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # a driver that died left it: take it over
                    continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def release(self, key: str) -> None:
        (self.claims / (file_stem(key) + ".pid")).unlink(missing_ok=True)

    def run_one(self, key: str, tmpdir: Path) -> dict | None:
        if not self.claim(key):
            return None
        try:
            return self._run_one(key, tmpdir)
        except BaseException:
            self.release(key)
            raise

    def _run_one(self, key: str, tmpdir: Path) -> dict:
        result = tmpdir / (file_stem(key) + ".json")
        errlog = result.with_suffix(".err")
        child_args = argparse.Namespace(**{**vars(self.args), "worker": key, "result": str(result)})
        started = time.perf_counter()
        timed_out = False
        proc = self.context.Process(target=_child_main, args=(child_args, str(errlog)))
        proc.start()
        proc.join(self.args.timeout)
        if proc.is_alive():
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join()
        wall = round(time.perf_counter() - started, 2)
        source, _, name = key.partition(":")
        row = {c: "" for c in COLUMNS}
        row.update(source=source, model=name, stage="start")
        if result.exists():
            try:
                row.update(json.loads(result.read_text()))
            except json.JSONDecodeError:
                pass
        row["wall_s"] = wall
        stage = row.get("stage") or "start"
        if timed_out:
            reason = f"timeout ({self.args.timeout:g} s) in {stage}"
            if stage in BUILD_STAGES:
                row.update(status="not buildable", failure=reason)
            else:
                row.update(status="failed", failure=reason, round_trip_ok=row.get("round_trip_ok") or False)
        elif not row.get("status"):
            tail = errlog.read_text(errors="replace").strip().splitlines()[-1:] if errlog.exists() else []
            reason = f"worker died in {stage} (exit {proc.exitcode})" + (f": {tail[0][:200]}" if tail else "")
            killed = proc.exitcode in (-9, 137)
            if killed:  # SIGKILL from the kernel's OOM killer (the machine's memory is shared)
                row.update(status="not buildable", failure=reason + " (SIGKILL: out of memory?)", round_trip_ok="")
            else:
                row.update(status="failed", failure=reason, round_trip_ok=False)
        if row["status"] == "failed" and row.get("round_trip_ok") == "":
            row["round_trip_ok"] = False
        for path in (result, errlog):
            path.unlink(missing_ok=True)
        return row

    def sweep(self) -> None:
        keys = select(self.args)
        rows = read_rows(self.csv_path)
        if self.args.retry and rows:
            selected = set(keys)
            kept = [r for r in rows if f"{r['source']}:{r['model']}" not in selected]
            if len(kept) != len(rows):
                tmp = self.csv_path.with_suffix(".tmp")
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(kept)
                os.replace(tmp, self.csv_path)
                rows = kept
        done = {f"{r['source']}:{r['model']}" for r in rows}
        pending = [k for k in keys if k not in done]
        if self.args.reverse:
            pending.reverse()
        if self.args.limit is not None:
            pending = pending[: self.args.limit]
        total = len(pending)
        print(
            f"{len(keys)} selected, {len(keys) - len([k for k in keys if k not in done])} already in {self.csv_path}, "
            f"running {total} (jobs={self.args.jobs}, timeout={self.args.timeout:g} s)",
            flush=True,
        )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tost-coverage-") as tmp:
            tmpdir = Path(tmp)
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.args.jobs)) as pool:
                futures = {pool.submit(self.run_one, key, tmpdir): key for key in pending}
                for future in concurrent.futures.as_completed(futures):
                    row = future.result()
                    if row is None:  # another driver ran it or runs it now
                        total -= 1
                        continue
                    if row["status"] == "unknown":
                        print(f"error: {row['failure']} (not recorded)", file=sys.stderr, flush=True)
                        self.unknown += 1
                        self.release(futures[future])
                        continue
                    self.append(row)
                    self.release(futures[future])
                    self.done += 1
                    elapsed = time.perf_counter() - started
                    eta = elapsed / self.done * (total - self.done)
                    status = row["status"] if row["status"] != "failed" else f"FAILED: {row['failure']}"
                    if row["status"] == "not buildable":
                        status = f"not buildable: {row['failure']}"
                    print(
                        f"[{self.done}/{total}] {futures[future]} {row.get('traced') or '-'} "
                        f"{row['wall_s']}s {status[:300]} (elapsed {elapsed / 60:.1f} min, eta {eta / 3600:.1f} h)",
                        flush=True,
                    )
        write_report(self.csv_path, self.args.markdown, self.args)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _truthy(value: str) -> bool:
    return str(value).strip().lower() == "true"


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _failure_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return ["None.", ""]
    lines = ["| source | model | params | traced | stage | failure |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['model']} | {r['params']} | {r['traced'] or '-'} | {r['stage']} "
            f"| {_cell(r['failure'])} |"
        )
    return lines + [""]


def write_report(csv_path: Path, md_path: Path, args: argparse.Namespace) -> None:
    rows = read_rows(csv_path)
    rows.sort(key=lambda r: (r["source"] != "tv", r["model"]))
    buildable = [r for r in rows if r["status"] != "not buildable"]
    broken = [r for r in rows if r["status"] == "not buildable"]
    failures = [r for r in buildable if r["status"] != "ok"]

    lines = ["# Coverage: the ToST round trip on every torchvision and timm classification model", ""]
    lines += [
        "Generated by `benchmarks/coverage.py` from `" + os.path.relpath(csv_path, ROOT) + "`; do not edit by hand.",
        "",
        f"Machine: CPU only, 2 cores shared with other jobs, one thread per model "
        f"({platform.processor() or platform.machine()}, Python {platform.python_version()}).",
        "",
        "Command: `.venv/bin/python benchmarks/coverage.py --jobs 1` (resumable; "
        "`--report` regenerates this file from the CSV). Rows re-run with other flags: torchvision's "
        "vit_h_14 and regnet_y_128gf, above 600M parameters, with `--only tv:vit_h_14 tv:regnet_y_128gf "
        "--retry --max-params 7e8 --max-mem-gb 19 --timeout 600`.",
        "",
        f"Per model, in its own process with a wall-time limit: build (no pretrained weights), batch 2 at "
        f"{SMALL_SIZE}x{SMALL_SIZE} when the model runs at it (else the first of "
        f"{', '.join(map(str, SMALL_ALTERNATIVES))} that runs; a timm model with a fixed input size is built "
        f"with `img_size={SMALL_SIZE}` where its constructor takes that: the `input_size` column says "
        f"`(img_size={SMALL_SIZE})`; else it runs at its own input size), "
        f"ERK mask at {SPARSITY:.0%} sparsity, `prepare` with "
        "`Recipe.tost(total_steps=4, warmup=0.5, skip_pointwise=True, skip_branch='conv_bn')` (a ghost skip "
        "with a 1x1 conv branch at every conv), two SGD "
        "steps with `bind`, `step(model, 2)`, then the checks: (a) same object and class, (b) masked weights "
        "exactly zero, (c) prepared eval output == finalized eval output (max abs diff <= 1e-5 * max(1, scale)), "
        "(d) after `finalize`: original `state_dict` keys in order, no parametrizations, no `tost`, no instance "
        "`forward`, the original forward runs (twice). `baseline_exact` (e): a fresh build prepared with "
        f"`Recipe.baseline()` gives the eval output of a by-hand masked copy (1e-5 * scale; skipped above "
        f"{BASELINE_MAX_PARAMS / 1e6:.0f}M parameters).",
        "",
    ]
    try:
        from importlib.metadata import version

        versions = ", ".join(f"{d} {version(d)}" for d in ("torch", "torchvision", "timm"))
        lines += [f"Versions: {versions}.", ""]
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    total = {source: len(names) for source, names in _LISTED.items()}  # listed by this process, if it did

    lines += ["## Summary", ""]
    for source, label in (("tv", "torchvision"), ("timm", "timm")):
        mine = [r for r in rows if r["source"] == source]
        if not mine and source not in total:
            continue
        built = [r for r in mine if r["status"] != "not buildable"]
        ok = [r for r in built if _truthy(r["round_trip_ok"])]
        base = [r for r in built if r["baseline_exact"] != ""]
        base_ok = [r for r in base if _truthy(r["baseline_exact"])]
        done = ""
        if source in total and len(mine) < total[source]:
            done = f" ({len(mine)} of {total[source]} models run so far)"
        lines.append(
            f"- **{label}**: {len(ok)}/{len(built)} buildable round-trip = **{_pct(len(ok), len(built))}**; "
            f"{len(mine) - len(built)} not buildable; "
            f"{sum(r['failure'].startswith('timeout') for r in built)} of the failures are timeouts; "
            "all checks incl. baseline ok: "
            f"{sum(r['status'] == 'ok' for r in built)}/{len(built)}; baseline exact {len(base_ok)}/{len(base)}{done}"
        )
    traced = [r["traced"] for r in buildable if r["traced"]]
    full = sum(t == "full" for t in traced)
    partial = sum(t.startswith("partial") for t in traced)
    eager = sum(t == "eager" for t in traced)
    lines.append(f"- traced (buildable models that reached prepare): full {full}, partial {partial}, eager {eager}")

    def total_of(column: str) -> int:
        return sum(int(r[column]) for r in buildable if r[column] not in ("", None))

    with_neurons = sum(1 for r in buildable if r["ghost_neurons"] not in ("", "0"))
    with_skips = sum(1 for r in buildable if r["ghost_skips"] not in ("", "0"))
    lines.append(
        f"- ghost neuron sites: {total_of('ghost_neurons')} in {with_neurons} models; "
        f"ghost skip sites: {total_of('ghost_skips')} in {with_skips} models; "
        f"masked layers: {total_of('masked_layers')}"
    )
    prep = [float(r["prepare_s"]) for r in buildable if r["prepare_s"]]
    fin = [float(r["finalize_s"]) for r in buildable if r["finalize_s"]]
    walls = [float(r["wall_s"]) for r in rows if r["wall_s"]]
    if prep:
        lines.append(
            f"- prepare time: median {statistics.median(prep):.2f} s, max {max(prep):.1f} s; finalize: median "
            f"{statistics.median(fin) if fin else float('nan'):.3f} s; wall per model: median "
            f"{statistics.median(walls):.1f} s, total {sum(walls) / 3600:.1f} h"
        )
    lines.append("")

    timeouts = [r for r in failures if r["failure"].startswith("timeout")]
    errors = [r for r in failures if not r["failure"].startswith("timeout")]
    lines += [f"## Failures ({len(failures)})", ""]
    lines += [f"### Errors and failed invariants ({len(errors)})", ""]
    lines += _failure_table(errors)
    lines += [
        f"### Timeouts after the build ({len(timeouts)})",
        "",
        "Counted as failures, but they say more about this machine than about the library: "
        "the stage is where the time ran out.",
        "",
    ]
    lines += _failure_table(timeouts)

    lines += [
        f"## Not buildable on this machine ({len(broken)}, excluded from the denominators)",
        "",
        "A model is listed here when its build or its plain eager forward fails (at 64x64 and at its own size), "
        f"when it has more than `--max-params` parameters (counted on the meta device; "
        f"{args.max_params / 1e6:.0f}M in this sweep's last run: the first rows were run with 1.5e9, and every model "
        "above 600M that was built, 632M to 1.2B parameters, ran out of memory or time), when one eval forward "
        f"takes more than 1/{FORWARDS_NEEDED} of the time limit, when building it times out, or when it runs out "
        "of memory (`--max-mem-gb` per process, or killed by the kernel) at any stage; the stage says where.",
        "",
    ]
    if broken:
        lines += ["| source | model | params | stage | reason |", "|---|---|---|---|---|"]
        for r in broken:
            lines.append(f"| {r['source']} | {r['model']} | {r['params']} | {r['stage']} | {_cell(r['failure'])} |")
    else:
        lines.append("None.")
    lines.append("")

    lines += ["## All models", ""]
    shown = [c for c in COLUMNS if c not in ("stage",)]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in shown) + " |")
    lines.append("")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines))
    print(f"wrote {md_path} ({len(rows)} rows)", flush=True)


# --------------------------------------------------------------------------------------------


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
    if args.report:
        for source in ("tv", "timm"):
            list_models(source)  # for the "N of M run so far" counts
        write_report(args.out / "coverage.csv", args.markdown, args)
        return
    driver = Driver(args)
    driver.sweep()
    if driver.unknown:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
