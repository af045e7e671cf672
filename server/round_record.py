"""What a round's record (one line of metrics.jsonl) says, read one way by everything that shows
it: the live table (simulations/progress.py), the report, TensorBoard. Records of a crashed run
or an older version may miss parts or hold other types: what is not a number counts as missing.
Imports neither torch nor flwr (`fedlora report` starts fast)."""

from __future__ import annotations

import statistics


def number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _entries(record: dict, key: str) -> list[dict]:
    value = record.get(key)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _part(record: dict, key: str) -> dict:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def site_epsilon(record: dict) -> float | None:
    """The largest ε any site reported this round: DP-SGD in training and the noise on its
    head statistics, composed on the site (client/privacy.py); None without example-level DP."""
    values = [number(e.get("dp-epsilon")) for e in _entries(record, "train-per-client")]
    values.append(number(_part(record, "head").get("dp-epsilon")))
    values = [v for v in values if v is not None]
    return max(values) if values else None


def client_level_epsilon(record: dict) -> float | None:
    return number(_part(record, "client-dp").get("epsilon"))


def round_epsilon(record: dict) -> float | None:
    """The round's ε: the larger one if both kinds of DP ran."""
    values = [v for v in (site_epsilon(record), client_level_epsilon(record)) if v is not None]
    return max(values) if values else None


def worst_and_median(values: list[float], higher_is_better: bool) -> tuple[float, float]:
    """The worst site's value and the median site's."""
    worst = min(values) if higher_is_better else max(values)
    return worst, statistics.median(values)


def site_spread(record: dict, metric: str, higher_is_better: bool
                ) -> tuple[float, float] | None:
    """Worst and median of the sites' own validation `metric` (evaluate-per-client)."""
    values = [v for e in _entries(record, "evaluate-per-client")
              if (v := number(e.get(metric))) is not None]
    return worst_and_median(values, higher_is_better) if values else None
