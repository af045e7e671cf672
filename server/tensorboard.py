"""TensorBoard event files of a run (config `tensorboard = true`): one step per round, written
as each round's line reaches metrics.jsonl. `tensorboard --logdir RUN_DIR/tensorboard`."""

from __future__ import annotations

from pathlib import Path

from server.round_record import client_level_epsilon, site_epsilon


class RoundScalars:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record["round"])
        for name, value in round_scalars(record).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a round is minutes of work: never lose it to a crash

    def close(self) -> None:
        self.writer.close()


def round_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl line as TensorBoard tags: server/, clients/ (weighted means), per-client
    train loss, bytes/, privacy/."""
    scalars = {f"server/{k}": v for k, v in record.get("server", {}).items()
               if k not in ("num-examples",) and isinstance(v, (int, float))}
    for group in ("train", "evaluate"):
        scalars.update({f"clients/{k}": v for k, v in record.get(group, {}).items()
                        if k != "num-examples" and isinstance(v, (int, float))})
    for client in record.get("train-per-client", []):
        if "train-loss" in client:
            scalars[f"client-train-loss/{client['node']}"] = client["train-loss"]
    scalars["bytes/down"] = record.get("bytes-down", 0)
    scalars["bytes/up"] = record.get("bytes-up", 0)
    if (epsilon := site_epsilon(record)) is not None:
        scalars["privacy/dp-sgd-epsilon"] = epsilon
    if (epsilon := client_level_epsilon(record)) is not None:
        scalars["privacy/client-level-epsilon"] = epsilon
    for key in ("worst", "median"):
        if key in record.get("evaluate-sites", {}):
            scalars[f"sites/{key}"] = record["evaluate-sites"][key]
    scalars["seconds"] = record.get("seconds", 0.0)
    return {k: float(v) for k, v in scalars.items()}
