"""Keep dense unless a sparse kernel measured faster by ``min_speedup``: the one rule, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ._timing import REFERENCE, Timing


@dataclass(frozen=True)
class Choice:
    """The kernel a layer runs, and why (``reason`` is empty when a sparse kernel won)."""

    kernel: str
    reason: str = ""


def choose(timing: Timing, min_speedup: float) -> Choice:
    """The fastest candidate if its paired speedup over dense is at least ``min_speedup``, else dense.

    Example:
        >>> choose(Timing.of(dense=2.0, csr=1.0), min_speedup=1.1)
        Choice(kernel='csr', reason='')
        >>> choose(Timing.of(dense=1.0, csr=0.95), min_speedup=1.1).reason
        'csr 1.05x < min_speedup 1.1x'
    """
    if not timing.speedup:
        return Choice(REFERENCE, "no sparse candidate")
    best = max(timing.speedup, key=timing.speedup.__getitem__)
    speedup = timing.speedup[best]
    if speedup >= min_speedup:
        return Choice(best)
    if speedup < 1.0:
        return Choice(REFERENCE, f"dense faster ({best} {speedup:.2f}x)")
    return Choice(REFERENCE, f"{best} {speedup:.2f}x < min_speedup {min_speedup:g}x")
