"""prepare / finalize: the lifecycle of a model under the ToST recipe."""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ._eager import EagerNeurons
from ._errors import RecipeError, StateError, TostSurgeryError
from ._fx._codegen import compile_forward
from ._fx._context import PassContext
from ._fx._tracing import trace_per_mode
from ._fx.passes import insert_ghost_neurons, insert_ghost_skips
from ._fx.passes.split_norm_act import split_norm_act
from ._masking import MaskEntry, attach_masks, detach_masks, normalize_mask, original_parameter, resolve_mask
from ._modules import Scaffold
from ._recipe import Recipe
from ._rescale import outside_scope, rescale_factors, rescaled_layers
from ._schedule import Technique

# The order in which graph passes run; each inserts one technique's scaffolding.
PASSES: tuple[tuple[Technique, Callable[[fx.Graph, PassContext], None]], ...] = (
    ("neurons", insert_ghost_neurons),
    ("skips", insert_ghost_skips),
)


@dataclass
class Surgery:
    """Everything prepare decided about one model, kept on ``model.tost.surgery``."""

    context: PassContext
    entries: list[MaskEntry]
    pristine: dict[bool, fx.Graph] | None
    """The traced graphs without scaffolding; None when the model runs eagerly."""
    signature: inspect.Signature
    enabled: frozenset[Technique]
    model_name: str
    notes: list[str] = field(default_factory=list)
    """What was not applied as asked, and why (blocks kept whole, eager fallback)."""
    eager_neurons: EagerNeurons | None = None
    rescaled: dict[str, float] = field(default_factory=dict)
    active: frozenset[Technique] = frozenset()
    graphs: dict[bool, fx.Graph] = field(default_factory=dict)
    forwards: dict[bool, Callable] = field(default_factory=dict)
    bindings: dict[int, object] = field(default_factory=dict)
    gradinit_layers: tuple[str, ...] | None = None
    """With ``rescale_rule="gradinit"``: the masked weights gradinit learns a scale for."""
    gradinit_checked: bool = False
    """Whether ``step`` has looked for GradInit scales still to apply (it does so once)."""

    def gradinit_pending(self) -> bool:
        """The recipe asks for GradInit scales and :func:`tost_surgery.init.gradinit` has not applied them."""
        done = getattr(self.context.scaffold, "gradinit_done", None)
        return bool(self.gradinit_layers) and done is not None and not bool(done)

    @property
    def schedule(self):
        return self.context.scaffold.schedule

    def pending(self) -> frozenset[Technique]:
        """Enabled techniques that have not reached their end state yet."""
        return frozenset(t for t in self.enabled if not self.schedule.is_finished(t))

    def sync(self, *, force: bool = False) -> None:
        """Rebuild the graphs when the set of unfinished techniques changed.

        Finished techniques retire: they are left out of the graph, not multiplied by zero.
        """
        active = self.pending()
        if self.pristine is None:
            if self.eager_neurons is not None:
                self.eager_neurons.swap(ghosts="neurons" in active)
            self.active = active
            return
        if active == self.active and self.forwards and not force:
            return
        graphs: dict[bool, fx.Graph] = {}
        for mode, pristine in self.pristine.items():
            if mode is False and pristine is self.pristine[True]:
                graphs[False] = graphs[True]
                continue
            graph = copy.deepcopy(pristine)
            for technique, insert in PASSES:
                if technique in active:
                    insert(graph, self.context)
            graph.lint()
            graphs[mode] = graph
        self.graphs = graphs
        self.forwards = {
            mode: compile_forward(graph, f"{self.model_name} {'train' if mode else 'eval'}")
            for mode, graph in graphs.items()
        }
        if graphs[False] is graphs[True]:
            self.forwards[False] = self.forwards[True]
        # Retired scaffolding gets no gradient: freeze it, so that a data-parallel wrapper built
        # from now on leaves it out (DDP would otherwise wait for its gradients and fail).
        self.context.scaffold.skips.requires_grad_("skips" in active)
        self.active = active

    def positional(self, args: tuple, kwargs: Mapping) -> tuple:
        """The call's arguments in positional order (fx may rename its placeholders)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.kwargs:
            raise TostSurgeryError(
                f"The prepared forward cannot pass extra keyword arguments {sorted(bound.kwargs)}.\n"
                "Hint: pass them positionally or as named parameters of forward."
            )
        return bound.args


def _prepared_forward(self: nn.Module, *args, **kwargs):
    """The forward of a prepared model: the rewritten graph of the current mode."""
    surgery: Surgery = self.tost.surgery
    if kwargs:
        args = surgery.positional(args, kwargs)
    return surgery.forwards[self.training](self, *args)


def _sync_after_load(scaffold: Scaffold, incompatible_keys: object) -> None:
    scaffold.surgery.sync()


def prepare(
    model: nn.Module,
    mask: Mapping[str, torch.Tensor],
    recipe: Recipe | None = None,
    *,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    strict: bool = False,
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
        strict: raise a :class:`TraceError` instead of calling an untraceable submodule
            whole, or running an untraceable model eagerly (both warn by default).

    Example:
        >>> model = prepare(model, masks.erk(model, 0.95), Recipe.tost(total_steps=10_000))
    """
    _check_preparable(model)
    recipe = Recipe.baseline() if recipe is None else recipe
    if not isinstance(recipe, Recipe):
        raise RecipeError(
            f"recipe must be a tost_surgery.Recipe, found {type(recipe).__name__}.\n"
            "Hint: Recipe.tost(total_steps=N) or Recipe.baseline()."
        )
    entries = normalize_mask(model, resolve_mask(model, mask))
    pristine, notes, constants = trace_per_mode(model, leaf_modules, strict=strict)
    modules = dict(model.named_modules())
    scaffold = Scaffold(recipe)
    scaffold.add_constants(constants)
    context = PassContext(recipe, modules, scaffold)
    enabled = {t for t, on in (("neurons", recipe.ghost_neurons), ("skips", recipe.ghost_skips)) if on}
    eager_neurons = None
    if pristine is None:
        if "skips" in enabled:
            notes.append("ghost skips not applied: they need a graph")
        enabled.discard("skips")
        if "neurons" in enabled:
            kinds = {"relu", "relu6"} if recipe.neuron_relu6 else {"relu"}
            eager_neurons = EagerNeurons(model, kinds, recipe.soft_activation, scaffold.schedule)
    else:
        for graph in {id(g): g for g in pristine.values()}.values():
            split_norm_act(graph, context)
    surgery = Surgery(
        context=context,
        entries=entries,
        pristine=pristine,
        signature=inspect.signature(model.forward),
        enabled=frozenset(enabled),
        model_name=type(model).__name__,
        notes=notes,
        eager_neurons=eager_neurons,
    )
    if pristine is not None:
        surgery.sync()
    normalized = outside_scope(pristine[True], modules, recipe.rescale_scope) if pristine is not None else frozenset()
    factors = rescale_factors(entries, recipe, normalized)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    scaffold.schedule.to(device)
    if recipe.rescale_init and recipe.rescale_rule == "gradinit":
        surgery.gradinit_layers = tuple(e.name for e in rescaled_layers(entries, recipe, normalized))
        if surgery.gradinit_layers:  # saved, so a resumed run knows the scales are in the weights
            scaffold.register_buffer("gradinit_done", torch.zeros((), dtype=torch.bool, device=device))
        else:
            notes.append(f"gradinit: no masked conv/linear weight in rescale_scope={recipe.rescale_scope!r}")
    scaffold.surgery = surgery
    scaffold.register_load_state_dict_post_hook(_sync_after_load)
    try:
        model.add_module("tost", scaffold)
        attach_masks(entries)
        if pristine is None:
            surgery.sync()
        else:
            model.forward = types.MethodType(_prepared_forward, model)
        _zero_and_rescale(entries, factors, surgery)
    except BaseException:
        _undo(model, entries)
        raise
    return model


def _zero_and_rescale(entries: list[MaskEntry], factors: Mapping[str, torch.Tensor | float], surgery: Surgery) -> None:
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
            surgery.rescaled[entry.name] = float(torch.as_tensor(factor).float().mean())


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
    detach_masks(surgery.entries, bake=True)
    _undo(model, [])
    return model


def surgery_of(model: nn.Module, verb: str) -> Surgery:
    """The :class:`Surgery` of a prepared model, or a :class:`StateError` naming ``verb``."""
    scaffold = getattr(model, "tost", None) if isinstance(model, nn.Module) else None
    if not isinstance(scaffold, Scaffold):
        inner = getattr(model, "module", None) if isinstance(model, nn.Module) else None
        if isinstance(getattr(inner, "tost", None), Scaffold):
            raise StateError(
                f"{verb}: {type(model).__name__} wraps a prepared {type(inner).__name__}; "
                "tost_surgery works on the model itself.\nHint: pass the prepared model (wrapper.module)."
            )
        raise StateError(
            f"{verb}: {type(model).__name__} is not prepared by tost_surgery.\n"
            "Hint: call tost_surgery.prepare(model, mask, recipe) first."
        )
    return scaffold.surgery


def _check_preparable(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TostSurgeryError(f"prepare takes an nn.Module, found {type(model).__name__}.")
    name = type(model).__name__
    if isinstance(getattr(model, "tost", None), Scaffold):
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
    eager = getattr(getattr(scaffold, "surgery", None), "eager_neurons", None)
    if eager is not None:
        eager.swap(ghosts=False)
    if "tost" in model._modules:
        del model._modules["tost"]
    model.__dict__.pop("forward", None)

