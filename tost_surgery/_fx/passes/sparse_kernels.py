"""Pass: call the sparse training kernels in place of the masked layers that have one."""

from __future__ import annotations

from torch import fx

from .._context import PassContext


def route_to_kernels(graph: fx.Graph, context: PassContext) -> None:
    """Point every call of a layer in ``context.layer_to_kernel`` at its kernel module.

    Before::

        y = layer1.0.conv1(x)

    After::

        y = tost.kernels.layer1_0_conv1(x)   # SparseLayer: the same map, the same parameters

    Runs only when no technique's scaffolding is in the graph (the kernels compute the plain
    masked layer).
    """
    for node in graph.nodes:
        if node.op == "call_module" and node.target in context.layer_to_kernel:
            node.target = context.layer_to_kernel[node.target]
