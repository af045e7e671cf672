"""The ServerApp: federated LoRA rounds with server-side evaluation and a run directory."""

from __future__ import annotations

import json
import random
import time
import traceback
from logging import ERROR, INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels, tokenize
from common.model import build_lora_model
from common.records import adapter_to_record, record_to_adapter
from server.evaluation import GlobalEvaluator
from server.outputs import RunDirectory
from server.strategies.fedavg import LoraFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FedLoraConfig.from_run_config(context.run_config)
    run_federation(grid, cfg)


def run_federation(grid: Grid, cfg: FedLoraConfig) -> RunDirectory:
    started = time.time()
    random.seed(cfg.seed)  # Flower's client sampling draws from the global `random`
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits) if cfg.is_classification else None
    lora = build_lora_model(cfg, labels)
    run = RunDirectory.create(cfg, labels)
    log(INFO, "fedlora: run directory %s", run.path)
    try:
        evaluator = GlobalEvaluator(lora, tokenize(splits.test, lora.tokenizer, cfg, labels), cfg)
        strategy = LoraFedAvg(
            reference=lora.trainable_state(), transfer_dtype=cfg.transfer_dtype,
            fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_train_clients, min_evaluate_nodes=cfg.min_evaluate_clients,
            min_available_nodes=cfg.min_available_clients)
        client_config = ConfigRecord({"labels": json.dumps(labels)} if labels else {})
        round_started = [time.time()]

        def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            server_metrics = evaluator(arrays)
            stats = strategy.round_stats.pop(server_round, {})
            now = time.time()
            run.append_round({"round": server_round, "server": server_metrics,
                              "train": stats.get("train", {}),
                              "evaluate": stats.get("evaluate", {}),
                              "bytes-down": stats.get("bytes-down", 0),
                              "bytes-up": stats.get("bytes-up", 0),
                              "clients": {k: v for k, v in stats.items()
                                          if k.endswith(("-sampled", "-aggregated",
                                                         "-rejected"))},
                              "seconds": now - round_started[0]})
            round_started[0] = now
            return MetricRecord(server_metrics)

        result = strategy.start(
            grid=grid, initial_arrays=adapter_to_record(lora.trainable_state(), "float32"),
            num_rounds=cfg.num_rounds, timeout=cfg.round_timeout, train_config=client_config,
            evaluate_config=client_config, evaluate_fn=evaluate_and_record)
        lora.load_trainable_state(record_to_adapter(result.arrays))
        run.save_adapter(lora, labels)
        rounds = run.read_rounds()
        run.write_summary({"status": "completed", "rounds": cfg.num_rounds,
                           "final": rounds[-1]["server"] if rounds else {},
                           "initial": rounds[0]["server"] if rounds else {},
                           "seconds": time.time() - started})
    except BaseException as err:
        log(ERROR, "fedlora: run failed: %s", err)
        run.write_summary({"status": "failed", "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc(),
                           "seconds": time.time() - started})
        raise
    return run
