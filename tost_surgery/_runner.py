"""What runs in a prepared model: each traced call layout's graph, with the active techniques' scaffolding."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from ._errors import TraceError, warn
from ._fx._codegen import compile_forward
from ._fx._context import SITE, TAG
from ._fx._layout import CallSignature, Layout
from ._fx._tracing import Tracing, trace_call
from ._fx.passes import route_to_kernels
from ._fx.passes.ghost_skips import ends_residual_branch_unnormalized
from ._fx.passes.split_norm_act import split_norm_act
from ._techniques import EagerFallback, graph_techniques

if TYPE_CHECKING:
    from ._fx._context import PassContext
    from ._schedule import Schedule

_MANY_LAYOUTS = 8


@dataclass
class Variant:
    """One traced call layout of one method: its graphs without scaffolding, and what runs now."""

    pristine: dict[bool, fx.Graph]
    graphs: dict[bool, fx.Graph] = field(default_factory=dict)
    forwards: dict[bool, Callable] = field(default_factory=dict)


@dataclass
class Runner:
    """The rewritten methods of one model, kept in step with its schedule.

    ``active`` is the set of techniques whose scaffolding is in the graphs now; a technique whose
    warm-up has ended retires: :meth:`sync` rebuilds the graphs without it.
    """

    context: PassContext
    tracing: Tracing | None
    """How the model's methods are traced; None when the model runs eagerly."""
    signatures: dict[str, CallSignature]
    """The rewritten methods (forward first) and their signatures."""
    model_name: str
    variants: dict[tuple[str, Layout], Variant] = field(default_factory=dict)
    """Traced call layouts by ``(method, layout)``; the first is forward's default call."""
    eager: dict[str, EagerFallback] = field(default_factory=dict)
    """The techniques' stand-ins when the model runs eagerly."""
    notes: list[str] = field(default_factory=list)
    active: frozenset[str] = frozenset()
    synced_at: tuple[int, int] | None = None
    """The schedule's version when :meth:`sync` last looked."""

    @property
    def default_variant(self) -> Variant | None:
        """forward's variant for a call with a tensor per required argument (None when eager)."""
        return next(iter(self.variants.values()), None)

    def sync(self, schedule: Schedule, enabled: frozenset[str]) -> None:
        """Rebuild what runs when the set of unfinished techniques changed (a step, a load, a copied step).

        Finished techniques retire: they are left out of the graph, not multiplied by zero.
        """
        version = schedule.version()
        if version == self.synced_at:
            return
        self.synced_at = version
        active = frozenset(t for t in enabled if not schedule.is_finished(t))
        if active == self.active:
            return
        self.active = active
        for name, fallback in self.eager.items():
            fallback.swap(ghosts=name in active)
        for variant in self.variants.values():
            self._build(variant)
        for technique in graph_techniques():
            # Retired scaffolding gets no gradient: frozen, a data-parallel wrapper built from now
            # on leaves it out (DDP would otherwise wait for its gradients and fail).
            modules = self.context.scaffold._modules.get(technique.name)
            if modules is not None:
                modules.requires_grad_(technique.name in active)

    def _build(self, variant: Variant) -> None:
        """The variant's graphs with the active techniques' passes, compiled to forwards."""
        graphs: dict[bool, fx.Graph] = {}
        for mode, pristine in variant.pristine.items():
            if mode is False and pristine is variant.pristine[True]:
                graphs[False] = graphs[True]
                continue
            graph = copy.deepcopy(pristine)
            for technique in graph_techniques():
                if technique.name in self.active:
                    technique.insert(graph, self.context)
            if not self.active:  # the plain masked model: its layers may run sparse kernels
                route_to_kernels(graph, self.context)
            graph.lint()
            graphs[mode] = graph
        variant.graphs = graphs
        variant.forwards = {
            mode: compile_forward(graph, f"{self.model_name} {'train' if mode else 'eval'}")
            for mode, graph in graphs.items()
        }
        if graphs[False] is graphs[True]:
            variant.forwards[False] = variant.forwards[True]

    def add_variant(self, model: nn.Module, method: str, layout: Layout) -> Variant | None:
        """Trace ``method`` for calls with ``layout``; None (with a note) if it cannot be traced."""
        prefix = f"v{len(self.variants)}_" if self.variants else ""
        graphs, notes, constants = trace_call(model, self.tracing, method, self.signatures[method], layout, prefix)
        self.notes.extend(n for n in notes if n not in self.notes)
        if graphs is None:
            return None
        for graph in {id(g): g for g in graphs.values()}.values():
            split_norm_act(graph, self.context)
        if self.context.preactivation is None:
            self.context.preactivation = ends_residual_branch_unnormalized(graphs[True], self.context.modules)
        self.context.scaffold.add_constants(constants)
        variant = Variant(graphs)
        self._build(variant)
        self.variants[(method, layout)] = variant
        return variant

    @torch.compiler.disable
    def trace_for_call(self, model: nn.Module, method: str, layout: Layout) -> Variant:
        """A variant for a call layout not seen before (traced now), or a :class:`TraceError`."""
        signature = self.signatures[method]
        variant = self.add_variant(model, method, layout)
        if variant is None:
            raise TraceError(
                f"{self.model_name}.{method} cannot be traced for a call with {signature.describe(layout)}: "
                f"{self.notes[-1]}.\nHint: pass leaf_modules=[...] to prepare for the submodule that branches "
                "on this argument, or call the model with arguments that were traced before."
            )
        count = sum(1 for m, _ in self.variants if m == method)
        if count == _MANY_LAYOUTS:
            warn(
                f"{self.model_name}.{method} has now been traced for {count} call layouts: every new value of a "
                f"non-tensor argument traces it again (latest: {signature.describe(layout)}).\nHint: pass values "
                "that change from call to call as tensors."
            )
        return variant

    def call(self, model: nn.Module, method: str, args: tuple, kwargs: Mapping) -> object:
        """Run ``method``'s rewritten graph for this call's layout and mode."""
        layout, inputs = self.signatures[method].bind(args, kwargs)
        variant = self.variants.get((method, layout))
        if variant is None:
            variant = self.trace_for_call(model, method, layout)
        return variant.forwards[model.training](model, *inputs)

    def sites(self) -> dict[str, tuple[str, ...]]:
        """Where each active technique acts: the tags its pass left in forward's graph, or its eager stand-in."""
        found: dict[str, list[str]] = {name: [] for name in sorted(self.active)}
        variant = self.default_variant
        if variant is not None:
            for node in variant.graphs[True].nodes:
                if SITE in node.meta:
                    found.setdefault(node.meta[TAG], []).append(node.meta[SITE])
        for name, fallback in self.eager.items():
            if name in self.active:
                found.setdefault(name, []).extend(f"{where} (eager)" for where in fallback.site_names)
        return {name: tuple(where) for name, where in found.items()}

    def linear_skips(self) -> frozenset[str]:
        """Square Linear modules the skip pass puts an identity skip around (in forward's default call)."""
        recipe = self.context.recipe
        variant = self.default_variant
        if variant is None or not (recipe.ghost_skips and recipe.skip_linear):
            return frozenset()
        modules = self.context.modules
        return frozenset(
            str(node.target)
            for node in variant.pristine[True].nodes
            if node.op == "call_module"
            and isinstance(modules.get(node.target), nn.Linear)
            and modules[node.target].in_features == modules[node.target].out_features
        )
