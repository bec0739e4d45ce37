"""Choosing the fastest configuration from timings that drift.

The native kernel's tuner times every candidate once, one after another. On the H100 the best
few tiles at M <= 16 time within 2 % of each other, about as much as a time moves over a search
(clocks, memory) or from one process to the next, so one pass's winner changed between runs of
the same code (benchmarks/NOTES.md, r7). The candidates near the front are therefore timed
again, in turns: round by round, each round in a rotated order, so a drift falls on all of them
alike, and the lowest median over the rounds wins.
"""

from __future__ import annotations

import statistics
from typing import Callable, Hashable, Sequence, TypeVar

C = TypeVar("C", bound=Hashable)

MARGIN = 0.05  # timed again: candidates within 5 % of the first pass's fastest
FINALISTS = 4  # at most this many of them
ROUNDS = 5  # rounds of one timing each


def finalists(first_pass: Sequence[tuple[C, float]], margin: float = MARGIN, limit: int = FINALISTS) -> list[C]:
    """The candidates worth timing again: the fastest of the first pass and those within `margin` of
    it, fastest first, at most `limit`."""
    if not first_pass:
        return []
    ranked = sorted(first_pass, key=lambda ct: ct[1])
    best = ranked[0][1]
    return [c for c, t in ranked if t <= best * (1.0 + margin)][:limit]


def pick_fastest(first_pass: Sequence[tuple[C, float]], time_again: Callable[[C], float],
                 rounds: int = ROUNDS, margin: float = MARGIN, limit: int = FINALISTS) -> tuple[C, dict[C, list[float]]]:
    """The configuration with the lowest median over `rounds` interleaved timings of the finalists
    (one alone: no second timing), and those timings. A candidate that fails when timed again
    (time_again raises RuntimeError) is dropped; if all do, the first pass's fastest stands."""
    field = finalists(first_pass, margin, limit)
    if not field:
        raise ValueError("no candidate was timed")
    if rounds < 1:
        raise ValueError(f"rounds must be 1 or more, got {rounds}")
    if len(field) == 1:
        return field[0], {}
    times: dict[C, list[float]] = {c: [] for c in field}
    for r in range(rounds):
        for c in field[r % len(field):] + field[:r % len(field)]:  # each round starts one further on
            if c in times:
                try:
                    times[c].append(time_again(c))
                except RuntimeError:
                    del times[c]
    if not times:
        return field[0], {}
    best = min(times, key=lambda c: (statistics.median(times[c]), field.index(c)))
    return best, times
