"""What a run of ``benchmarks/accuracy.py`` is: its key, the Recipe it trains with, its id, its records.

Both sides use it: ``accuracy.py`` to skip the runs already in ``accuracy.jsonl``,
``accuracy_report.py`` to name each record by the variants whose Recipe it trained with. A
run's id hashes the key without its names (the protocol) and the resolved Recipe, so two names
of one Recipe share one run, and a changed ``Recipe.tost`` default leaves the old ``tost``
records under the overrides that give their Recipe back instead of mixing them in.

    key = RunKey(arch="resnet20", mask="erk", sparsity=0.98, seed=0, variant="tost", epochs=20, eval="test")
    key.id in {record_id(r) for r in read_results(path)}   # done already?
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

import tost_surgery as tost

MASKS = ("erk", "snip", "synflow")
EXTRA_MASKS = ("random",)
SPARSITIES = (0.9, 0.95, 0.98)
SEEDS = (0, 1, 2)
ABLATION_SPARSITY = 0.98
MAIN_VARIANTS = ("baseline", "tost")
KERNELS = ("off", "auto", "on", "auto+native", "on+native")
"""``prepare(sparse_kernels=..., native_kernels=...)`` of a run: ``off`` (dense, the reported grid) or the
mode with ``+native`` for the compiled kernels."""
TECHNIQUES = {t.name: dict(t.off) for t in tost.Recipe.techniques()}
"""technique -> the Recipe fields that turn it off (the library's table of techniques)."""
ABLATION_VARIANTS = tuple(f"only_{t}" for t in TECHNIQUES) + tuple(f"no_{t}" for t in TECHNIQUES)
VARIANTS = MAIN_VARIANTS + ABLATION_VARIANTS
RECIPE_DEFAULTS = {f.name: f.default for f in fields(tost.Recipe) if f.default is not MISSING}
BEFORE_ADDED = {"skip_pointwise": True}
"""What a field added to Recipe later was, in effect, before it existed (when it differs from today's default)."""
SETTINGS_OF = {t.switch: t.settings for t in tost.Recipe.techniques()}
"""switch -> the fields that only matter while it is on (label smoothing's schedule, while it is above 0)."""


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
    kernels: str = "off"

    def to_dict(self) -> dict[str, Any]:
        """The key as records hold it; ``kernels`` only when on, as the records from before it have it."""
        data = asdict(self)
        data["overrides"] = dict(self.overrides)
        if self.kernels == "off":
            del data["kernels"]
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

    def prepare_kwargs(self) -> dict[str, Any]:
        """``tost.prepare``'s kernel arguments: ``{"sparse_kernels": "on", "native_kernels": True}``."""
        mode, _, native = self.kernels.partition("+")
        return {"sparse_kernels": mode, "native_kernels": native == "native"}

    def recipe(self) -> dict[str, Any]:
        """The resolved Recipe fields (``total_steps`` left out: it follows from the protocol)."""
        return recipe_fields(recipe_for(self.variant, 1, dict(self.overrides)).to_dict(), self.arch)

    @property
    def id(self) -> str:
        return content_id(self.protocol(), self.recipe())

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.overrides)
        extra += f" kernels={self.kernels}" if self.kernels != "off" else ""
        return f"{self.arch} {self.mask} s={self.sparsity} seed={self.seed} {self.variant}{extra} ({self.eval})"


ALIKE_SCOPES = {"unnormalized_nonresidual": "unnormalized"}
"""``rescale_scope`` -> the scope it equals on a network where no layer ends a residual branch unnormalized."""
BRANCH_NAMES = {"bn": "auto"}
"""``skip_branch`` today -> the name its behaviour had in the records (``auto`` was today's ``bn``)."""
_TODAY_BRANCH = {name: now for now, name in BRANCH_NAMES.items()}
AUTO_WAS_BN = frozenset({
    "0c81bb0485b3", "0e7ac6241e44", "10ad3b2c789a", "246a91375f2e", "47359dedcb17", "4d5c26ee2615",
    "7e2274da1c27", "7e92a099cef1", "85b696a16393", "878940a4610d", "8465e28dbb24", "92855523669a",
    "96ba25d3c1e1", "e612f31ea5e8", "e71dc4adece6", "f10f8ab81d88", "fdc4e30e470c",
})  # fmt: skip
"""Commits whose ``skip_branch="auto"`` is today's ``"bn"``: before ``auto`` chose ``conv_bn`` on a
pre-activation network. Their records are read with that meaning."""


def recipe_fields(recipe: dict[str, Any], arch: str | None = None, commit: str | None = None) -> dict[str, Any]:
    """The fields that decide a run of ``arch``, in canonical form: without ``total_steps``, without
    the settings of a technique that is off, with fields a record predates filled in as they
    behaved then, a ``rescale_scope`` that rescales the same layers of ``arch`` as another one named
    as that one (:data:`ALIKE_SCOPES`), and ``skip_branch`` named by the branches it gives ``arch``
    (:func:`branch_name`; ``commit``: the record's, for what ``auto`` meant then)."""
    filled = {**RECIPE_DEFAULTS, **BEFORE_ADDED, **recipe}
    filled.pop("total_steps", None)
    for switch, settings in SETTINGS_OF.items():
        if not filled[switch]:
            for name in settings:
                filled.pop(name)
    scope = filled.get("rescale_scope")
    if scope in ALIKE_SCOPES and arch is not None and alike(arch, "rescale_scope", scope, ALIKE_SCOPES[scope]):
        filled["rescale_scope"] = ALIKE_SCOPES[scope]
    if "skip_branch" in filled:
        filled["skip_branch"] = branch_name(filled["skip_branch"], arch, commit)
    return filled


def branch_name(value: str, arch: str | None, commit: str | None) -> str:
    """A ``skip_branch`` under the name of its behaviour in the records: ``bn`` and a record's old
    ``auto`` are ``auto``; today's ``auto`` is ``auto`` or ``conv_bn``, whichever it equals on
    ``arch``, else ``auto+preact`` (a behaviour no old record has)."""
    if commit in AUTO_WAS_BN:
        return value  # its "auto" is today's "bn", already under that behaviour's record name
    if value == "auto":
        alikes = (other for other in ("bn", "conv_bn") if arch is not None and alike(arch, "skip_branch", value, other))
        value = next(alikes, "auto+preact")
    return BRANCH_NAMES.get(value, value)


EFFECTS: dict[str, Callable[[nn.Module], object]] = {
    "rescale_scope": lambda model: set(model.tost.surgery.decided.rescaled),
    "skip_branch": lambda model: [(key, skip.branch) for key, skip in model.tost.skips.items()],
}
"""What a value of a Recipe field did to a prepared model: values with equal effects are alike."""


@functools.cache
def alike(arch: str, field: str, value: str, other: str) -> bool:
    """Whether two values of a Recipe ``field`` (a key of :data:`EFFECTS`) have the same effect on
    ``arch`` (a benchmark network; False for any other name), at ERK 98%."""
    import cifar  # the benchmark's networks; imported here, as the report needs it and the keys only this

    if arch not in cifar.ARCHITECTURES:
        return False
    effect = EFFECTS[field]
    seen = []
    for name in (value, other):
        model = cifar.ARCHITECTURES[arch]()
        tost.prepare(model, tost.masks.erk(model, 0.98, seed=0), tost.Recipe.tost(10, **{field: name}))
        seen.append(effect(model))
    return seen[0] == seen[1]


def content_id(protocol: dict[str, Any], recipe: dict[str, Any]) -> str:
    text = json.dumps({"protocol": protocol, "recipe": recipe}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def record_id(record: dict[str, Any]) -> str:
    """The id of the run a record holds, from the Recipe it actually trained with."""
    key = RunKey.from_dict(record["key"])
    return content_id(key.protocol(), recipe_fields(record["recipe"], key.arch, record.get("commit")))


def _resolved(variant: str, overrides: dict[str, Any], arch: str) -> dict[str, Any]:
    return recipe_fields(recipe_for(variant, 1, overrides).to_dict(), arch)


def labels_of(record: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (variant, overrides JSON) whose Recipe is, with today's defaults, the one the record used.

    A record whose own name means another Recipe today (a default changed since) is labelled by its
    variant and the overrides that give back the Recipe it used, e.g. ``tost`` with
    ``{"skip_pointwise": true}``.
    """
    key = record["key"]
    arch = key["arch"]
    used = recipe_fields(record["recipe"], arch, record.get("commit"))
    labels = [(v, "{}") for v in VARIANTS if _resolved(v, {}, arch) == used]
    # Overrides that change nothing on this network name nothing: ``--set skip_branch=auto`` is ``tost``
    # today, and so is ``skip_branch=conv_bn`` on a pre-activation network.
    needed = dict(key["overrides"])
    for name in list(needed):
        fewer = {k: v for k, v in needed.items() if k != name}
        if _resolved(key["variant"], fewer, arch) == _resolved(key["variant"], needed, arch):
            needed = fewer
    own = (key["variant"], json.dumps(needed, sort_keys=True))
    if own not in labels and _resolved(own[0], needed, arch) == used:
        labels.append(own)
    if not labels:
        now = _resolved(key["variant"], needed, arch)
        diff = {**needed, **{k: today_name(k, v) for k, v in used.items() if now.get(k) != v}}
        if _resolved(key["variant"], diff, arch) == used:
            labels.append((key["variant"], json.dumps(diff, sort_keys=True)))
    return labels


def today_name(field: str, value: Any) -> Any:
    """The value a Recipe field takes today for a canonical value (:func:`recipe_fields`): ``bn`` for ``auto``."""
    if field == "skip_branch":
        return _TODAY_BRANCH.get(value, value)
    return value


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
