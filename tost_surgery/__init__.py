"""tost_surgery: train a sparse network better with any mask (the ToST recipe, ICML 2022).

Example:
    >>> import tost_surgery as tost
    >>> mask = tost.masks.erk(model, sparsity=0.95, seed=0)
    >>> model = tost.prepare(model, mask, tost.Recipe.tost(total_steps=10_000))
    >>> tost.bind(model, optimizer)
    >>> loss = F.cross_entropy(model(x), y, label_smoothing=tost.label_smoothing(model))
    >>> clean = tost.finalize(model)
"""

from . import deploy, init, losses, masks
from ._distributed import check_masks_match
from ._errors import MaskError, RecipeError, StateError, TostSurgeryError, TostSurgeryWarning, TraceError
from ._plan import Plan, plan
from ._recipe import Recipe
from ._report import Report, report
from ._scaffold_params import scaffold_parameters
from ._surgery import finalize, prepare
from ._training import BindHandle, bind, graph, label_smoothing, step

__version__ = "0.1.0"

__all__ = [
    "BindHandle",
    "MaskError",
    "Plan",
    "Recipe",
    "RecipeError",
    "Report",
    "StateError",
    "TostSurgeryError",
    "TostSurgeryWarning",
    "TraceError",
    "bind",
    "check_masks_match",
    "deploy",
    "finalize",
    "graph",
    "init",
    "label_smoothing",
    "losses",
    "masks",
    "plan",
    "prepare",
    "report",
    "scaffold_parameters",
    "step",
]
