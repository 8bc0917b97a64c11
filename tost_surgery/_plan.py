"""`plan`: what prepare would do to a model, without training it or changing it."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from ._fx._patterns import on_every_path, residual_branch_ends
from ._paths import channels_on_paths
from ._recipe import Recipe
from ._report import Report, report
from ._surgery import Surgery, prepare
from ._techniques import TECHNIQUES

LARGE_BRANCH_FACTOR = 2.0
"""A fan-in rescale factor at least this large, on a layer that ends a residual branch, gets advice:
it doubles (or more) the branch's output scale against the masked initialization."""
DEAD_CHANNEL_SHARE = 0.5
"""A masked weight that keeps nothing in more than this share of its output channels gets advice."""
DEAD_CHANNELS_MEASURED = (
    "Alone that was not fatal: SynFlow masks with such layers trained (seed 0 with ToST: VGG-16 x0.5 at 98%, 8 "
    "layers, 67.75%; MobileNetV2 x0.25 at 95%, 23 layers, 47.10%), but MobileNetV2 x0.25 at ERK 98% (28 such "
    "layers) stayed at chance with and without the recipe"
)
"""What ``benchmarks/RESULTS.md`` measured on masks with such layers, quoted by :func:`dead_channel_advice`."""
NARROW_PATH_SHARE = 0.05
"""A layer that every path through the network goes through, with fewer than this share of its output
channels on a path of kept weights from the input to the output, gets advice."""
NARROW_PATH_MEASURED = (
    "VGG-16 x0.5 with SNIP at 98% keeps 1 channel of 256 on such paths in its last convs on seeds 1-2 (both "
    "protocols stayed at chance) and 6 on seed 0, where the default protocol reached 45.23% and ToST 27.83%"
)
"""What ``benchmarks/RESULTS.md`` measured on networks that narrow, quoted by :func:`narrow_path_advice`."""
GHOST_SKIPS_AROUND_NARROW_LAYERS = (
    "trained with them (seed 0), it scored 56.50% on validation after epoch 5 of 20 and 9.84% with their "
    "coefficient set to 0, and fell back to chance when they retired"
)
"""What ``benchmarks/retirement.py`` measured, quoted by :func:`narrow_path_advice` with ghost skips on."""
NARROW_PATH_PROTOCOLS = "seed 0 on validation, 49.61% default, 41.93% ToST without ghost skips, 26.97% ToST"
"""Three protocols on the VGG-16 SNIP 98% mask (``benchmarks/RESULTS.md``), quoted by :func:`narrow_path_advice`."""
PREACT_BN = "2.2 points below it in 5 of 5 mask/seed pairs on validation"
"""What ``benchmarks/RESULTS.md`` measured on a pre-activation network, quoted by :func:`preactivation_advice`."""


@dataclass(frozen=True)
class Plan:
    """The sites each technique uses, the scaffolding's overhead, and the per-layer densities.

    ``macs`` counts multiply-adds of one forward at ``input_size`` (batch 1) in conv and
    linear layers: ``dense`` (no mask), ``masked`` (each layer times its density, as a
    sparse kernel would), ``scaffolding`` (the ghost skip branches). Element-wise work of
    ghost neurons (a soft activation and a blend per ReLU) is not counted.
    """

    model: str
    recipe: Recipe
    sites: dict[str, tuple[str, ...]]
    """Where each graph technique acts, by technique name (``"neurons"``: the ReLU sites, ...)."""
    model_params: int
    scaffold_params: int
    layers: Report
    input_size: tuple[int, ...] | None = None
    macs: dict[str, int] | None = None
    notes: tuple[str, ...] = field(default=())
    advice: tuple[str, ...] = field(default=())
    """Where the recipe's settings are outside what was measured to help for this kind of network."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``--json``."""
        return {
            "model": self.model,
            "recipe": self.recipe.to_dict(),
            "sites": {name: list(where) for name, where in self.sites.items()},
            "model_params": self.model_params,
            "scaffold_params": self.scaffold_params,
            "input_size": list(self.input_size) if self.input_size else None,
            "macs": self.macs,
            "notes": list(self.notes),
            "advice": list(self.advice),
            "layers": self.layers.to_dict(),
        }

    def __rich__(self) -> Group:
        summary = Table(title=Text(f"ToST plan for {self.model}", style="bold"), show_header=False)
        summary.add_column("what")
        summary.add_column("value", justify="right")
        labels = {t.name: t.label for t in TECHNIQUES}
        for name, where in self.sites.items():
            summary.add_row(f"{labels[name]} sites", f"{len(where):,}")
        summary.add_row("model parameters", f"{self.model_params:,}")
        summary.add_row("kept weights in masked layers", f"{self.layers.kept:,} of {self.layers.total:,}")
        share = self.scaffold_params / max(1, self.model_params)
        summary.add_row("scaffolding parameters", f"{self.scaffold_params:,} ({share:.1%} of the model)")
        if self.macs:
            dense, masked, extra = self.macs["dense"], self.macs["masked"], self.macs["scaffolding"]
            summary.add_row(f"multiply-adds at {'x'.join(map(str, self.input_size or ()))}, dense", f"{dense:,}")
            summary.add_row("  masked (density-weighted)", f"{masked:,}")
            summary.add_row("  scaffolding during warm-up", f"{extra:,} (+{extra / max(1, masked):.1%} of masked)")
        sites = Table(title="sites", show_lines=False)
        sites.add_column("technique")
        sites.add_column("where")
        for name, where in self.sites.items():
            for site in where:
                sites.add_row(labels[name], Text(site))
        parts: list[Any] = [summary]
        if self.notes:
            parts.append(Text("\n".join(f"note: {note}" for note in self.notes), style="yellow"))
        if self.advice:
            parts.append(Text("\n".join(f"advice: {line}" for line in self.advice), style="cyan"))
        parts += [sites, self.layers]
        return Group(*parts)

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(self)
        return console.export_text()


def plan(
    model: nn.Module,
    mask: Mapping[str, torch.Tensor],
    recipe: Recipe | None = None,
    *,
    input_size: Sequence[int] | None = None,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
) -> Plan:
    """What ``prepare(model, mask, recipe)`` would do, worked out on a copy; ``model`` is untouched.

    Args:
        input_size: ``(C, H, W)`` (no batch) to count multiply-adds with one forward and to find the
            channels on a path of kept weights (:func:`narrow_path_advice`); None skips both.

    Example:
        >>> print(tost_surgery.plan(model, masks.erk(model, 0.95), Recipe.tost(1000), input_size=(3, 224, 224)))

    ``recipe=None`` means what it means to ``prepare``: :meth:`Recipe.baseline`, masks only.
    """
    rng = torch.get_rng_state()
    try:
        trial = prepare(copy.deepcopy(model), mask, recipe, leaf_modules=leaf_modules)
        recipe = trial.tost.surgery.decided.recipe  # None: prepare's default
        surgery = trial.tost.surgery
        runner = surgery.runner
        sites = runner.sites()
        scaffold_params = sum(p.numel() for p in trial.tost.parameters())
        model_params = sum(p.numel() for n, p in trial.named_parameters() if not n.startswith("tost."))
        macs = _count_macs(trial, tuple(input_size)) if input_size else None
        layers = report(trial)
        ends = branch_ends(surgery)
        advice = rescale_advice(surgery, ends) + preactivation_advice(surgery, ends) + dead_channel_advice(surgery)
        if input_size:
            advice += narrow_path_advice(surgery, model, mask, tuple(input_size))
    finally:
        torch.set_rng_state(rng)
    return Plan(
        model=type(model).__name__,
        recipe=recipe,
        sites=sites,
        model_params=model_params,
        scaffold_params=scaffold_params,
        layers=layers,
        input_size=tuple(input_size) if input_size else None,
        macs=macs,
        notes=tuple(runner.notes),
        advice=advice,
    )


def branch_ends(surgery: Surgery) -> frozenset[str]:
    """The modules whose output goes, with no norm between, into a residual addition (none when not traced)."""
    variant = surgery.runner.default_variant
    if variant is None:
        return frozenset()
    return residual_branch_ends(variant.pristine[True], surgery.runner.context.modules)


def rescale_advice(surgery: Surgery, ends: frozenset[str]) -> tuple[str, ...]:
    """Advice when fan-in rescaling scales up layers of ``ends`` (:func:`branch_ends`) by a large factor.

    Example:
        >>> surgery = prepare(preact_resnet, mask, Recipe.tost(1000)).tost.surgery
        >>> rescale_advice(surgery, branch_ends(surgery))
        ("rescaled init multiplies 12 layers that end a residual branch by 2x or more (...) ...",)
    """
    rescaled = surgery.decided.rescaled
    if not rescaled:
        return ()
    module_of = {entry.name: entry.module_name for entry in surgery.decided.entries}
    large = sorted(
        ((factor, module_of[name]) for name, factor in rescaled.items()
         if module_of.get(name) in ends and factor >= LARGE_BRANCH_FACTOR),
        reverse=True,
    )  # fmt: skip
    if not large:
        return ()
    listed = ", ".join(f"{name} {factor:.1f}x" for factor, name in large[:4]) + (", ..." if len(large) > 4 else "")
    return (
        f"rescaled init multiplies {len(large)} layer(s) that end a residual branch by "
        f"{LARGE_BRANCH_FACTOR:g}x or more ({listed}). No norm follows them (a pre-activation block), so this "
        "restores the dense branch's variance and undoes the near-identity start of a sparse residual network; "
        "the recipe's rescaling was measured to help where every branch ends in a norm "
        "(benchmarks/RESULTS.md, section 1).\n"
        "Hint: Recipe.tost(..., rescale_scope='unnormalized_nonresidual') rescales all but those layers.",
    )


def preactivation_advice(surgery: Surgery, ends: frozenset[str]) -> tuple[str, ...]:
    """Advice when ghost skips with ``skip_branch="bn"`` meet masked layers of ``ends`` (:func:`branch_ends`).

    Example:
        >>> surgery = prepare(preact_resnet, mask, Recipe.tost(1000, skip_branch="bn")).tost.surgery
        >>> preactivation_advice(surgery, branch_ends(surgery))
        ("11 masked layer(s) end a residual branch with no norm after them (layers.0.0.conv2, ...): ...",)
    """
    recipe = surgery.decided.recipe
    if recipe is None or not recipe.ghost_skips or recipe.skip_branch != "bn":
        return ()
    masked = list(dict.fromkeys(entry.module_name for entry in surgery.decided.entries if entry.module_name in ends))
    if not masked:
        return ()
    listed = ", ".join(masked[:4]) + (", ..." if len(masked) > 4 else "")
    return (
        f"{len(masked)} masked layer(s) end a residual branch with no norm after them ({listed}): a pre-activation "
        "(pre-norm) network. On one (PreAct ResNet-18 at 98% sparsity) skip_branch='bn' measured below the paper's "
        f"1x1 conv + BatchNorm branch at every conv: {PREACT_BN} (benchmarks/RESULTS.md, section 1).\n"
        "Hint: skip_branch='auto' (which takes the 1x1 conv + BatchNorm on such a network) or 'conv_bn'.",
    )


def dead_channel_advice(surgery: Surgery) -> tuple[str, ...]:
    """Advice when a mask keeps no weight in more than half of a layer's output channels.

    Example:
        >>> dead_channel_advice(prepare(mobilenet, masks.erk(mobilenet, 0.98), Recipe.tost(1000)).tost.surgery)
        ("28 masked layer(s) keep no weight in more than 50% of their output channels (...) ...",)
    """
    dead = []
    for entry in surgery.decided.entries:
        mask = entry.given
        if mask.dim() < 2:
            continue
        share = float((~mask.flatten(1).any(1)).float().mean())
        if share > DEAD_CHANNEL_SHARE:
            dead.append((share, entry.name, mask.shape[0]))
    if not dead:
        return ()
    dead.sort(key=lambda item: -item[0])
    listed = ", ".join(f"{name} {share:.0%} of {out}" for share, name, out in dead[:4])
    listed += ", ..." if len(dead) > 4 else ""
    excluded = ", ".join(repr(name) for _, name, _ in dead[:2])
    return (
        f"{len(dead)} masked layer(s) keep no weight in more than {DEAD_CHANNEL_SHARE:.0%} of their output channels "
        f"({listed}). Those channels carry only their bias, whatever the recipe does. {DEAD_CHANNELS_MEASURED} "
        "(benchmarks/RESULTS.md, section 1).\n"
        "Hint: if training stays near chance, a lower sparsity, or leave those layers out of the mask "
        f"(masks.erk(model, sparsity, exclude=[{excluded}, ...])).",
    )


def narrow_path_advice(
    surgery: Surgery, model: nn.Module, mask: Mapping[str, torch.Tensor], input_size: tuple[int, ...]
) -> tuple[str, ...]:
    """Advice when a layer that every path through the network goes through has fewer than
    :data:`NARROW_PATH_SHARE` of its output channels on a path of kept weights (:func:`channels_on_paths`).

    Example:
        >>> narrow_path_advice(surgery, vgg16, masks.snip(vgg16, 0.98, batches), (3, 32, 32))
        ("6 masked layer(s) that every path through the network goes through keep fewer than 5% ...",)
    """
    variant = surgery.runner.default_variant
    if variant is None:
        return ()
    widths = channels_on_paths(model, mask, input_size)
    chain = on_every_path(variant.pristine[True], widths)
    narrow = sorted(
        (on / channels, name, on, channels) for name, (on, channels) in widths.items()
        if name in chain and on < NARROW_PATH_SHARE * channels
    )  # fmt: skip
    if not narrow:
        return ()
    listed = ", ".join(f"{name} {on} of {channels}" for _, name, on, channels in narrow[:4])
    listed += ", ..." if len(narrow) > 4 else ""
    recipe = surgery.decided.recipe
    skips = ""
    if recipe is not None and recipe.ghost_skips:
        skips = (
            " The ghost skips carry the signal around such a layer during warm-up, so the network can lean on them "
            f"and fall back when they retire: {GHOST_SKIPS_AROUND_NARROW_LAYERS}."
        )
    return (
        f"{len(narrow)} masked layer(s) that every path through the network goes through keep fewer than "
        f"{NARROW_PATH_SHARE:.0%} of their output channels on a path of kept weights from the input to the output "
        f"({listed}): once the scaffolding retires the network is that narrow there. {NARROW_PATH_MEASURED} "
        f"(benchmarks/RESULTS.md, section 1).{skips}\n"
        "Hint: a mask maker that keeps such paths (masks.synflow: 27 of 256 channels there at 98% on VGG-16, "
        "where ToST was ahead), or a lower sparsity; on such a mask the default protocol measured best "
        f"({NARROW_PATH_PROTOCOLS}).",
    )


def _count_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Multiply-adds of conv and linear layers in one eval forward, by hooks."""
    totals = {"dense": 0, "masked": 0, "scaffolding": 0}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, _ConvNd):
            per_output = module.weight.shape[1] * int(torch.tensor(module.weight.shape[2:]).prod())
        else:
            per_output = module.in_features
        macs = output.numel() * per_output
        if names.get(id(module), "").startswith("tost."):
            totals["scaffolding"] += macs
            return
        density = 1.0
        if parametrize.is_parametrized(module, "weight"):
            density = float(module.parametrizations.weight[0].mask.float().mean())
        totals["dense"] += macs
        totals["masked"] += round(macs * density)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(torch.zeros(1, *input_size, device=device))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return totals
