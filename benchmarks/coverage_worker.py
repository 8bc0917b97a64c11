"""One model of the coverage sweep, in its own process: build, prepare, train, finalize, check.

``Worker.run`` saves the row (the columns below) to a JSON file after every stage, so that a
model killed at its time limit still says how far it got; ``benchmarks/coverage.py`` appends
the rows to the CSV and ``coverage_report.py`` renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
import warnings
from pathlib import Path

from _common import masked_copy, write_atomic
from coverage_checks import compare, describe, first_tensor, fmt, is_oom, masked_nonzero, restore_buffers, tensors

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
    # Extra columns (after the fourteen above, whose order the smoke test pins).
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


def listed_counts() -> dict[str, int]:
    """How many models each source has, for the sources this process has listed."""
    return {source: len(names) for source, names in _LISTED.items()}


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
        self.x = self.mask = self.reference = self.y_reference = None
        self.save()

    # -- bookkeeping ------------------------------------------------------------------------
    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.row))

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
        model = self._build()
        if model is None:  # not buildable here: the row says why
            return
        self.stage("mask")
        self.mask = tost.masks.erk(model, SPARSITY, seed=0)
        do_baseline = self.row["params"] <= BASELINE_MAX_PARAMS
        if do_baseline:
            self._make_reference(model)
        self._round_trip(model)
        del model  # the baseline check builds a fresh copy: free this one first
        if do_baseline:
            self._check_baseline()
        if not self.row["status"]:
            self.row["status"] = "ok"
        self.row["stage"] = "done"

    # -- stages: build and input --------------------------------------------------------------
    def _build(self):
        """Stages meta, build and input: the model (its input in ``self.x``), or None if not buildable here."""
        self.stage("meta")  # the parameter count on the meta device first: cheap, and decides "too big"
        if self._is_too_big(self._meta_params()):
            return None
        self.stage("build")
        small = self.build_small() if self.fixed_size() else None
        model = small[0] if small else self.create()
        if self._is_too_big(sum(p.numel() for p in model.parameters())):
            return None
        self.stage("input")
        self.x, forward_s = small[1:] if small else self.pick_input(model)
        if self._is_too_slow(forward_s):
            return None
        return model

    def _meta_params(self) -> int | None:
        try:
            return sum(p.numel() for p in self.create("meta").parameters())
        except Exception:  # noqa: BLE001 - count after the real build instead
            return None

    def _is_too_big(self, params: int | None) -> bool:
        if params is None:
            return False
        self.row["params"] = params
        if params <= self.args.max_params:
            return False
        self.not_buildable(f"too big: {params / 1e6:.0f}M parameters > --max-params {self.args.max_params:.3g}")
        return True

    def _is_too_slow(self, forward_s: float) -> bool:
        if forward_s <= self.args.timeout / FORWARDS_NEEDED:
            return False
        self.not_buildable(
            f"too slow on this machine: one eval forward at {self.row['input_size']} takes {forward_s:.1f} s, "
            f"the checks need ~{FORWARDS_NEEDED} (--timeout {self.args.timeout:g} s)"
        )
        return True

    def _make_reference(self, model) -> None:
        """The by-hand masked copy for (e), and its eval output (before ``prepare`` changes ``model``)."""
        import torch

        self.stage("reference")
        self.reference = masked_copy(model, self.mask)
        self.reference.eval()
        with torch.no_grad():
            self.y_reference = tensors(self.reference(self.x))

    # -- stages: the round trip (a)-(d) -----------------------------------------------------------
    def _round_trip(self, model) -> None:
        """Prepare, train to the end of the schedule, finalize; ``round_trip_ok`` says whether (a)-(d) held."""
        cls, original_keys = type(model), list(model.state_dict().keys())
        returned = self._prepare(model)
        problems: list[str] = []
        if returned is not model or type(model) is not cls:
            problems.append(f"(a) prepare returned a {type(returned).__name__}, not the model itself")
        self.save()
        self._train(model)
        self.stage("checks")
        problems += self._check_prepared(model, cls)
        y_prepared = self._eval(model)
        problems += self._finalize(model, cls)
        self.stage("after finalize")
        problems += self._leftovers(model, original_keys)
        problems += self._outputs_after_finalize(model, y_prepared)
        self.row["round_trip_ok"] = not problems
        if problems:
            self.fail("; ".join(problems))
        self.save()

    def _prepare(self, model):
        """Stages prepare (timed) and inspect: what ``prepare`` made of the model, from ``tost.status``."""
        import torch

        import tost_surgery as tost

        self.stage("prepare")
        t0 = time.perf_counter()
        returned = tost.prepare(model, self.mask, tost.Recipe.tost(**SWEEP_RECIPE))
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
        return returned

    def _train(self, model) -> None:
        """Stage train: two SGD steps (label-smoothed cross-entropy) with ``bind``, then the schedule's end."""
        import torch

        import tost_surgery as tost

        self.stage("train")
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        tost.bind(model, optimizer)
        for _ in range(2):
            out = first_tensor(model(self.x))
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

    def _check_prepared(self, model, cls: type) -> list[str]:
        """(a) the class, (b) masked effective weights exactly zero, after training."""
        problems = []
        if type(model) is not cls:
            problems.append(f"(a) class changed to {type(model).__name__}")
        nonzero = masked_nonzero(model, self.mask)
        if nonzero:
            problems.append(f"(b) masked effective weights not zero: {nonzero}")
        return problems

    def _eval(self, model) -> list:
        import torch

        model.eval()
        with torch.no_grad():
            return tensors(model(self.x))

    def _finalize(self, model, cls: type) -> list[str]:
        """Stage finalize (timed): (a) it hands back the same object and class."""
        import tost_surgery as tost

        self.stage("finalize")
        t0 = time.perf_counter()
        finalized = tost.finalize(model)
        self.row["finalize_s"] = round(time.perf_counter() - t0, 3)
        if finalized is not model or type(model) is not cls:
            return ["(a) finalize returned another object or class"]
        return []

    def _leftovers(self, model, original_keys: list[str]) -> list[str]:
        """(d) nothing of the surgery left: the original keys in order, no parametrizations, no ``tost``,
        no instance ``forward``; (b) masked weights still zero."""
        from torch.nn.utils import parametrize

        problems = []
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
        nonzero = masked_nonzero(model, self.mask)
        if nonzero:
            problems.append(f"(b) masked weights not zero after finalize: {nonzero}")
        return problems

    def _outputs_after_finalize(self, model, y_prepared: list) -> list[str]:
        """(c) the finalized eval output equals the prepared one; (d) the original forward runs twice alike."""
        import torch

        try:
            with torch.no_grad():
                y_final = tensors(model(self.x))
                y_again = tensors(model(self.x))
        except Exception as error:  # noqa: BLE001
            return [f"(d) original forward fails after finalize: {describe(error)}"]
        problems = []
        diff, ok = compare(y_prepared, y_final, relative=1e-5, floor=1.0)
        self.row["round_trip_diff"] = fmt(diff)
        if not ok:
            problems.append(f"(c) finalize changed the eval output: max diff {fmt(diff)}")
        diff2, ok2 = compare(y_final, y_again, relative=0.0, floor=1.0)
        if not ok2:
            problems.append(f"(d) original forward not repeatable after finalize: max diff {fmt(diff2)}")
        return problems

    # -- stage: the baseline (e) ----------------------------------------------------------------
    def _check_baseline(self) -> None:
        """(e) a fresh build prepared with ``Recipe.baseline()`` gives the masked copy's eval output."""
        import torch

        import tost_surgery as tost

        self.stage("baseline")
        try:
            fresh = self.create()
            fresh.load_state_dict(self.reference.state_dict())
            self.reference = None  # free it before prepare (memory limit)
            tost.prepare(fresh, self.mask, tost.Recipe.baseline())
            fresh.eval()
            with torch.no_grad():
                y_baseline = tensors(fresh(self.x))
            diff, ok = compare(self.y_reference, y_baseline, relative=1e-5, floor=0.0)
            self.row["baseline_diff"] = fmt(diff)
            self.row["baseline_exact"] = ok
            if not ok:
                self.fail(f"(e) baseline graph differs from the masked model: max diff {fmt(diff)}")
        except Exception as error:  # noqa: BLE001
            self.row["baseline_exact"] = False
            self.fail(f"(e) baseline: {describe(error)}")


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


def noop() -> None:
    pass


def child_main(args: argparse.Namespace, errlog: str) -> None:
    """Entry of a model process (forked by the server): own process group, stderr to ``errlog``, one thread."""
    os.setsid()  # the driver kills the whole group on timeout
    err = os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(out, 1)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    worker_main(args)
