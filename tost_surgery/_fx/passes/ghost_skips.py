"""Pass: a temporary skip branch beside every Conv2d (and, by setting, square Linear)."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..._modules import GhostSkip
from .._context import SITE, TAG, PassContext, schedule_coefficient
from .._patterns import Modules, conv_padding_kind, module_of, norm_after, residual_branch_ends


def insert_ghost_skips(graph: fx.Graph, context: PassContext) -> None:
    """Add ``a * branch(x)`` from each Conv2d's input to its BatchNorm's output.

    Sites: ``nn.Conv2d`` modules with torch's forward, and timm's ``StdConv2d`` /
    ``Conv2dSame`` families; other Conv2d subclasses (unknown forward, so unknown output
    size) get no skip.

    Before::

        c = conv(x)
        n = bn(c)              # when a BatchNorm follows; else the skip lands on c

    After (``a = tost.schedule("skips")``, annealed 1 -> 0)::

        c = conv(x)
        n = bn(c)
        g = tost.skips.tost_skip_0(x)     # 1x1 conv + BN, or BN of the (sampled) input
        y = torch.addcmul(n, a, g)        # n + a * g

    With ``recipe.skip_linear``, ``nn.Linear`` layers with ``in == out`` get ``y = l + a * x``
    (a plain identity: there is one such skip per linear layer, not one per conv). The branch
    follows ``recipe.skip_branch``; for ``auto``, ``context.preactivation`` (set from the traced
    graph, before any pass, by :func:`ends_residual_branch_unnormalized`).
    ``a``, ``g`` and ``y`` are tagged ``skips``.
    """
    scale: fx.Node | None = None
    for node in list(graph.nodes):
        branch = _branch_target(node, context)
        if branch is _NO_SITE:
            continue
        target = norm_after(node, context.modules) or node
        x = node.args[0]
        users = list(target.users)
        if scale is None:
            scale = schedule_coefficient(graph, "skips")
        with graph.inserting_before(target.next):
            ghost = x if branch is None else _tagged(graph.call_module(branch, (x,)))
            out = _tagged(graph.call_function(torch.addcmul, (target, scale, ghost)))
        landing = target.target if target.op == "call_module" else target.name
        if branch is None:
            via = "identity"
        else:
            via = f"{branch} ({context.scaffold.skip_at(branch).kind})"
        out.meta[SITE] = f"{node.target} -> {landing} via {via}"
        for user in users:
            user.replace_input_with(target, out)


_NO_SITE = object()


def _branch_target(node: fx.Node, context: PassContext) -> object:
    """The branch module's target for a site, None for an identity branch, else _NO_SITE."""
    module = module_of(node, context.modules)
    recipe = context.recipe
    padding = conv_padding_kind(module)
    if padding is not None:
        if not recipe.skip_pointwise and tuple(module.kernel_size) == (1, 1) and module.groups == 1:
            return _NO_SITE  # the 1x1 branch would be a dense copy of this 1x1 layer
        key = str(node.target)
        if key not in context.conv_to_skip and not context.can_add_modules:
            return _NO_SITE
        if key not in context.conv_to_skip:
            square = module.in_channels == module.out_channels
            per_channel = recipe.skip_branch == "bn" or (recipe.skip_branch == "auto" and not context.preactivation)
            branch = "bn" if per_channel and square else "conv_bn"
            skip = GhostSkip(module, branch=branch, init=recipe.skip_init, dynamic_same=padding == "dynamic_same")
            context.conv_to_skip[key] = context.scaffold.add_skip(skip)
        return context.conv_to_skip[key]
    if recipe.skip_linear and isinstance(module, nn.Linear) and module.in_features == module.out_features:
        return None
    return _NO_SITE


def ends_residual_branch_unnormalized(graph: fx.Graph, modules: Modules) -> bool:
    """Whether a ghost-skip site (a Conv2d) ends a residual branch, no norm after it: a pre-activation
    network. Read it on the traced graph: the other passes rewrite the ops it looks through."""
    return any(conv_padding_kind(modules[name]) is not None for name in residual_branch_ends(graph, modules))


def _tagged(node: fx.Node) -> fx.Node:
    node.meta[TAG] = "skips"
    return node
