"""Pass: every ReLU call site becomes a blend of a smooth activation and ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .._context import SITE, TAG, PassContext, schedule_coefficient
from .._patterns import activation_site, aliases, is_inplace

SOFT_ACTIVATIONS = {"silu": F.silu, "mish": F.mish, "softplus": F.softplus, "gelu": F.gelu}
HARD_ACTIVATIONS = {"relu": torch.relu, "relu6": F.relu6}


def insert_ghost_neurons(graph: fx.Graph, context: PassContext) -> None:
    """Replace each ReLU (module, function, method, in-place or not) with a ghost neuron.

    With ``recipe.neuron_relu6`` ReLU6 sites too (``h = F.relu6(x)``).

    Before::

        y = relu(x)            # nn.ReLU, F.relu, torch.relu, x.relu_(), ...

    After (``b = tost.schedule("neurons")``, annealed 0 -> 1)::

        s = soft(x)            # F.silu by default
        h = torch.relu(x)      # out of place: soft(x) must see the input unchanged
        y = torch.lerp(s, h, b)   # (1 - b) * s + b * h

    An in-place ReLU also changed its input for every later reader: those readers are
    pointed at ``y``. ``s``, ``b`` and ``y`` are tagged ``neurons``.
    """
    soft = SOFT_ACTIVATIONS[context.recipe.soft_activation]
    kinds = {"relu", "relu6"} if context.recipe.neuron_relu6 else {"relu"}
    blend: fx.Node | None = None
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        site = activation_site(node, context.modules)
        if site not in kinds:
            continue
        x = node.args[0]
        if blend is None:
            blend = schedule_coefficient(graph, "neurons")
        with graph.inserting_before(node):
            smooth = _tagged(graph.call_function(soft, (x,)))
            hard = graph.call_function(HARD_ACTIVATIONS[site], (x,))
            ghost = _tagged(graph.call_function(torch.lerp, (smooth, hard, blend)))
        ghost.meta[SITE] = f"{node.target if node.op == 'call_module' else node.name} ({site})"
        if is_inplace(node, context.modules):
            later = order[node]
            for alias in aliases(x, context.modules):
                for user in list(alias.users):
                    if user not in (smooth, hard, ghost) and order.get(user, -1) > later:
                        user.replace_input_with(alias, ghost)
        node.replace_all_uses_with(ghost)
        graph.erase_node(node)


def _tagged(node: fx.Node) -> fx.Node:
    node.meta[TAG] = "neurons"
    return node
