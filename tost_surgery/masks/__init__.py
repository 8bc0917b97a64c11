"""Mask makers. A mask is ``{parameter name: bool tensor shaped like the parameter}``.

Example:
    >>> mask = tost_surgery.masks.erk(model, sparsity=0.95, seed=0)
"""

from ._layerwise import erk, erk_densities, random
from ._scope import prunable_weights

__all__ = ["erk", "erk_densities", "prunable_weights", "random"]
