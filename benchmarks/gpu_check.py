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

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import tost_surgery as tost

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


def masked_reference(model: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the plain model whose weights are multiplied by the mask."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in mask.items():
            reference.get_parameter(name).mul_(m.to(reference.get_parameter(name).dtype))
    return reference


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


def check_model(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    base = build(name, args.image_size)
    mask = tost.masks.erk(base, args.sparsity, seed=0)
    x0, y0 = batch(0, args.batch, args.image_size, device)
    row: dict[str, Any] = {"model": name, "mode": mode, "memory_format": args.memory_format}

    # 1. baseline == masked reference (train mode, fp32)
    reference = masked_reference(base, mask).to(device).to(memory_format=fmt).train()
    plain = tost.prepare(copy.deepcopy(base), mask, tost.Recipe.baseline()).to(device).to(memory_format=fmt).train()
    with torch.no_grad():
        row["baseline_vs_reference"] = max_diff(plain(x0.contiguous(memory_format=fmt)), reference(x0))
    del reference, plain

    # 2. train with the full recipe
    model = tost.prepare(copy.deepcopy(base), mask, tost.Recipe.tost(args.steps, warmup=0.5))
    model.to(device).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tost.bind(model, optimizer)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
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
    row["train_s"] = time.perf_counter() - start
    row["losses_finite"] = all(math.isfinite(v) for v in losses)
    row["first_loss"], row["last_loss"] = losses[0], losses[-1]
    row["steps_counted"] = model.tost.schedule.steps_taken
    row["scaler_skipped"] = args.steps - model.tost.schedule.steps_taken
    row["masked_nonzero"] = masked_nonzero(model, mask)
    row["conv_weights_channels_last"] = (
        all(
            p.is_contiguous(memory_format=torch.channels_last)
            for n, p in model.named_parameters()
            if p.dim() == 4 and "tost." not in n
        )
        if fmt == torch.channels_last
        else None
    )

    # 3. finalize: the original class, the same eval output
    model.eval()
    with torch.no_grad():
        before = model(x0.contiguous(memory_format=fmt))
    cls = type(base)
    tost.finalize(model)
    with torch.no_grad():
        after = model(x0.contiguous(memory_format=fmt))
    row["finalize_class_kept"] = type(model) is cls
    row["finalize_vs_prepared"] = max_diff(after, before)

    # 4. torch.compile of the prepared model in warm-up
    if args.compile:
        torch.manual_seed(0)
        eager = tost.prepare(copy.deepcopy(base), mask, tost.Recipe.tost(args.steps)).to(device)
        eager.to(memory_format=fmt).train()
        compiled = torch.compile(copy.deepcopy(eager))
        with torch.no_grad():
            row["compile_vs_eager"] = max_diff(compiled(x0.contiguous(memory_format=fmt)), eager(x0))
    row["ok"] = (
        row["baseline_vs_reference"] <= args.atol
        and row["losses_finite"]
        and row["masked_nonzero"] == 0
        and row["steps_counted"] + row["scaler_skipped"] == args.steps
        and row["finalize_class_kept"]
        and row["finalize_vs_prepared"] <= args.atol
        and row.get("compile_vs_eager", 0.0) <= args.compile_atol
        and row["conv_weights_channels_last"] is not False
    )
    return row


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; torch.cuda.is_available() is False (or pass --device cpu)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.models:
        for mode in args.modes:
            try:
                rows.append(check_model(name, mode, args, device))
            except Exception as error:  # noqa: BLE001 - report every model
                rows.append(
                    {
                        "model": name,
                        "mode": mode,
                        "ok": False,
                        "error": "".join(traceback.format_exception(error))[-2000:],
                    }
                )
            print(json.dumps(rows[-1]), flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    table = Table(title=f"GPU check on {where} (torch {torch.__version__})")
    for column in (
        "model",
        "mode",
        "baseline vs ref",
        "losses",
        "skipped",
        "masked != 0",
        "finalize vs prepared",
        "compile vs eager",
        "ok",
    ):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row(row["model"], row["mode"], "error", "", "", "", "", "", "NO")
            continue
        table.add_row(
            row["model"],
            row["mode"],
            f"{row['baseline_vs_reference']:.1e}",
            f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}",
            str(row["scaler_skipped"]),
            str(row["masked_nonzero"]),
            f"{row['finalize_vs_prepared']:.1e}",
            f"{row['compile_vs_eager']:.1e}" if "compile_vs_eager" in row else "-",
            "yes" if row["ok"] else "NO",
        )
    Console(width=160).print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        machine = {"device": where, "torch": torch.__version__, "argv": sys.argv}
        (args.out / "gpu_check.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
