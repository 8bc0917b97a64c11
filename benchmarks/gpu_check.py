"""GPU check: prepared models train on CUDA with autocast and channels_last, masks stay exact.

For each model (torchvision / timm, random init, ERK mask) and each precision mode, on one CUDA
device:

    1. ``Recipe.baseline()`` in train mode matches the masked reference (weights multiplied by
       the mask, no surgery) on the same batch: the surgery adds nothing when every technique is off;
    2. ``Recipe.tost`` trains ``--steps`` SGD steps (the scaffolding retires half-way) under
       ``torch.autocast`` (bf16; fp16 with a ``GradScaler``) in ``--memory-format``; every
       loss is finite, masked weights stay exactly zero and the schedule counted every step;
    3. ``finalize`` hands back the original class whose eval output equals the prepared model's;
    4. (``--compile``) ``torch.compile`` of the prepared model in warm-up matches eager.

Matmuls run in full fp32 (TF32 off) for the comparisons, so a mismatch is a bug, not rounding.

    python benchmarks/gpu_check.py                       # all models, bf16 and fp16, channels_last
    python benchmarks/gpu_check.py --models resnet18 --modes fp32 --out /tmp/gpu
    python benchmarks/gpu_check.py --report --out /tmp/gpu     # the table again, from gpu_check.json

This file runs the checks and saves them (``gpu_check.json``); ``gpu_check_report.py`` prints
the table from what was saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import masked_copy, read_json, write_atomic  # noqa: E402
from gpu_check_report import print_report  # noqa: E402
from torch import nn  # noqa: E402

import tost_surgery as tost  # noqa: E402

MODELS = {
    # name -> (library, constructor name, kwargs)
    "resnet18": ("torchvision", "resnet18", {}),
    "mobilenet_v2": ("torchvision", "mobilenet_v2", {}),
    "convnext_tiny": ("torchvision", "convnext_tiny", {}),
    "efficientnet_b0": ("timm", "efficientnet_b0", {}),
    "regnety_004": ("timm", "regnety_004", {}),
    "vit_tiny": ("timm", "vit_tiny_patch16_224", {}),
    "convnext_atto": ("timm", "convnext_atto", {}),
}
MODES = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(name: str, image_size: int) -> nn.Module:
    library, ctor, kwargs = MODELS[name]
    if library == "torchvision":
        import torchvision.models as tv

        return getattr(tv, ctor)(num_classes=10, **kwargs)
    import timm

    extra = {"img_size": image_size} if name.startswith("vit") else {}
    return timm.create_model(ctor, pretrained=False, num_classes=10, **kwargs, **extra)


def batch(step: int, size: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 3, image_size, image_size, generator=generator)
    return x.to(device), torch.randint(0, 10, (size,), generator=generator).to(device)


def masked_nonzero(model: nn.Module, mask: dict[str, torch.Tensor]) -> int:
    """Masked entries not exactly zero, in the effective weights and the trainable originals."""
    count = 0
    for name, m in mask.items():
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        drop = ~m.to(getattr(module, attr).device)
        count += int((getattr(module, attr).detach()[drop] != 0).sum())
        count += int((module.parametrizations[attr].original.detach()[drop] != 0).sum())
    return count


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- the checks


def check_model(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every check on one model in one precision mode: a row of measured values and ``ok``."""
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    base = build(name, args.image_size)
    mask = tost.masks.erk(base, args.sparsity, seed=0)
    x0, _ = batch(0, args.batch, args.image_size, device)
    row: dict[str, Any] = {"model": name, "mode": mode, "memory_format": args.memory_format}
    row["baseline_vs_reference"] = baseline_vs_reference(base, mask, x0, device, fmt)
    model = tost.prepare(copy.deepcopy(base), mask, tost.Recipe.tost(args.steps, warmup=0.5))
    model.to(device).to(memory_format=fmt)
    row.update(train(model, mode, args, device, fmt))
    row["masked_nonzero"] = masked_nonzero(model, mask)
    row["conv_weights_channels_last"] = conv_weights_channels_last(model) if fmt == torch.channels_last else None
    row.update(finalize_matches(model, type(base), x0.contiguous(memory_format=fmt)))
    if args.compile:
        row["compile_vs_eager"] = compile_vs_eager(base, mask, x0, args, device, fmt)
    row["ok"] = is_ok(row, args)
    return row


def baseline_vs_reference(
    base: nn.Module, mask: dict, x: torch.Tensor, device: torch.device, fmt: torch.memory_format
) -> float:
    """1. ``Recipe.baseline()`` against the masked reference: train mode, fp32, the same batch."""
    reference = masked_copy(base, mask).to(device).to(memory_format=fmt).train()
    plain = tost.prepare(copy.deepcopy(base), mask, tost.Recipe.baseline()).to(device).to(memory_format=fmt).train()
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout and stochastic-depth draws in both
        ours = plain(x.contiguous(memory_format=fmt))
        torch.manual_seed(1)
        return max_diff(ours, reference(x))


def train(
    model: nn.Module, mode: str, args: argparse.Namespace, device: torch.device, fmt: torch.memory_format
) -> dict[str, Any]:
    """2. ``--steps`` SGD steps under autocast in ``mode`` (a GradScaler for fp16): losses and steps counted."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tost.bind(model, optimizer)
    dtype = AUTOCAST_DTYPES[mode]
    scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = batch(step, args.batch, args.image_size, device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x.contiguous(memory_format=fmt))
        loss = F.cross_entropy(out.float(), y, label_smoothing=tost.label_smoothing(model))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    status = tost.status(model)
    counted = status.step
    warmup = max((t.warmup_steps for t in status.techniques.values() if t.scaffolding), default=0)
    if counted < warmup:  # GradScaler skipped steps (fp16 overflow): count the rest, so finalize can check
        tost.step(model, warmup - counted)
    return {
        "train_s": train_s,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps_counted": counted,
        "scaler_skipped": args.steps - counted,
    }


def conv_weights_channels_last(model: nn.Module) -> bool:
    """Whether every 4-d weight of the model's own layers (not the scaffolding's) is channels_last."""
    return all(
        p.is_contiguous(memory_format=torch.channels_last)
        for n, p in model.named_parameters()
        if p.dim() == 4 and "tost." not in n
    )


def finalize_matches(model: nn.Module, cls: type, x: torch.Tensor) -> dict[str, Any]:
    """3. ``finalize`` keeps the class ``cls`` and the prepared model's eval output on ``x``."""
    model.eval()
    with torch.no_grad():
        before = model(x)
    tost.finalize(model)
    with torch.no_grad():
        after = model(x)
    return {"finalize_class_kept": type(model) is cls, "finalize_vs_prepared": max_diff(after, before)}


def compile_vs_eager(
    base: nn.Module,
    mask: dict,
    x: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    fmt: torch.memory_format,
) -> float:
    """4. ``torch.compile`` of the prepared model in warm-up against eager."""
    torch.manual_seed(0)
    eager = tost.prepare(copy.deepcopy(base), mask, tost.Recipe.tost(args.steps)).to(device)
    eager.to(memory_format=fmt).train()
    compiled = torch.compile(copy.deepcopy(eager))
    with torch.no_grad():
        return max_diff(compiled(x.contiguous(memory_format=fmt)), eager(x))


def is_ok(row: dict[str, Any], args: argparse.Namespace) -> bool:
    return (
        row["baseline_vs_reference"] <= args.atol
        and row["losses_finite"]
        and row["masked_nonzero"] == 0
        and row["steps_counted"] + row["scaler_skipped"] == args.steps
        and row["finalize_class_kept"]
        and row["finalize_vs_prepared"] <= args.atol
        and row.get("compile_vs_eager", 0.0) <= args.compile_atol
        and row["conv_weights_channels_last"] is not False
    )


def run_checks(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """A row per (model, mode), printed as JSON as it comes; a check that raises is a row with ``error``."""
    rows = []
    for name in args.models:
        for mode in args.modes:
            try:
                rows.append(check_model(name, mode, args, device))
            except Exception as error:  # noqa: BLE001 - report every model
                text = "".join(traceback.format_exception(error))[-2000:]
                rows.append({"model": name, "mode": mode, "ok": False, "error": text})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--atol", type=float, default=1e-4, help="tolerance of the fp32 comparisons")
    parser.add_argument("--compile", action="store_true", help="also compare torch.compile with eager")
    parser.add_argument("--compile-atol", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.json here")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu for a smoke run")
    parser.add_argument("--report", action="store_true", help="only print the table from <out>/gpu_check.json")
    args = parser.parse_args(argv)
    if args.report and args.out is None:
        parser.error("--report reads <out>/gpu_check.json: pass --out DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print_report(read_json(args.out / "gpu_check.json"))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; torch.cuda.is_available() is False (or pass --device cpu)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = run_checks(args, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = {"machine": {"device": where, "torch": torch.__version__, "argv": sys.argv}, "rows": rows}
    print_report(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "gpu_check.json", json.dumps(report, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
