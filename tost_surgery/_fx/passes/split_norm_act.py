"""Pass: open timm's norm-act layers, so the norm and the activation are separate nodes."""

from __future__ import annotations

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._context import PassContext
from .._ops import norm_of_norm_act
from .._patterns import module_of


def is_norm_act(module: nn.Module | None) -> bool:
    """A timm BatchNorm with its activation inside (``BatchNormAct2d``, ``SyncBatchNormAct``)."""
    return (
        isinstance(module, _BatchNorm)
        and type(module).__module__.startswith("timm.")
        and isinstance(getattr(module, "act", None), nn.Module)
    )


def split_norm_act(graph: fx.Graph, context: PassContext) -> None:
    """Replace each norm-act call with its three steps (bit-exact: the layer's own forward is these).

    Before::

        y = bn1(x)                       # BatchNormAct2d: norm, dropout, activation inside

    After::

        m = self.bn1
        n = norm_of_norm_act(m, x)       # the torch BatchNorm2d forward
        d = bn1.drop(n)
        y = bn1.act(d)

    The skip pass then lands on ``n`` (before the activation) and the ghost neuron pass sees
    ``bn1.act`` when it is an ``nn.ReLU``. Runs on the traced graph, before any other pass.
    """
    for node in list(graph.nodes):
        module = module_of(node, context.modules)
        if not is_norm_act(module):
            continue
        with graph.inserting_before(node):
            out = graph.call_function(norm_of_norm_act, (graph.get_attr(str(node.target)), node.args[0]))
            for child in ("drop", "act"):
                if isinstance(getattr(module, child, None), nn.Module):
                    out = graph.call_module(f"{node.target}.{child}", (out,))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
