"""Does a rewritten model still compute what the original did? Checked, never assumed.

The rule: every output tensor within ``tolerance x max|reference|`` of the reference, and the
same argmax along the last dimension, except in rows where the reference's top two values are
exactly equal (no argmax to keep). The argmax rule is the stricter one near a tie: rounding
that stays within the tolerance can still swap two values closer than it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .._errors import TostSurgeryError

TOLERANCE = 1e-5


@dataclass(frozen=True)
class Mismatch:
    """The first output that broke the rule: where, what was allowed, what was found."""

    where: str
    expected: str
    found: str


def mismatch(
    reference: object, candidate: object, tolerance: float = TOLERANCE, argmax: bool = True
) -> Mismatch | None:
    """``None`` if ``candidate`` matches ``reference`` (tensors, or tuples / lists / dicts of them).

    Example:
        >>> mismatch(torch.ones(2), torch.ones(2)) is None
        True
    """
    ref_leaves, cand_leaves = list(_leaves(reference)), list(_leaves(candidate))
    if [k for k, _ in ref_leaves] != [k for k, _ in cand_leaves]:
        return Mismatch("outputs", f"outputs {[k for k, _ in ref_leaves]}", f"outputs {[k for k, _ in cand_leaves]}")
    for (key, ref), (_, cand) in zip(ref_leaves, cand_leaves):
        found = _compare(key, ref, cand, tolerance, argmax)
        if found is not None:
            return found
    return None


def check(
    reference: object, candidate: object, what: str, hint: str, tolerance: float = TOLERANCE, argmax: bool = True
) -> None:
    """Raise :class:`TostSurgeryError` naming ``what`` if ``candidate`` does not match ``reference``.

    ``argmax=False`` checks the tolerance only (a layer's output has no classes).
    """
    found = mismatch(reference, candidate, tolerance, argmax)
    if found is not None:
        raise TostSurgeryError(
            f"{what} does not match, at {found.where}.\nexpected: {found.expected}\nfound: {found.found}\nHint: {hint}"
        )


def _compare(key: str, ref: object, cand: object, tolerance: float, argmax: bool) -> Mismatch | None:
    if not isinstance(ref, torch.Tensor):
        return None if ref == cand else Mismatch(key, repr(ref), repr(cand))
    if not isinstance(cand, torch.Tensor) or cand.shape != ref.shape or cand.dtype != ref.dtype:
        what = f"{type(cand).__name__} {tuple(getattr(cand, 'shape', ()))} {getattr(cand, 'dtype', '')}"
        return Mismatch(key, f"Tensor {tuple(ref.shape)} {ref.dtype}", what)
    if not ref.is_floating_point():
        return None if torch.equal(ref, cand) else Mismatch(key, "equal integer/bool values", "different values")
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    allowed = tolerance * scale
    error = float((ref - cand).abs().max()) if ref.numel() else 0.0
    if not error <= allowed:  # also catches NaN
        return Mismatch(key, f"max |difference| <= {tolerance:g} x max|output| = {allowed:.3g}", f"{error:.3g}")
    return _compare_argmax(key, ref, cand) if argmax else None


def _compare_argmax(key: str, ref: torch.Tensor, cand: torch.Tensor) -> Mismatch | None:
    if ref.dim() == 0 or ref.shape[-1] < 2:
        return None
    top = ref.topk(2, dim=-1).values
    differ = (ref.argmax(-1) != cand.argmax(-1)) & (top[..., 0] != top[..., 1])
    if bool(differ.any()):
        return Mismatch(key, "the same argmax along the last dimension", f"{int(differ.sum())} rows differ")
    return None


def _leaves(value: object, key: str = "output") -> Iterator[tuple[str, object]]:
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _leaves(item, f"{key}[{k!r}]")
    else:
        yield key, value
