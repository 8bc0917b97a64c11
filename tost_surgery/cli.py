"""The ``tost-surgery`` command: see what prepare will do, and what a checkpoint keeps."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text
from torch import nn

from . import masks
from ._errors import TostSurgeryError, did_you_mean
from ._plan import plan
from ._recipe import Recipe
from ._report import report

MASK_METHODS = ("erk", "random", "magnitude", "synflow", "nm")


def build_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """``tv:NAME``, ``timm:NAME`` or ``module:callable`` -> (model, default input size or None)."""
    source, _, name = spec.partition(":")
    if not name:
        raise TostSurgeryError(
            f"Model {spec!r} is not SOURCE:NAME.\nHint: tv:resnet18, timm:resnet50, mypkg.nets:build"
        )
    if source == "tv":
        torchvision = _import_extra("torchvision")
        known = torchvision.models.list_models()
        if name not in known:
            raise TostSurgeryError(
                f"torchvision has no model {name!r}." + did_you_mean(name, known)
                + "\nHint: torchvision.models.list_models() lists them."
            )
        return torchvision.models.get_model(name, weights=None), (3, 224, 224)
    if source == "timm":
        timm = _import_extra("timm")
        if not timm.is_model(name):
            raise TostSurgeryError(
                f"timm has no model {name!r}." + did_you_mean(name, timm.list_models())
                + f"\nHint: timm.list_models({name[:4] + '*'!r}) lists those whose name starts the same."
            )
        model = timm.create_model(name, pretrained=False)
        return model, tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as error:
        raise TostSurgeryError(f"Cannot import {name!r} from {source!r}: {error}") from error
    return factory(), None


def _import_extra(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise TostSurgeryError(
            f"{name} is not installed, so {name} models cannot be built.\n"
            'Hint: pip install "tost-surgery[timm]" (it brings timm and torchvision).'
        ) from error


def load_checkpoint(path: str, what: str = "checkpoint") -> object:
    """``torch.load(path, weights_only=True)``, with a :class:`TostSurgeryError` for a missing or unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise TostSurgeryError(f"No {what} at {path!r}.") from error
    except IsADirectoryError as error:
        raise TostSurgeryError(f"{path!r} is a directory, not a {what} file.") from error
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a file that is no checkpoint
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
        raise TostSurgeryError(
            f"{path!r} is not a {what} torch.load can read ({reason}).\n"
            "Hint: pass a file written by torch.save(model.state_dict(), path) or torch.save(mask, path)."
        ) from error


def _mask(model: nn.Module, method: str, sparsity: float, seed: int, input_size) -> dict[str, torch.Tensor]:
    if method == "erk":
        return masks.erk(model, sparsity, seed=seed)
    if method == "random":
        return masks.random(model, sparsity, seed=seed)
    if method == "magnitude":
        return masks.magnitude(model, sparsity)
    if method == "synflow":
        if input_size is None:
            raise TostSurgeryError("--mask synflow needs --input-size C H W for this model.")
        return masks.synflow(model, sparsity, input_shape=tuple(input_size))
    if method == "nm":
        return masks.nm(model)
    if not Path(method).exists() and not any(sep in method for sep in "/\\.") and method not in MASK_METHODS:
        raise TostSurgeryError(
            f"--mask {method!r} is neither a method nor a file." + did_you_mean(method, MASK_METHODS)
            + f"\nHint: one of {', '.join(MASK_METHODS)}, or the path of a saved mask or pruned state_dict."
        )
    loaded = load_checkpoint(method, "mask")
    if not isinstance(loaded, dict):
        raise TostSurgeryError(f"--mask {method!r} holds a {type(loaded).__name__}, not a mask or state_dict.")
    params = dict(model.named_parameters())
    if all(k in params and isinstance(v, torch.Tensor) and v.dtype == torch.bool for k, v in loaded.items()):
        return loaded
    return masks.from_state_dict(loaded)


def _overrides(pairs: Sequence[str]) -> dict[str, object]:
    settings = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise TostSurgeryError(f"--set takes FIELD=VALUE, found {pair!r}.")
        try:
            settings[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            settings[key] = raw
    return settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tost-surgery", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="sites, overhead and per-layer densities, without training")
    p.add_argument("model", help="tv:NAME, timm:NAME or module:callable")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument(
        "--mask", default="erk", help=f"{', '.join(MASK_METHODS)}, or a FILE (mask dict or pruned state_dict)"
    )
    p.add_argument("--recipe", choices=("tost", "baseline"), default="tost")
    p.add_argument("--total-steps", type=int, default=10_000)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a Recipe field")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    r = commands.add_parser("report", help="per-layer densities of a saved state_dict (finalized or prepared)")
    r.add_argument("checkpoint")
    r.add_argument("--json", action="store_true")
    d = commands.add_parser("deploy", help="accelerate a sparse model on the CPU: per-layer kernels, speedup, sizes")
    d.add_argument("model", help="tv:NAME, timm:NAME or module:callable")
    d.add_argument("--checkpoint", help="its weights: a state_dict file (torch.save or deploy.save)")
    d.add_argument("--mask", default="erk", help=f"without --checkpoint: {', '.join(MASK_METHODS)}, or a FILE")
    d.add_argument("--sparsity", type=float, help="without --checkpoint: zero this fraction of weights by --mask")
    d.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--min-speedup", type=float, default=1.1)
    d.add_argument("--save", metavar="FILE", help="write the compressed checkpoint here")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tost-surgery`` and ``python -m tost_surgery``: 0 on success, 2 on a user error."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "plan":
            result = _plan(args)
        elif args.command == "deploy":
            result = _deploy(args)
        else:
            result = _report(args.checkpoint)
    except TostSurgeryError as error:
        Console(stderr=True).print(Text.assemble(("error:", "red"), f" {error}"), highlight=False)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(result)
    return 0


def _plan(args: argparse.Namespace):
    model, default_size = build_model(args.model)
    input_size = tuple(args.input_size) if args.input_size else default_size
    mask = _mask(model, args.mask, args.sparsity, args.seed, input_size)
    settings = _overrides(args.set)
    if args.recipe == "tost":
        recipe = Recipe.tost(total_steps=args.total_steps, **settings)
    else:
        recipe = Recipe.baseline(**settings)
    return plan(model, mask, recipe, input_size=input_size)


def _deploy(args: argparse.Namespace):
    from . import deploy

    model, default_size = build_model(args.model)
    input_size = tuple(args.input_size) if args.input_size else default_size
    if input_size is None:
        raise TostSurgeryError(f"deploy needs an input size for {args.model!r}.\nHint: --input-size C H W")
    if args.checkpoint:
        state = deploy.load(args.checkpoint) if deploy.is_checkpoint(args.checkpoint) else _state_dict(args.checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise TostSurgeryError(
                f"{args.checkpoint!r} does not fit {args.model!r}: {error}\nHint: pass the model it was saved from."
            ) from error
    elif args.sparsity is not None:
        with torch.no_grad():
            for name, keep in _mask(model, args.mask, args.sparsity, args.seed, input_size).items():
                model.get_parameter(name).mul_(keep)
    example = torch.randn(args.batch, *input_size, generator=torch.Generator().manual_seed(args.seed))
    fast = deploy.accelerate(model.eval(), example, min_speedup=args.min_speedup, threads=args.threads)
    return deploy.DeploySummary(deploy.report(fast), *deploy.checkpoint_bytes(model, args.save))


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise TostSurgeryError(f"No checkpoint at {path!r}.") from error
    if not isinstance(state, dict):
        raise TostSurgeryError(f"{path!r} holds a {type(state).__name__}, not a state_dict.")
    return state


def _report(path: str):
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise TostSurgeryError(f"{path!r} holds a {type(state).__name__}, not a state_dict.")
    suffix = ".parametrizations.weight.0.mask"
    prepared = {k[: -len(suffix)] + ".weight": v.bool() for k, v in state.items() if k.endswith(suffix)}
    return report(prepared if prepared else _checkpoint_masks(state))


def _checkpoint_masks(state: dict) -> dict[str, torch.Tensor]:
    """Nonzeros of a plain checkpoint's conv/linear-like weights: the pruned ones and those left dense."""
    pruned = masks.from_state_dict(state)
    layers = {}
    for key, value in state.items():  # checkpoint order
        if key in pruned:
            layers[key] = pruned[key]
        elif (key == "weight" or key.endswith(".weight")) and isinstance(value, torch.Tensor) and (
            value.is_floating_point() and value.dim() >= 2
        ):
            layers[key] = value != 0
    layers.update({k: v for k, v in pruned.items() if k not in layers})  # torch.nn.utils.prune's weight_mask
    return layers


if __name__ == "__main__":
    sys.exit(main())
