"""The state a graph pass reads and writes, kept in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import fx, nn

if TYPE_CHECKING:
    from .._modules import Scaffold
    from .._recipe import Recipe


SCHEDULE = "tost.schedule"
CONSTANTS = "tost.constants"
"""Where tensors that torch.fx lifted out of forward (``_tensor_constant0``) are kept."""
TAG = "tost"
"""``node.meta[TAG]`` names the technique that inserted the node."""
SITE = "tost_site"
"""``node.meta[SITE]`` on a ghost's output node: the layer or node it stands beside, for plans."""


@dataclass
class PassContext:
    """What passes share: the recipe, the model's modules, and where new modules go.

    ``conv_to_skip`` remembers which ghost module serves which conv, so the train and eval
    graphs (and every rebuild after a retirement) share the same modules.
    """

    recipe: Recipe
    modules: dict[str, nn.Module]
    scaffold: Scaffold
    conv_to_skip: dict[str, str | None] = field(default_factory=dict)
    can_add_modules: bool = True
    """False once prepare has returned: a graph traced later reuses the ghost modules it made (a new
    one would be missing from the optimizer and from checkpoints)."""
    preactivation: bool | None = None
    """Whether some conv ends a residual branch with no norm after it, for ``skip_branch="auto"``;
    decided on the first traced graph, before any pass rewrites it."""
    layer_to_kernel: dict[str, str] = field(default_factory=dict)
    """Masked layers that have a sparse training kernel, and its module's graph target."""


def schedule_coefficient(graph: fx.Graph, technique: str) -> fx.Node:
    """A tagged call ``tost.schedule(technique)``, the annealed coefficient, placed before every possible user."""
    first = next(node for node in graph.nodes if node.op != "placeholder")
    with graph.inserting_before(first):
        node = graph.call_module(SCHEDULE, (technique,))
    node.meta[TAG] = technique
    return node
