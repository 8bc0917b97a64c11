"""Train a sparse timm model with the ToST recipe, built from timm's own training parts.

timm's model factory, ImageFolder dataset, transforms and loader, optimizer and scheduler
factories and ``ModelEmaV3``, with AMP, channels_last, gradient accumulation, checkpoints that
resume exactly, and DistributedDataParallel under torchrun. The recipe adds three lines to the
loop: ``tost.prepare`` before the optimizer, ``tost.bind(model, optimizer)`` (the schedule
counts optimizer steps, so accumulation needs nothing more), and the recipe's label smoothing
in the loss. At the end the model (and its EMA) is finalized and saved as a plain sparse
``state_dict`` that loads strictly into ``timm.create_model(NAME, num_classes=...)``.

    python examples/train_timm.py --data DATA --model resnet18 --epochs 30 --mask erk --sparsity 0.95
    python examples/train_timm.py --data DATA --model resnet50 --amp --channels-last --model-ema --set warmup=0.5
    torchrun --nproc-per-node=2 examples/train_timm.py --data DATA --model resnet18 --batch-size 64
    python examples/train_timm.py --data DATA --resume runs/NAME/last.pth

DATA is an image folder per split, one sub-folder per class: ``DATA/train/<class>/*.png`` and
``DATA/val/<class>/*.png`` (timm's ``create_dataset`` also finds ``validation``, ``eval``...).

Output folder: ``log.csv`` and ``log.jsonl`` (one row per epoch), ``last.pth`` (the checkpoint,
rewritten every epoch; ``--save-every N`` also keeps ``epoch-N.pth``), and at the end ``model.pt``
and ``model_ema.pt`` (finalized), ``mask.pt`` and ``summary.json``.

Exact resume: every epoch starts by seeding torch, numpy and ``random`` from (``--seed``, epoch,
rank), and the training sampler's order depends on the same, so a run resumed from the checkpoint
of epoch k repeats epochs k+1... of the uninterrupted run (bit for bit on CPU). Checkpoints are
written at epoch ends; a run that stops mid-epoch resumes from the last one.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from timm.data import create_dataset, create_loader, create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tost_surgery as tost

MASKS = ("random", "erk", "magnitude", "snip", "grasp", "synflow", "nm")
EVAL_SPLITS = ("val", "validation", "valid", "eval", "evaluation", "test")
console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:  # a log file or CI: wide lines, no live display
    console = Console(width=120)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", type=Path, required=True, help="folder with train/ and val/ image folders")
    add("--model", default="resnet18", help="any timm model name (created with pretrained=False)")
    add("--img-size", type=int, default=None, help="input size (default: the model's)")
    add("--epochs", type=int, default=30)
    add("--batch-size", type=int, default=128, help="per process")
    add("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--opt", default="sgd", help="timm optimizer name: sgd, momentum, adamw, lamb...")
    add("--lr", type=float, default=0.1)
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", type=float, default=5e-4)
    add("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    add("--sched", default="cosine", help="timm scheduler name: cosine, step, poly, constant...")
    add("--warmup-epochs", type=int, default=0, help="learning-rate warm-up (not the recipe's)")
    add("--warmup-lr", type=float, default=1e-5)
    add("--min-lr", type=float, default=0.0)
    add("--drop-path", type=float, default=None, help="stochastic depth rate")
    add("--scale", type=float, nargs=2, default=(0.08, 1.0), help="RandomResizedCrop area range")
    add("--color-jitter", type=float, default=0.4)
    add("--recipe", choices=("tost", "baseline"), default="tost")
    add("--set", action="append", default=[], metavar="FIELD=VALUE", help="any Recipe field, e.g. warmup=0.5")
    add("--mask", default="erk", help=f"{' | '.join(MASKS)} | FILE (a mask dict or a pruned state_dict)")
    add("--sparsity", type=float, default=0.95, help="fraction of the masked weights removed")
    add("--exclude", action="append", default=[], help="parameter pattern left dense, e.g. 'head.*'")
    add("--prune-batches", type=int, default=4, help="training batches SNIP / GraSP score on")
    add("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    add("--model-ema-decay", type=float, default=0.9998)
    add("--model-ema-warmup", action="store_true", help="ramp the EMA decay up (ModelEmaV3 use_warmup)")
    add("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA unless --amp-dtype)")
    add("--amp-dtype", choices=("float16", "bfloat16"), default=None)
    add("--channels-last", action="store_true")
    add("--workers", type=int, default=2, help="data-loading processes")
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--threads", type=int, default=None, help="torch CPU threads")
    add("--seed", type=int, default=0)
    add("--resume", type=Path, default=None, help="a checkpoint (last.pth or epoch-N.pth) to continue from")
    add("--save-every", type=int, default=0, help="also keep epoch-N.pth every N epochs")
    add("--output", type=Path, default=None, help="output folder (default: runs/<name>)")
    add("--no-progress", action="store_true", help="no live progress bars")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every mistake on the command line is an error line and exit code 2, before anything runs."""
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity is a fraction in (0, 1), found {args.sparsity}")
    for name in ("epochs", "batch_size", "grad_accum_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, found {getattr(args, name)}")
    if args.mask not in MASKS and not Path(args.mask).is_file():
        parser.error(f"--mask {args.mask!r} is neither one of {', '.join(MASKS)} nor a file")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if not timm.is_model(args.model):
        parser.error(f"--model {args.model!r} is not a timm model (see timm.list_models())")
    if args.resume is not None and not args.resume.is_file():
        parser.error(f"--resume {args.resume}: no such file")
    if not (args.data / "train").is_dir() or eval_folder(args.data) is None:
        parser.error(
            f"--data {args.data}: expected {args.data}/train/<class>/<image> and {args.data}/val/<class>/<image> "
            f"(or one of {', '.join(EVAL_SPLITS[1:])} instead of val)"
        )
    try:
        args.overrides = parse_overrides(args.set)
        build_recipe(args, total_steps=1)  # a wrong field or value is refused now, not after the data loads
    except tost.TostSurgeryError as error:
        parser.error(str(error))
    args.amp_dtype = args.amp_dtype or ("float16" if args.device == "cuda" else "bfloat16")
    name = f"{args.model}-{args.recipe}-{Path(args.mask).stem}-{args.sparsity:g}-s{args.seed}"
    args.output = args.output or Path("runs") / name


def eval_folder(root: Path) -> Path | None:
    return next((root / split for split in EVAL_SPLITS if (root / split).is_dir()), None)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``["warmup=0.5", "soft_activation=mish"]`` -> ``{"warmup": 0.5, "soft_activation": "mish"}``."""
    settings = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise tost.TostSurgeryError(f"--set takes FIELD=VALUE, found {pair!r}.\nHint: --set warmup=0.5")
        try:
            settings[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            settings[key] = raw  # a bare word: a string setting such as soft_activation=mish
    return settings


def build_recipe(args: argparse.Namespace, total_steps: int) -> tost.Recipe:
    if args.recipe == "tost":
        return tost.Recipe.tost(total_steps=total_steps, **args.overrides)
    return tost.Recipe.baseline(total_steps=total_steps, **args.overrides)


# --------------------------------------------------------------------------- processes and data


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(args: argparse.Namespace) -> Dist:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # processes share the cores
    if world == 1:
        return Dist(0, 1, device)
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), world, device)


def build_datasets(args):
    """timm's ImageFolder datasets; the evaluation set uses the training set's class indices."""
    train_set = create_dataset("", root=str(args.data), split="train", is_training=True)
    eval_set = create_dataset(
        "",
        root=str(eval_folder(args.data)),
        split="validation",
        search_split=False,
        class_map=train_set.reader.class_to_idx,
    )
    return train_set, eval_set, len(train_set.reader.class_to_idx)


def build_loaders(args, train_set, eval_set, data_config: dict, dist_: Dist):
    """The training loader from timm's ``create_loader``; an evaluation loader over this rank's share
    of the images (each image once on one rank, so the reduced metrics are exact)."""
    on_gpu = dist_.device.type == "cuda"
    common = dict(interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"])
    train_loader = create_loader(
        train_set,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        scale=tuple(args.scale),
        color_jitter=args.color_jitter,
        num_workers=args.workers,
        distributed=dist_.world > 1,
        use_prefetcher=on_gpu,
        device=dist_.device,
        pin_memory=on_gpu,
        persistent_workers=False,  # workers are re-seeded from the epoch's seed: exact resume
        **common,
    )
    if dist_.world > 1:
        train_loader.sampler.seed = args.seed  # DistributedSampler: the order depends on (seed, epoch)
    eval_set.transform = create_transform(
        data_config["input_size"], is_training=False, crop_pct=data_config["crop_pct"], **common
    )
    shard = torch.utils.data.Subset(eval_set, range(dist_.rank, len(eval_set), dist_.world))
    eval_loader = torch.utils.data.DataLoader(
        shard, batch_size=args.batch_size, num_workers=args.workers, pin_memory=on_gpu
    )
    return train_loader, eval_loader


def to_device(x: torch.Tensor, y: torch.Tensor, args, device: torch.device):
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


# --------------------------------------------------------------------------- masks


def make_mask(model: nn.Module, args, loader, input_size) -> dict[str, torch.Tensor]:
    """A mask from ``tost_surgery.masks``, or from a file."""
    exclude = tuple(args.exclude)
    if args.mask in ("random", "erk"):
        maker = tost.masks.random if args.mask == "random" else tost.masks.erk
        return maker(model, args.sparsity, seed=args.seed, exclude=exclude)
    if args.mask == "magnitude":
        return tost.masks.magnitude(model, args.sparsity, exclude=exclude)
    if args.mask in ("snip", "grasp"):
        batches = []
        for x, y in loader:
            batches.append(to_device(x, y, args, next(model.parameters()).device))
            if len(batches) == args.prune_batches:
                break
        maker = tost.masks.snip if args.mask == "snip" else tost.masks.grasp
        return maker(model, args.sparsity, batches, exclude=exclude)
    if args.mask == "synflow":
        return tost.masks.synflow(model, args.sparsity, input_shape=tuple(input_size), exclude=exclude)
    if args.mask == "nm":
        return tost.masks.nm(model, exclude=exclude)
    try:
        saved = torch.load(args.mask, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: say which, and stop
        fail(f"--mask {args.mask} is not a saved mask or state_dict ({type(error).__name__}).")
    if not isinstance(saved, dict) or not all(isinstance(value, torch.Tensor) for value in saved.values()):
        fail(f"--mask {args.mask} holds a {type(saved).__name__}, not a dict of tensors.")
    if all(value.dtype == torch.bool for value in saved.values()):
        return saved
    return tost.masks.from_state_dict(saved)  # a pruned checkpoint: its exact zeros are the pruned weights


def shared_mask(model: nn.Module, args, loader, input_size, dist_: Dist) -> dict[str, torch.Tensor]:
    """Rank 0 makes the mask; every rank receives the same one."""
    mask = make_mask(model, args, loader, input_size) if dist_.is_primary else None
    if dist_.world > 1:
        box = [{name: m.cpu() for name, m in mask.items()} if mask is not None else None]
        dist.broadcast_object_list(box, src=0, device=dist_.device if dist_.device.type == "cuda" else None)
        mask = box[0]
    return {name: m.cpu() for name, m in mask.items()}


# --------------------------------------------------------------------------- training


@dataclass
class Run:
    """What the loop updates: the prepared model, its wrapper, optimizer, scheduler, scaler, EMA, counters."""

    args: argparse.Namespace
    dist: Dist
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    net: nn.Module = None
    num_updates: int = 0
    """Updates the loop made (timm's count, for the learning rate and the EMA)."""
    optimizer_steps: int = 0
    """``optimizer.step()`` calls that ran (a step GradScaler skips is not one): the schedule's count."""
    trainable: tuple[bool, ...] = field(default=())

    def __post_init__(self) -> None:
        self.optimizer.register_step_post_hook(lambda *_: setattr(self, "optimizer_steps", self.optimizer_steps + 1))
        self.wrap()

    def wrap(self) -> None:
        """(Re)wrap in DDP. When the ghost skips retire, their parameters stop getting gradients and
        ``requires_grad`` turns off; a wrapper built after that leaves them out and runs at full speed."""
        self.trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self.dist.world == 1:
            self.net = self.model
            return
        self.net = None
        gc.collect()  # the replaced wrapper may sit in a reference cycle: free its hooks now
        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        self.net = DDP(self.model, device_ids=ids)

    def autocast(self):
        dtype = getattr(torch, self.args.amp_dtype)
        return torch.autocast(self.dist.device.type, dtype=dtype, enabled=self.args.amp)

    def update(self) -> None:
        """One optimizer step from the accumulated gradients; it also advances the ToST schedule (bound)."""
        if self.args.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if tuple(p.requires_grad for p in self.model.parameters()) != self.trainable:
            self.wrap()  # scaffolding retired in this step; DDP also hands every rank rank 0's buffers
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)


def train_one_epoch(run: Run, loader, epoch: int, progress: Progress, task) -> float:
    """One pass over ``loader``, an optimizer step every ``--grad-accum-steps`` micro-batches (and at the
    end); returns the mean training loss over all ranks."""
    args, model = run.args, run.model
    accum = args.grad_accum_steps
    last_accum = len(loader) % accum or accum  # the epoch's last update may have fewer micro-batches
    model.train()
    total, count = torch.zeros((), dtype=torch.float64, device=run.dist.device), 0
    for index, (x, y) in enumerate(loader):
        x, y = to_device(x, y, args, run.dist.device)
        need_update = index == len(loader) - 1 or (index + 1) % accum == 0
        micro_batches = last_accum if index >= len(loader) - last_accum else accum
        no_sync = run.net.no_sync() if isinstance(run.net, DDP) and not need_update else contextlib.nullcontext()
        with no_sync:
            with run.autocast():
                loss = F.cross_entropy(run.net(x), y, label_smoothing=tost.label_smoothing(model))
            run.scaler.scale(loss / micro_batches).backward()
        total += loss.detach().double() * len(y)  # no device sync per step
        count += len(y)
        if need_update:
            run.update()
        progress.update(task, advance=1, info="" if progress.disable else f"epoch {epoch}  loss {loss.item():.3f}")
    return reduce_sums(torch.stack([total, torch.tensor(float(count), device=total.device)]), run.dist).item()


def reduce_sums(sums: torch.Tensor, dist_: Dist) -> torch.Tensor:
    if dist_.world > 1:
        dist.all_reduce(sums)
    return sums[:-1] / sums[-1]


@torch.no_grad()
def evaluate(model: nn.Module, loader, run: Run) -> dict[str, float]:
    """Cross-entropy (no smoothing), top-1 and top-5 accuracy over the whole evaluation set."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=run.dist.device)
    for x, y in loader:
        x, y = to_device(x, y, run.args, run.dist.device)
        with run.autocast():
            out = model(x).float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices == y[:, None]
        count = torch.tensor(len(y), device=y.device)
        sums += torch.stack(
            [F.cross_entropy(out, y, reduction="sum"), top[:, 0].sum(), top.any(dim=1).sum(), count]
        ).double()
    model.train(was_training)
    loss, top1, top5 = reduce_sums(sums, run.dist).tolist()
    return {"loss": loss, "top1": top1, "top5": top5}


def scaffolding(model: nn.Module) -> str:
    """Which techniques' scaffolding is in the graph now (``retired`` once all of it has left)."""
    status = tost.status(model)
    active = [name for name, t in status.techniques.items() if t.scaffolding and t.state == "active"]
    return "+".join(active) or ("retired" if any(t.scaffolding for t in status.techniques.values()) else "none")


# --------------------------------------------------------------------------- checkpoints and logs


def save_checkpoint(path: Path, run: Run, epoch: int, mask, recipe: tost.Recipe, rows: list[dict]) -> None:
    state = {
        "epoch": epoch,
        "num_updates": run.num_updates,
        "optimizer_steps": run.optimizer_steps,
        "model_name": run.args.model,
        "recipe": recipe.to_dict(),
        "mask": mask,
        "state_dict": run.model.state_dict(),
        "state_dict_ema": run.ema.module.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict(),
        "log": rows,
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)  # a run killed while saving keeps the previous checkpoint


def load_checkpoint(path: Path, args, recipe: tost.Recipe) -> dict:
    """The checkpoint, refused with a clear message when it belongs to another model or recipe."""
    hint = "Hint: pass last.pth or epoch-N.pth from the output folder of a run of this script."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: say which, and stop
        fail(f"--resume {path} is not a checkpoint of this script ({type(error).__name__}).\n{hint}")
    if not isinstance(state, dict) or not {"recipe", "model_name", "state_dict"} <= set(state):
        fail(f"--resume {path} is not a checkpoint of this script.\n{hint}")
    if state["model_name"] != args.model:
        fail(f"--resume {path} holds a {state['model_name']}, not a {args.model}.\nHint: --model {state['model_name']}")
    saved = tost.Recipe.from_dict(state["recipe"])
    if saved != recipe:
        changed = {k: v for k, v in saved.to_dict().items() if v != getattr(recipe, k)}
        now = {k: getattr(recipe, k) for k in changed}
        fail(
            f"--resume {path} was trained with another recipe.\n  checkpoint: {changed}\n  now:        {now}\n"
            "Hint: pass the same --recipe, --set, --epochs, --batch-size and --grad-accum-steps as that run."
        )
    return state


def fail(message: str) -> NoReturn:
    """An error line and exit code 2, as argparse does for a bad option."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def restore(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["state_dict"])
    if run.ema is not None:
        if state["state_dict_ema"] is None:
            fail("--model-ema: the checkpoint has no EMA.\nHint: resume it without --model-ema.")
        run.ema.module.load_state_dict(state["state_dict_ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.num_updates, run.optimizer_steps = state["num_updates"], state["optimizer_steps"]


class EpochLog:
    """One row per epoch, printed and written to ``log.csv`` and ``log.jsonl``."""

    def __init__(self, out: Path, rows: list[dict]) -> None:
        self.out, self.rows = out, list(rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.out / "log.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.rows)
        (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        ema = f"  ema {row['ema_val_top1']:.2%}" if "ema_val_top1" in row else ""
        console.print(
            f"epoch {row['epoch']:>3}  loss {row['train_loss']:.4f}  val {row['val_top1']:.2%}{ema}  "
            f"lr {row['lr']:.4g}  smoothing {row['label_smoothing']:.3f}  scaffolding {row['scaffolding']}  "
            f"{row['seconds']:.1f}s"
        )


def progress_bars(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
    )


# --------------------------------------------------------------------------- main


def setup(args: argparse.Namespace, dist_: Dist):
    """Model, data, recipe, mask, prepare, optimizer, scheduler, scaler, EMA; restored when resuming."""
    train_set, eval_set, num_classes = build_datasets(args)
    random_seed(args.seed)  # the same initial weights on every rank
    extra = {"drop_path_rate": args.drop_path} if args.drop_path is not None else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes, **extra).to(dist_.device)
    data_config = resolve_data_config({"img_size": args.img_size} if args.img_size else {}, model=model)
    train_loader, eval_loader = build_loaders(args, train_set, eval_set, data_config, dist_)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    recipe = build_recipe(args, total_steps=args.epochs * updates_per_epoch)
    state = load_checkpoint(args.resume, args, recipe) if args.resume else None
    if state is not None:
        mask = state["mask"]
    else:
        mask = shared_mask(model, args, train_loader, data_config["input_size"], dist_)
    tost.prepare(model, mask, recipe)
    if dist_.world > 1:
        tost.check_masks_match(model)
    if recipe.rescale_rule == "gradinit" and recipe.rescale_init and state is None:
        tost.init.gradinit(model, [to_device(x, y, args, dist_.device) for x, y in take(train_loader, 6)])
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    tost.bind(model, optimizer)  # every optimizer.step() advances the schedule by one
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    scaler = torch.amp.GradScaler(dist_.device.type, enabled=args.amp and args.amp_dtype == "float16")
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    run = Run(args, dist_, model, optimizer, scheduler, scaler, ema)
    if state is not None:
        restore(run, state)
    return run, recipe, mask, state, train_loader, eval_loader, num_classes


def take(loader, count: int):
    for index, batch in enumerate(loader):
        if index == count:
            return
        yield batch


def run_epoch(run: Run, epoch: int, train_loader, eval_loader, recipe, progress, task) -> dict:
    """Train one epoch, evaluate the model and its EMA; the epoch's log row."""
    args, start = run.args, time.perf_counter()
    random_seed(args.seed + 10_000 * epoch, run.dist.rank)  # augmentation, dropout, shuffling: exact resume
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)
    train_loss = train_one_epoch(run, train_loader, epoch, progress, task)
    if run.dist.world > 1:
        distribute_bn(run.model, run.dist.world, reduce=True)  # one set of BatchNorm statistics for all ranks
    row = {
        "epoch": epoch,
        "updates": run.num_updates,
        "optimizer_steps": run.optimizer_steps,
        "lr": run.optimizer.param_groups[0]["lr"],
        "label_smoothing": tost.label_smoothing(run.model),
        "scaffolding": scaffolding(run.model),
        "train_loss": train_loss,
    }
    row.update({f"val_{k}": v for k, v in evaluate(run.model, eval_loader, run).items()})
    if run.ema is not None:
        if run.dist.world > 1:
            distribute_bn(run.ema.module, run.dist.world, reduce=True)
        row.update({f"ema_val_{k}": v for k, v in evaluate(run.ema.module, eval_loader, run).items()})
    if run.scheduler is not None:
        run.scheduler.step(epoch, row["val_top1"])
    row["seconds"] = time.perf_counter() - start
    return row


def finish(run: Run, recipe: tost.Recipe, mask, num_classes: int, log: EpochLog, seconds: float) -> dict:
    """Finalize the model and its EMA, save them with the mask; the run's summary."""
    args, out = run.args, run.args.output
    tost.finalize(run.model)  # the original timm class and forward, plain sparse weights
    torch.save(run.model.state_dict(), out / "model.pt")
    saved = ["model.pt"]
    if run.ema is not None:  # ModelEmaV3 copied the schedule's step too: the copy has retired with the model
        tost.finalize(run.ema.module)
        torch.save(run.ema.module.state_dict(), out / "model_ema.pt")
        saved.append("model_ema.pt")
    torch.save(mask, out / "mask.pt")
    final, density = log.rows[-1], tost.report(run.model).density
    summary = {
        "model": args.model,
        "num_classes": num_classes,
        "recipe": args.recipe,
        "recipe_settings": recipe.to_dict(),
        "mask": args.mask,
        "sparsity_asked": args.sparsity,
        "kept_weights": sum(int(m.sum()) for m in mask.values()),
        "sparsity": 1 - density,
        "epochs": args.epochs,
        "updates": run.num_updates,
        "final": final,
        "train_seconds": seconds,
        "saved": saved + ["mask.pt", "log.csv", "log.jsonl", "last.pth"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = Table(title="Summary", show_header=False)
    for key, value in [
        (
            "model",
            f"{args.model}, {num_classes} classes, {summary['kept_weights']:,} masked weights kept "
            f"({1 - density:.2%} sparse, {args.mask} mask)",
        ),
        ("recipe", f"{args.recipe}, {args.epochs} epoch{'s' * (args.epochs > 1)} = {run.num_updates:,} updates"),
        (
            "val top-1 (final)",
            f"{final['val_top1']:.2%}" + (f", EMA {final['ema_val_top1']:.2%}" if "ema_val_top1" in final else ""),
        ),
        ("time", f"{seconds:.1f}s"),
        ("saved", f"{out}/{', '.join(summary['saved'])}"),
    ]:
        table.add_row(key, value)
    console.print(table)
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    dist_ = init_distributed(args)
    try:
        run, recipe, mask, state, train_loader, eval_loader, num_classes = setup(args, dist_)
    except tost.TostSurgeryError as error:  # a mask or recipe that does not fit this model: its message and hint
        fail(str(error))
    if dist_.is_primary:
        args.output.mkdir(parents=True, exist_ok=True)
        console.print(
            f"[bold]{args.model}[/]: {len(train_loader.dataset):,} train / {len(eval_loader.dataset.dataset):,} "
            f"val images, {num_classes} classes, {dist_.world} process{'es' * (dist_.world > 1)} -> {args.output}\n"
            f"recipe {args.recipe}, {recipe.total_steps:,} optimizer steps; {args.mask} mask: "
            f"{tost.report(run.model).density:.2%} of the masked weights kept"
        )
    if state is not None and dist_.is_primary:
        console.print(f"resumed from {args.resume}: epoch {state['epoch']} done, {state['num_updates']:,} updates")
    log = EpochLog(args.output, state["log"] if state else [])
    start_epoch = state["epoch"] + 1 if state else 1
    start = time.perf_counter()
    with progress_bars(dist_.is_primary and not args.no_progress) as progress:
        task = progress.add_task("train", total=(args.epochs - start_epoch + 1) * len(train_loader), info="")
        for epoch in range(start_epoch, args.epochs + 1):
            row = run_epoch(run, epoch, train_loader, eval_loader, recipe, progress, task)
            if dist_.is_primary:
                log.append(row)
                save_checkpoint(args.output / "last.pth", run, epoch, mask, recipe, log.rows)
                if args.save_every and epoch % args.save_every == 0:
                    save_checkpoint(args.output / f"epoch-{epoch}.pth", run, epoch, mask, recipe, log.rows)
    summary = finish(run, recipe, mask, num_classes, log, time.perf_counter() - start) if dist_.is_primary else None
    if dist_.world > 1:  # tear down while the interpreter is fully alive (a wrapper left to exit can abort in gloo)
        run.net = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
