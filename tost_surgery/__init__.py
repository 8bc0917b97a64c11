"""tost_surgery: train a sparse network better with any mask (the ToST recipe, ICML 2022).

Example:
    >>> import tost_surgery as tost
    >>> mask = tost.masks.erk(model, sparsity=0.95, seed=0)
    >>> model = tost.prepare(model, mask, tost.Recipe.tost(total_steps=10_000))
    >>> tost.bind(model, optimizer)
    >>> loss = F.cross_entropy(model(x), y, label_smoothing=tost.label_smoothing(model))
    >>> clean = tost.finalize(model)
"""

from . import deploy, init, masks
from ._distributed import check_masks_match
from ._errors import MaskError, RecipeError, StateError, TostSurgeryError, TostSurgeryWarning, TraceError
from ._plan import Plan, plan
from ._recipe import Recipe
from ._report import Report, report
from ._status import Status, status
from ._surgery import finalize, prepare
from ._training import bind, graph, label_smoothing, step

__version__ = "0.1.0"

__all__ = [
    "MaskError",
    "Plan",
    "Recipe",
    "RecipeError",
    "Report",
    "StateError",
    "Status",
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
    "masks",
    "plan",
    "prepare",
    "report",
    "status",
    "step",
]
