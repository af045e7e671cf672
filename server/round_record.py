"""A round's record: one line of metrics.jsonl.

Written from one typed `RoundStats`, which the round's parts fill as it runs (the strategy's
configure and aggregate steps, the training exchange, the head round, client-level DP, the
loop) and RoundRecorder turns into the line. Read one way by everything that shows it: the
live table (simulations/progress.py), the report, TensorBoard, tune. Records of a crashed run
or an older version may miss parts or hold other types: what is not a number counts as missing.
Imports neither torch nor flwr (`fedlora report` starts fast)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# The per-site counters a line's "clients" holds, by what they count.
SAMPLED, AGGREGATED, REJECTED, MISSING = "clients-sampled", "clients-aggregated", "rejected", \
    "missing"
# What sites report under personal-head, besides the global model's eval-accuracy: their
# personal head's accuracy, their personal adapter's (personal-steps, last round) and the
# local-only reference's, on the same validation rows.
PERSONAL_METRICS = {"eval-personal-accuracy": "personal head",
                    "eval-personal-adapter-accuracy": "personal adapter",
                    "eval-local-head-accuracy": "local-only head (base model's features)"}


@dataclass
class RoundStats:
    """What one round's exchanges gathered, before the server's own evaluation."""

    train: dict[str, float] = field(default_factory=dict)  # weighted like the adapters
    train_per_client: list[dict] = field(default_factory=list)
    evaluate: dict[str, float] = field(default_factory=dict)  # the sites' own validation rows
    evaluate_per_client: list[dict] = field(default_factory=list)
    evaluate_sites: dict | None = None  # worst and median site
    bytes_down: int = 0  # every message of the round, both ways
    bytes_up: int = 0
    bytes_down_per_client: float = 0.0
    bytes_up_per_client: float = 0.0
    # The adapter bytes of the training messages: what SecAgg+'s own messages replace.
    train_bytes_down: int = 0
    # "<phase>-clients-sampled", "train-clients-aggregated", "<phase>-rejected", ...
    clients: dict[str, int] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)  # {"node", "reason"} per site left out
    agg_rel_error: float | None = None  # the applied update against the exact mean
    train_exchange_seconds: float | None = None
    client_dp: dict | None = None  # epsilon, delta, releases, noise-std
    data_checks: dict | None = None  # totals over every site reported so far
    head: dict | None = None  # the head round's fit, when one ran

    def count(self, phase: str, what: str, number: int = 1) -> None:
        key = f"{phase}-{what}"
        self.clients[key] = self.clients.get(key, 0) + number

    def leave_out(self, node: int, reason: str, phase: str, what: str) -> None:
        self.count(phase, what)
        self.dropped.append({"node": node, "reason": reason})

    @property
    def aggregated(self) -> int:
        return self.clients.get(f"train-{AGGREGATED}", 0)

    @aggregated.setter
    def aggregated(self, number: int) -> None:
        self.clients[f"train-{AGGREGATED}"] = number

    def line(self, server_round: int, server: dict[str, float], seconds: float) -> dict:
        """The round's line of metrics.jsonl; `server`: the server's evaluation of the global
        adapter; `seconds`: the round's wall time."""
        optional = {"client-dp": self.client_dp,
                    "train-exchange-seconds": self.train_exchange_seconds,
                    "data-checks": self.data_checks, "head": self.head,
                    "evaluate-sites": self.evaluate_sites}
        return {"round": server_round, "server": server, "train": self.train,
                "train-per-client": self.train_per_client, "evaluate": self.evaluate,
                "evaluate-per-client": self.evaluate_per_client,
                "bytes-down": self.bytes_down, "bytes-up": self.bytes_up,
                "bytes-down-per-client": self.bytes_down_per_client,
                "bytes-up-per-client": self.bytes_up_per_client,
                "agg-rel-error": self.agg_rel_error, "clients": dict(self.clients),
                "dropped": self.dropped,
                **{key: value for key, value in optional.items() if value is not None},
                "seconds": seconds}


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
