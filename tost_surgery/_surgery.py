"""prepare / finalize: the lifecycle of a model under the ToST recipe."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import is_prepared
from ._errors import RecipeError, StateError, TostSurgeryError, did_you_mean, warn
from ._fx._context import PassContext
from ._fx._layout import CallSignature
from ._fx._tracing import FALLBACK, Tracing
from ._masking import MaskEntry, attach_masks, detach_masks, normalize_mask, original_parameter, resolve_mask
from ._modules import Scaffold
from ._recipe import Recipe
from ._rescale import outside_scope, rescale_factors, rescaled_layers
from ._runner import Runner
from ._sparse_kernels.layer import MODES, KernelPolicy, SparseLayer, ineligible
from ._sparse_kernels.native import training_native_available
from ._techniques import TECHNIQUES
from ._write_through import plain_reads
from .deploy._timing import Timer
from .deploy.kernels import has_sparse_matmul

# Methods rewritten besides forward when the model's class has them: timm's, which feature
# extraction, distillation and training loops call instead of forward.
DEFAULT_METHODS = ("forward_features", "forward_head")


@dataclass
class Decisions:
    """What prepare decided about one model; fixed once prepare has returned (``rescaled`` aside:
    :func:`tost_surgery.init.gradinit` records the scales it applies)."""

    recipe: Recipe
    model_name: str
    entries: list[MaskEntry]
    enabled: frozenset[str]
    """The techniques with scaffolding that anneals away (and so retires)."""
    installed: tuple[str, ...]
    """The methods set on the instance: the rewritten ones, and those that could not be traced."""
    rescaled: dict[str, float] = field(default_factory=dict)
    """Mean factor applied to each rescaled weight."""
    gradinit_layers: tuple[str, ...] | None = None
    """With ``rescale_rule="gradinit"``: the masked weights gradinit learns a scale for (whether it has
    is the saved buffer ``model.tost.gradinit_done``)."""
    sparse_kernels: str = "off"
    """``prepare(sparse_kernels=...)``: ``off``, ``auto`` or ``on``."""
    kernel_skipped: dict[str, str] = field(default_factory=dict)
    """Masked layers without a sparse training kernel, and why."""


class Bindings(dict):
    """The optimizers bound to one model, by id. A copy of the model (an EMA, say) is bound to none."""

    def __deepcopy__(self, memo: dict) -> Bindings:
        return Bindings()


@dataclass
class Surgery:
    """A prepared model's decisions and what runs, kept on ``model.tost.surgery``."""

    decided: Decisions
    runner: Runner
    bindings: Bindings = field(default_factory=Bindings)
    gradinit_checked: bool = False
    """Whether ``step`` has looked for GradInit scales still to apply (it does so once)."""

    @property
    def schedule(self):
        return self.runner.context.scaffold.schedule

    def gradinit_pending(self) -> bool:
        """The recipe asks for GradInit scales and :func:`tost_surgery.init.gradinit` has not applied them."""
        done = getattr(self.runner.context.scaffold, "gradinit_done", None)
        return bool(self.decided.gradinit_layers) and done is not None and not bool(done)

    def pending(self) -> frozenset[str]:
        """Enabled techniques that have not reached their end state yet."""
        return frozenset(t for t in self.decided.enabled if not self.schedule.is_finished(t))

    def sync(self) -> None:
        """Retire (or bring back) scaffolding to match the schedule's step."""
        self.runner.sync(self.schedule, self.decided.enabled)


def _rewritten(method: str) -> Callable:
    """A method of a prepared model: the rewritten graph for the call (the class's own when run eagerly)."""

    def run(self: nn.Module, *args, **kwargs):
        surgery: Surgery = self.tost.surgery
        runner = surgery.runner
        if torch.compiler.is_compiling():
            return runner.call(self, method, args, kwargs)
        surgery.sync()  # follows a step buffer changed by a copy (an EMA) or a load
        with plain_reads:
            if runner.tracing is None or method not in runner.signatures:
                return getattr(type(self), method)(self, *args, **kwargs)
            return runner.call(self, method, args, kwargs)

    run.__name__ = method
    return run


def _sync_after_load(scaffold: Scaffold, incompatible_keys: object) -> None:
    scaffold.surgery.sync()


def prepare(
    model: nn.Module,
    mask: Mapping[str, torch.Tensor],
    recipe: Recipe | None = None,
    *,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    methods: Iterable[str] = (),
    strict: bool = False,
    sparse_kernels: str = "off",
    kernel_timer: Timer | None = None,
    native_kernels: bool = False,
) -> nn.Module:
    """Attach ``mask`` and the ToST scaffolding to ``model``, in place.

    Returns the same object, still of its own class, whose forward now runs the rewritten
    fx graph over its own modules. The scaffolding lives under ``model.tost``. If anything
    is wrong, nothing is changed and a :class:`TostSurgeryError` says what.

    Args:
        model: any torch.fx-traceable module (timm's untraceable blocks are kept whole).
        mask: ``{parameter name: 0/1 or bool tensor shaped like it}``.
        recipe: which techniques run; ``None`` means :meth:`Recipe.baseline` (masks only).
            Use ``Recipe.tost(total_steps=...)`` for the full recipe.
        leaf_modules: module classes or qualified names to call whole, not trace through.
        methods: other methods of the model to rewrite like forward (timm's ``forward_features``
            and ``forward_head`` are rewritten whenever the model has them).
        strict: raise a :class:`TraceError` instead of calling an untraceable submodule
            whole, or running an untraceable model eagerly (both warn by default).
        sparse_kernels: ``"off"`` (default), ``"auto"`` or ``"on"``. Once no scaffolding is left
            in the graph (from the start under :meth:`Recipe.baseline`), each masked Conv1d /
            Conv2d / Linear runs sparse CPU kernels (forward, input gradient, weight gradient at
            the mask's nonzeros) where, at its first training call, paired timing of forward +
            backward on that call's shapes found them faster (``"auto"``), or always (``"on"``).
            Parameters stay the same dense tensors; ``status(model).sparse_kernels`` shows the choices.
        kernel_timer: how ``"auto"`` times a layer (default :class:`deploy.PairedTimer`); tests
            inject timings here.
        native_kernels: with ``sparse_kernels`` ``"auto"`` or ``"on"``, also use the optional
            compiled CPU kernels for float32 convs (not 1x1 unpadded): built with torch's C++
            extension tooling at this call (minutes the first time, then cached). ``"auto"``
            times them as a third candidate; ``"on"`` runs them. Without a compiler: a warning,
            and the torch-only kernels.

    Example:
        >>> model = prepare(model, masks.erk(model, 0.95), Recipe.tost(total_steps=10_000))
    """
    _check_preparable(model)
    _check_sparse_kernels(sparse_kernels, native_kernels)
    names = _methods_to_rewrite(model, methods)
    recipe = _checked_recipe(recipe)
    entries = normalize_mask(model, resolve_mask(model, mask))
    scaffold = Scaffold(recipe)
    context = PassContext(recipe, dict(model.named_modules()), scaffold)
    tracing = Tracing.of(model, leaf_modules, strict=strict)
    tracing.hidden = frozenset(names)
    signatures = {name: CallSignature(getattr(type(model), name)) for name in names}
    enabled = frozenset(
        t.name for t in TECHNIQUES if t.is_enabled(recipe) and t.coefficient is not None and (t.insert or t.eager)
    )
    surgery = Surgery(
        Decisions(recipe, type(model).__name__, entries, enabled, names, sparse_kernels=sparse_kernels),
        Runner(context, tracing, signatures, type(model).__name__),
    )
    _plan_kernels(surgery, kernel_timer, native_kernels)
    _trace_methods(model, surgery)
    if sparse_kernels != "off" and surgery.runner.tracing is None:
        surgery.runner.notes.append("sparse kernels not used: they need a graph")
    context.can_add_modules = False  # later traces reuse these skips: new ones would miss the optimizer
    default = surgery.runner.default_variant
    graph = default.pristine[True] if default else None
    normalized = outside_scope(graph, context.modules, recipe.rescale_scope) if graph else frozenset()
    factors = rescale_factors(entries, recipe, normalized)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    scaffold.schedule.to(device)
    _plan_gradinit(surgery, normalized, device)
    scaffold.surgery = surgery
    scaffold.register_load_state_dict_post_hook(_sync_after_load)
    try:
        model.add_module("tost", scaffold)
        attach_masks(entries)
        if surgery.runner.tracing is None:
            surgery.sync()  # the eager stand-ins go in
        for name in names:
            setattr(model, name, types.MethodType(_rewritten(name), model))
        _zero_and_rescale(entries, factors, surgery.decided)
    except BaseException:
        _undo(model, entries)
        raise
    return model


def _checked_recipe(recipe: object) -> Recipe:
    recipe = Recipe.baseline() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise RecipeError(
            f"recipe must be a tost_surgery.Recipe, found {type(recipe).__name__}.\n"
            "Hint: Recipe.tost(total_steps=N) or Recipe.baseline()."
        )
    return recipe


def _check_sparse_kernels(value: object, native: object) -> None:
    if not (isinstance(value, str) and value in MODES):
        raise TostSurgeryError(
            f"sparse_kernels must be one of {', '.join(map(repr, MODES))};\nfound: {value!r}."
            + did_you_mean(str(value), MODES)
            + "\nHint: sparse_kernels='auto' times each masked layer and keeps the faster path."
        )
    if not isinstance(native, bool):
        raise TostSurgeryError(
            f"native_kernels must be True or False;\nfound: {native!r}.\nHint: native_kernels=True."
        )
    if native and value == "off":
        raise TostSurgeryError(
            "native_kernels=True needs the sparse kernels on;\nexpected: sparse_kernels 'auto' or 'on'\n"
            "found: sparse_kernels='off'\nHint: prepare(..., sparse_kernels='auto', native_kernels=True)."
        )


def _plan_kernels(surgery: Surgery, timer: Timer | None, native: bool) -> None:
    """A :class:`SparseLayer` under ``model.tost.kernels`` per masked layer with a sparse training kernel."""
    decided, context = surgery.decided, surgery.runner.context
    if decided.sparse_kernels == "off":
        return
    if native:
        native, why = training_native_available()
        if not native:
            warn(f"native_kernels: the compiled kernels could not be built ({why}); the torch-only kernels run.")
    policy = KernelPolicy.of(decided.sparse_kernels, timer, native)
    kernels = nn.ModuleDict()
    for entry in decided.entries:
        if entry.attr != "weight":
            continue  # a masked bias: read through its parametrization by the layer's kernel
        why = "a tied weight" if entry.aliases else ineligible(entry.module)
        if why:
            decided.kernel_skipped[entry.module_name] = why
            continue
        key = f"tost_kernel_{len(kernels)}"
        kernels[key] = SparseLayer(entry.module_name, entry.module, policy)
        context.layer_to_kernel[entry.module_name] = f"tost.kernels.{key}"
    context.scaffold.add_module("kernels", kernels)
    if not has_sparse_matmul():
        warn("sparse_kernels: torch has no MKL sparse matmul here (a build without MKL); every layer stays dense.")


def _plan_gradinit(surgery: Surgery, normalized: frozenset[str], device: torch.device) -> None:
    """With ``rescale_rule="gradinit"``: the layers gradinit will scale, and a saved flag for when it has."""
    recipe, scaffold = surgery.decided.recipe, surgery.runner.context.scaffold
    if not (recipe.rescale_init and recipe.rescale_rule == "gradinit"):
        return
    layers = tuple(e.name for e in rescaled_layers(surgery.decided.entries, recipe, normalized))
    surgery.decided.gradinit_layers = layers
    if layers:  # saved, so a resumed run knows the scales are in the weights
        scaffold.register_buffer("gradinit_done", torch.zeros((), dtype=torch.bool, device=device))
    else:
        surgery.runner.notes.append(f"gradinit: no masked conv/linear weight in rescale_scope={recipe.rescale_scope!r}")


def _trace_methods(model: nn.Module, surgery: Surgery) -> None:
    """Trace each method's default call; fall back to running the model eagerly when forward cannot be."""
    runner, decided = surgery.runner, surgery.decided
    for name, signature in list(runner.signatures.items()):
        variant = runner.add_variant(model, name, signature.default_layout())
        if variant is None and name == "forward":
            _run_eagerly(model, surgery)
            return
        if variant is None:
            del runner.signatures[name]
            warn(
                f"{decided.model_name}.{name} cannot be traced ({runner.notes[-1]}); it runs the masked layers "
                "without the scaffolding, so during the warm-up it computes another network than forward."
            )
        else:
            signature.prefill()
    surgery.sync()


def _run_eagerly(model: nn.Module, surgery: Surgery) -> None:
    """forward cannot be traced: the techniques with an eager stand-in use it, the others are left out."""
    runner, decided = surgery.runner, surgery.decided
    warn(f"{decided.model_name} cannot be traced ({runner.notes[-1]}); {FALLBACK}")
    runner.notes[-1] += "; only masks, rescaling and eager ghost neurons"
    runner.tracing, runner.variants = None, {}
    for technique in TECHNIQUES:
        if technique.name not in decided.enabled:
            continue
        if technique.eager is None:
            runner.notes.append(f"{technique.label}s not applied: they need a graph")
            decided.enabled = decided.enabled - {technique.name}
        else:
            runner.eager[technique.name] = technique.eager(model, decided.recipe, surgery.schedule)


def _methods_to_rewrite(model: nn.Module, methods: Iterable[str]) -> tuple[str, ...]:
    """forward, the default methods the class has, and the methods asked for (which it must have)."""
    if isinstance(methods, str):
        raise TostSurgeryError(f"methods takes a list of method names, found the str {methods!r}.\n"
                               f"Hint: methods=[{methods!r}]")
    cls = type(model)
    names = ["forward"] + [m for m in DEFAULT_METHODS if inspect.isfunction(getattr(cls, m, None))]
    for name in methods:
        if not isinstance(name, str) or not inspect.isfunction(getattr(cls, name, None)):
            candidates = [n for n in dir(cls) if not n.startswith("_") and inspect.isfunction(getattr(cls, n, None))]
            raise TostSurgeryError(
                f"methods names {name!r}, which is no method of {cls.__name__}." + did_you_mean(str(name), candidates)
            )
        if name not in names:
            names.append(name)
    patched = [n for n in names if n in model.__dict__ and n != "forward"]
    if patched:
        raise StateError(
            f"{cls.__name__} has {patched[0]!r} set on the instance; tost_surgery rewrites the class's method.\n"
            "Hint: prepare the plain model, before patching it."
        )
    return tuple(names)


def _zero_and_rescale(
    entries: list[MaskEntry], factors: Mapping[str, torch.Tensor | float], decided: Decisions
) -> None:
    """Zero the masked weights and apply the rescale factors, in place.

    Every multiplier is built before the first weight changes, so a failure leaves the weights as they were.
    """
    multipliers = []
    for entry in entries:
        weight = original_parameter(entry)
        multiplier = entry.given.to(weight.dtype)
        factor = factors.get(entry.name)
        if factor is not None:
            multiplier = multiplier * torch.as_tensor(factor, dtype=weight.dtype, device=weight.device)
        multipliers.append((weight, multiplier))
    with torch.no_grad():
        for weight, multiplier in multipliers:
            weight.mul_(multiplier)
    for entry in entries:
        factor = factors.get(entry.name)
        if factor is not None:
            decided.rescaled[entry.name] = float(torch.as_tensor(factor).float().mean())


def finalize(model: nn.Module, *, force: bool = False) -> nn.Module:
    """Remove the scaffolding and bake the masks: a plain sparse model of the original class.

    Returns the same object, with its original forward and ``state_dict`` keys, and masked
    weights exactly zero. Refuses while scaffolding is still annealing, unless ``force``
    (which drops it mid-way: outputs change).

    Example:
        >>> clean = finalize(model)
        >>> type(clean)().load_state_dict(clean.state_dict())
    """
    surgery = surgery_of(model, "finalize")
    pending = surgery.pending()
    if pending and not force:
        schedule = surgery.schedule
        details = ", ".join(
            f"ghost {t} at step {schedule.steps_taken} of {schedule.recipe.warmup_steps(t)}" for t in sorted(pending)
        )
        raise StateError(
            f"Cannot finalize {type(model).__name__}: scaffolding is still annealing ({details}).\n"
            "Hint: keep training (tost_surgery.step / bind) to the end of the warm-up, "
            "or pass force=True to drop it now (the outputs will change)."
        )
    for handle in list(surgery.bindings.values()):
        handle.remove()
    surgery.bindings.clear()
    detach_masks(surgery.decided.entries, bake=True)
    _undo(model, [])
    return model


def surgery_of(model: nn.Module, verb: str) -> Surgery:
    """The :class:`Surgery` of a prepared model, or a :class:`StateError` naming ``verb``."""
    if not is_prepared(model):
        inner = getattr(model, "module", None) if isinstance(model, nn.Module) else None
        if is_prepared(inner):
            raise StateError(
                f"{verb}: {type(model).__name__} wraps a prepared {type(inner).__name__}; "
                "tost_surgery works on the model itself.\nHint: pass the prepared model (wrapper.module)."
            )
        raise StateError(
            f"{verb}: {type(model).__name__} is not prepared by tost_surgery.\n"
            "Hint: call tost_surgery.prepare(model, mask, recipe) first."
        )
    return model.tost.surgery


def _check_preparable(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TostSurgeryError(f"prepare takes an nn.Module, found {type(model).__name__}.")
    name = type(model).__name__
    if is_prepared(model):
        raise StateError(
            f"{name} is already prepared by tost_surgery.\nHint: finalize(model) first, or prepare a fresh model."
        )
    if hasattr(model, "tost"):
        raise StateError(f"{name} already has an attribute 'tost', where tost_surgery keeps its scaffolding.")
    wrapped = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
    if isinstance(wrapped, nn.Module) and name in (
        "OptimizedModule", "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"
    ):
        raise StateError(
            f"prepare got a {name} wrapper.\n"
            "Hint: prepare the inner model first, then wrap it (torch.compile, DDP, ...)."
        )
    meta = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise StateError(
            f"{name} has parameters on the meta device ({meta!r}): masks and rescaling need their values.\n"
            "Hint: materialize the model first (model.to_empty(device=...), then initialize it), then prepare."
        )
    if torch.is_inference_mode_enabled():
        raise StateError(
            "prepare was called under torch.inference_mode(): the masks and ghost modules it makes would be "
            "inference tensors, which autograd cannot train.\n"
            "Hint: call prepare outside inference_mode (torch.no_grad() is fine)."
        )
    if "forward" in model.__dict__:
        raise StateError(
            f"{name} has a forward set on the instance; torch.fx traces the class's forward.\n"
            "Hint: prepare the plain model, before patching or wrapping it."
        )


def _undo(model: nn.Module, entries: list[MaskEntry]) -> None:
    """Take off whatever prepare attached: masks (unbaked), the scaffold, the forward."""
    detach_masks(entries, bake=False)
    scaffold = model._modules.get("tost")
    surgery = getattr(scaffold, "surgery", None)
    for fallback in surgery.runner.eager.values() if surgery is not None else ():
        fallback.swap(ghosts=False)
    installed = surgery.decided.installed if surgery is not None else ()
    if "tost" in model._modules:
        del model._modules["tost"]
    for name in installed:
        model.__dict__.pop(name, None)

