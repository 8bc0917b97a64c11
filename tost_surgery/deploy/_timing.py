"""Paired, interleaved timing of candidate kernels on the same inputs, in one process.

Candidates take turns within every round (the order alternates from round to round), and a
candidate's speedup is the median over rounds of ``t(dense) / t(candidate)`` measured in the
same round: slow drifts of a shared machine's load cancel in each ratio. Written for
``deploy.accelerate`` and for anything else that has to choose a kernel by measurement.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

REFERENCE = "dense"


@dataclass(frozen=True)
class Timing:
    """Median seconds per call of each candidate and its median paired speedup over ``"dense"``.

    Example:
        >>> Timing.of(dense=2e-3, csr=1e-3).speedup["csr"]
        2.0
    """

    seconds: Mapping[str, float]
    speedup: Mapping[str, float]

    @classmethod
    def of(cls, **seconds: float) -> Timing:
        """A timing from fixed per-call seconds (speedups are their ratios), e.g. to inject in tests."""
        reference = seconds[REFERENCE]
        return cls(dict(seconds), {k: reference / v for k, v in seconds.items() if k != REFERENCE})


class Timer(Protocol):
    """Times ``{candidate name: zero-argument callable}`` for one layer; ``"dense"`` is one of them."""

    def __call__(self, layer: str, candidates: Mapping[str, Callable[[], object]]) -> Timing: ...


@dataclass(frozen=True)
class PairedTimer:
    """The default :class:`Timer`: up to ``rounds`` interleaved rounds of ``repeats`` calls each.

    ``repeats`` is chosen once per layer so that one turn of the slowest candidate lasts about
    ``turn_seconds`` (a timer tick is far shorter, but short turns are at the mercy of
    interrupts). Timing stops after ``min_rounds`` once the outcome is clear in every round so
    far: either one candidate was at least ``clear`` times faster than dense and faster than
    every other candidate, or every candidate was at least ``clear`` times slower than dense.
    No threshold between ``1 / clear`` and ``clear`` can then flip the choice. Candidates run
    under ``torch.inference_mode`` unless ``inference`` is False (candidates that run a backward).

    Example:
        >>> timing = PairedTimer(rounds=5)("fc", {"dense": dense_fn, "csr": csr_fn})
    """

    rounds: int = 7
    turn_seconds: float = 2e-3
    max_repeats: int = 50
    min_rounds: int = 3
    clear: float = 1.5
    inference: bool = True

    def __call__(self, layer: str, candidates: Mapping[str, Callable[[], object]]) -> Timing:
        names = list(candidates)
        with torch.inference_mode() if self.inference else contextlib.nullcontext():
            # One call each sizes the turns and warms the allocator and MKL up; it is not a round.
            slowest = max(_seconds(fn, 1) for fn in candidates.values())
            repeats = int(min(self.max_repeats, max(1, self.turn_seconds / max(slowest, 1e-9))))
            per_round: dict[str, list[float]] = {name: [] for name in names}
            for r in range(self.rounds):
                for name in names if r % 2 == 0 else reversed(names):
                    per_round[name].append(_seconds(candidates[name], repeats))
                if r + 1 >= self.min_rounds and _is_clear(per_round, self.clear):
                    break
        return _summarize(per_round)


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _is_clear(per_round: Mapping[str, list[float]], clear: float) -> bool:
    reference = per_round[REFERENCE]
    ratios = {name: [a / b for a, b in zip(reference, times)] for name, times in per_round.items() if name != REFERENCE}
    if all(max(r) <= 1 / clear for r in ratios.values()):
        return True  # dense, whatever the threshold
    best = max(ratios, key=lambda name: min(ratios[name]))
    others = [max(r) for name, r in ratios.items() if name != best]
    return min(ratios[best]) >= clear and all(other < min(ratios[best]) for other in others)


def _summarize(per_round: Mapping[str, list[float]]) -> Timing:
    reference = per_round[REFERENCE]
    seconds = {name: statistics.median(times) for name, times in per_round.items()}
    speedup = {
        name: statistics.median(a / b for a, b in zip(reference, times))
        for name, times in per_round.items()
        if name != REFERENCE
    }
    return Timing(seconds, speedup)
