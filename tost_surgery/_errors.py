"""The one exception family of tost_surgery.

Every error a user can cause is a :class:`TostSurgeryError` (a ``ValueError``), so
``except ValueError`` keeps working in code that predates the library.
"""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Iterable


class TostSurgeryError(ValueError):
    """Base class: something about the input or the call order was wrong."""


class MaskError(TostSurgeryError):
    """The mask names no parameter, has the wrong shape, is not binary, or empties a layer."""


class RecipeError(TostSurgeryError):
    """A recipe setting is out of range or unknown."""


class TraceError(TostSurgeryError):
    """torch.fx could not trace the model."""


class TostSurgeryWarning(UserWarning):
    """Something was not applied as asked (a block kept whole, a model run eagerly); it still works."""


class StateError(TostSurgeryError):
    """A call came at the wrong point of the lifecycle (prepared twice, finalized too early...)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def warn(message: str) -> None:
    """A :class:`TostSurgeryWarning` attributed to the first caller outside tost_surgery."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("tost_surgery."):
        level, frame = level + 1, frame.f_back
    warnings.warn(f"tost_surgery: {message}", TostSurgeryWarning, stacklevel=level)
