"""Best-round selection and early stopping on the server's evaluation: pure functions."""

from __future__ import annotations

import math

HIGHER_IS_BETTER = {"accuracy": True, "macro-f1": True, "loss": False, "perplexity": False}


def improves(value: float, best: float | None, metric: str, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than min_delta in the metric's direction."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    gain = value - best if HIGHER_IS_BETTER[metric] else best - value
    return gain > min_delta


def best_round(values: list[tuple[int, float]], metric: str,
               min_delta: float) -> tuple[int, float] | None:
    """(round, value) of the best round: the first one not improved on by more than
    min_delta by any later round."""
    best: tuple[int, float] | None = None
    for round_, value in values:
        if improves(value, best[1] if best else None, metric, min_delta):
            best = (round_, value)
    return best


def should_stop(current_round: int, best_round: int | None, patience: int) -> bool:
    """Early stopping: `patience` rounds in a row without an improvement on `best_round`
    (0: never)."""
    return patience > 0 and best_round is not None and current_round - best_round >= patience
