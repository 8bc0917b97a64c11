"""Mask makers. A mask is ``{parameter name: bool tensor shaped like the parameter}``.

Example:
    >>> mask = tost_surgery.masks.erk(model, sparsity=0.95, seed=0)
"""

from .._scope import prunable_weights
from ._layerwise import erk, erk_densities, random
from ._lottery import LotteryTicket, lottery
from ._nm import nm
from ._scores import grasp, magnitude, snip, synflow
from ._select import keep_top
from ._sources import from_callable, from_state_dict, from_torch_prune

__all__ = [
    "LotteryTicket",
    "erk",
    "erk_densities",
    "from_callable",
    "from_state_dict",
    "from_torch_prune",
    "grasp",
    "keep_top",
    "lottery",
    "magnitude",
    "nm",
    "prunable_weights",
    "random",
    "snip",
    "synflow",
]
