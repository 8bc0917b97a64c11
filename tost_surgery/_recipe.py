"""`Recipe`: which ToST techniques run, with which settings, over how many steps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal

from ._checks import is_positive_int, is_real
from ._errors import RecipeError, did_you_mean
from ._techniques import TECHNIQUES, Technique
from ._techniques import technique as _technique

SoftActivation = Literal["silu", "mish", "softplus", "gelu"]
AnnealShape = Literal["linear", "cosine"]
SkipBranch = Literal["auto", "bn", "conv_bn"]
RescaleRule = Literal["fan_in", "layer", "gradinit"]
RescaleScope = Literal["all", "unnormalized", "unnormalized_nonresidual"]
LabelSchedule = Literal["constant", "anneal"]

_FLOAT32_MAX = 3.4028234663852886e38


_CHOICES: dict[str, tuple[str, ...]] = {
    "soft_activation": ("silu", "mish", "softplus", "gelu"),
    "anneal": ("linear", "cosine"),
    "skip_branch": ("auto", "bn", "conv_bn"),
    "rescale_rule": ("fan_in", "layer", "gradinit"),
    "rescale_scope": ("all", "unnormalized", "unnormalized_nonresidual"),
    "label_schedule": ("constant", "anneal"),
}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How to train a masked model: each ToST technique is a switch with its settings.

    Annealed techniques (ghost neurons, ghost skips, an annealed label smoothing) move from
    their start to their end state over the first ``warmup * total_steps`` optimizer steps,
    then retire: they leave the graph and cost nothing.

    Example:
        >>> recipe = Recipe.tost(total_steps=10_000, warmup=0.5, soft_activation="mish")
        >>> recipe.ghost_neurons, recipe.warmup
        (True, 0.5)
    """

    total_steps: int | None = None
    """Optimizer steps of the whole run; required when anything is annealed."""
    warmup: float = 0.3
    """Fraction of ``total_steps`` over which the scaffolding anneals away (0, 1]."""
    anneal: AnnealShape = "linear"
    """Shape of the annealing: ``linear`` or ``cosine`` (slow at both ends)."""

    ghost_neurons: bool = False
    """Blend every ReLU call site from a smooth activation to ReLU: ``(1-b)*soft(x) + b*relu(x)``."""
    soft_activation: SoftActivation = "silu"
    neuron_warmup: float | None = None
    """Warm-up of the ghost neurons alone; ``None`` uses ``warmup``."""
    neuron_relu6: bool = False
    """Also blend ReLU6 sites (``nn.ReLU6``, ``F.relu6``) from the soft activation to ReLU6."""

    ghost_skips: bool = False
    """Add ``a * branch(x)`` from each Conv2d's input to its (norm's) output, ``a`` 1 -> 0."""
    skip_branch: SkipBranch = "auto"
    """``bn``: a BatchNorm of the input where a conv keeps its channel count, else the 1x1 conv +
    BatchNorm (an unnormalized identity would compound the variance with depth); ``conv_bn``: the
    paper's 1x1 conv + BatchNorm everywhere; ``auto``: ``conv_bn`` on a pre-activation network
    (some conv ends a residual branch with no norm after it), else ``bn``. On validation at 98%,
    ``bn`` was level with ``conv_bn`` on ResNet-20 and cheaper, ``conv_bn`` better on PreAct
    ResNet-18 in 5 of 5 pairs (``benchmarks/RESULTS.md``)."""
    skip_init: float = 1e-4
    """Constant the 1x1 conv weights of a ``conv_bn`` branch are filled with (the paper's code: 1e-4)."""
    skip_pointwise: bool = False
    """Also a branch beside 1x1 convs with ``groups=1``. Off by default: there the 1x1 branch is a
    dense copy of the layer (DESIGN: never) and costs as much; with it on, a mobilenet_v2 warm-up
    step cost 1.84x a masks-only step, and 1.31-1.35x without (``benchmarks/RESULTS.md``)."""
    skip_linear: bool = False
    """Also an identity skip around each ``nn.Linear`` with ``in_features == out_features``."""
    skip_warmup: float | None = None
    """Warm-up of the ghost skips alone; ``None`` uses ``warmup``."""

    rescale_init: bool = False
    """Rescale the surviving weights so each layer's output variance matches its dense init."""
    rescale_rule: RescaleRule = "fan_in"
    """``fan_in``: per output unit, ``sqrt(fan_in / kept)``; ``layer``: ``sqrt(1 / density)``;
    ``gradinit``: one learned scale per layer, from :func:`tost_surgery.init.gradinit` called after
    ``prepare`` (which then applies none; ``step`` warns until it has run)."""
    rescale_scope: RescaleScope = "unnormalized_nonresidual"
    """``all`` masked conv/linear layers, or only those whose output feeds no normalization
    (``unnormalized``), or only those that also do not end a residual branch, i.e. feed no
    addition with a skip path (``unnormalized_nonresidual``, the default; in a pre-activation
    ResNet the last conv of each block and the shortcut convs feed the sum with no norm between,
    and rescaling them undoes the near-identity start of a sparse residual network)."""

    label_smoothing: float = 0.0
    """Label smoothing for the loss, read through ``tost_surgery.label_smoothing(model)``."""
    label_schedule: LabelSchedule = "constant"
    """``constant``, or ``anneal`` to 0 with the rest of the scaffolding."""

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise RecipeError(
                    f"Recipe.{name} must be one of {list(choices)}, found {value!r}."
                    + did_you_mean(str(value), choices)
                )
        for name in ("ghost_neurons", "neuron_relu6", "ghost_skips", "skip_pointwise", "skip_linear", "rescale_init"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"Recipe.{name} must be a bool, found {getattr(self, name)!r}.")
        for name in ("warmup", "neuron_warmup", "skip_warmup"):
            value = getattr(self, name)
            if value is None and name != "warmup":
                continue
            if not is_real(value) or not 0.0 < value <= 1.0:
                raise RecipeError(
                    f"Recipe.{name} is a fraction of total_steps in (0, 1], found {value!r}.\n"
                    "Hint: warmup=0.3 anneals the scaffolding over the first 30% of steps."
                )
            object.__setattr__(self, name, float(value))
        if not is_real(self.label_smoothing) or not 0.0 <= self.label_smoothing < 1.0:
            raise RecipeError(f"Recipe.label_smoothing must be in [0, 1), found {self.label_smoothing!r}.")
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        if not is_real(self.skip_init) or not abs(self.skip_init) <= _FLOAT32_MAX:
            raise RecipeError(
                f"Recipe.skip_init must be a finite number, representable in float32, found {self.skip_init!r}."
            )
        object.__setattr__(self, "skip_init", float(self.skip_init))
        if self.total_steps is not None:
            if not is_positive_int(self.total_steps):
                raise RecipeError(f"Recipe.total_steps must be a positive int, found {self.total_steps!r}.")
            object.__setattr__(self, "total_steps", int(self.total_steps))
        if self.is_annealed and self.total_steps is None:
            raise RecipeError(
                "Recipe anneals scaffolding but total_steps is None.\n"
                "Hint: pass total_steps=<optimizer steps of the whole run>, "
                "e.g. Recipe.tost(total_steps=epochs * len(loader))."
            )

    @property
    def is_annealed(self) -> bool:
        """Whether anything moves with the step count (and so needs ``total_steps``)."""
        return any(t.is_annealed(self) for t in TECHNIQUES)

    def warmup_steps(self, technique: str) -> int:
        """Optimizer steps over which ``technique`` (``"neurons"``, ``"skips"``, ``"labels"``) anneals, at least 1.

        Example:
            >>> Recipe.tost(total_steps=1000, warmup=0.3).warmup_steps("skips")
            300
        """
        return _technique(technique).warmup_steps(self)

    def enabled(self) -> tuple[str, ...]:
        """The names of the techniques this recipe turns on, in the order they apply.

        Example:
            >>> Recipe.tost(total_steps=10, ghost_skips=False).enabled()
            ('neurons', 'rescale', 'labels')
        """
        return tuple(t.name for t in TECHNIQUES if t.is_enabled(self))

    @staticmethod
    def techniques() -> tuple[Technique, ...]:
        """Every technique: its name, its switch, the fields it owns and the overrides that turn it off.

        Example:
            >>> {t.name: dict(t.off) for t in Recipe.techniques()}["skips"]
            {'ghost_skips': False}
        """
        return tuple(TECHNIQUES)

    @classmethod
    def tost(cls, total_steps: int, **overrides: Any) -> Recipe:
        """The ToST recipe with every technique on; override any field by keyword.

        The defaults are chosen by ``benchmarks/accuracy.py`` (``benchmarks/RESULTS.md``). For
        example, the layer-wise rescaling applies only to layers that feed neither a
        normalization nor a residual addition (``rescale_scope="unnormalized_nonresidual"``):
        applied to every layer of a BatchNorm ResNet-20 at 98% sparsity, the fan-in rule cost 8.6
        points of validation accuracy, and applied to the ends of a pre-activation ResNet-18's
        residual branches, 3.1.

        Example:
            >>> Recipe.tost(total_steps=1000, ghost_skips=False).ghost_neurons
            True
        """
        settings: dict[str, Any] = dict(
            total_steps=total_steps,
            ghost_neurons=True,
            ghost_skips=True,
            rescale_init=True,
            label_smoothing=0.1,
            label_schedule="anneal",
        )
        settings.update(overrides)
        return cls._checked(settings)

    @classmethod
    def baseline(cls, **overrides: Any) -> Recipe:
        """Masks only: the default dense protocol applied to the sparse network.

        Example:
            >>> Recipe.baseline().is_annealed
            False
        """
        return cls._checked(overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, for checkpoints and logs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Example:
            >>> r = Recipe.tost(total_steps=10)
            >>> Recipe.from_dict(r.to_dict()) == r
            True
        """
        return cls._checked(dict(data))

    @classmethod
    def _checked(cls, settings: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        for key in settings:
            if key not in known:
                raise RecipeError(f"Recipe has no setting {key!r}." + did_you_mean(key, known))
        return cls(**settings)
