"""The ServerApp: federated LoRA rounds with server-side evaluation and a run directory."""

from __future__ import annotations

import json
import time
import traceback
from collections import OrderedDict
from logging import ERROR, INFO

import torch
from flwr.app import ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from common.config import FedLoraConfig, check_resumable
from common.data import load_server_splits, resolve_labels, tokenize
from common.flower_compat import retry_reply_objects_sooner
from common.lora_math import factorize, lora_modules
from common.model import LoraModel, build_lora_model
from common.provenance import run_environment
from common.records import TRAIN_HEAD, adapter_to_record, record_to_adapter
from server.checkpoint import checkpoint_exists, load_run_state
from server.client_dp import ClientLevelDP
from server.evaluation import GlobalEvaluator
from server.federation_loop import Exchange, FederationLoop, plain_exchange
from server.head_round import HeadRound
from server.outputs import RunDirectory
from server.packed_grid import PackedGrid
from server.prompt_grid import PromptGrid
from server.rounds import RoundRecorder
from server.secure_aggregation import SecAggPlusRound
from server.strategies import build_strategy, resolve_head_mode
from server.strategies.fedavg import LoraFedAvg
from server.tensorboard import RoundScalars

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FedLoraConfig.from_run_config(context.run_config)
    # A reply pulled before its sender has pushed all its objects is asked for again after
    # 0.05 s, not Flower's 1 s: whichever grid the run talks through.
    retry_reply_objects_sooner()
    if cfg.reply_poll_interval:
        grid = PromptGrid(grid, cfg.reply_poll_interval)
    run_federation(PackedGrid(grid) if cfg.packed_arrays else grid, cfg)


def run_federation(grid: Grid, cfg: FedLoraConfig) -> RunDirectory:
    started = time.time()
    splits = load_server_splits(cfg)
    labels = resolve_labels(cfg, splits) if cfg.is_classification else None
    # The server evaluates the full-precision base: 4-bit is a site's memory saving.
    lora = build_lora_model(cfg.replace(load_in_4bit=False), labels)
    if cfg.resume:
        run = RunDirectory.reopen(cfg)
        check_resumable(run.config_to_resume(), cfg)
        # What the interrupted or finished process wrote stays until this one has better.
        earlier = {k: v for k, v in _readable_summary(run).items()
                   if k not in ("error", "traceback", "resume-error")}
        run.write_summary({**earlier, "status": "running"})
    else:
        run = RunDirectory.create(cfg, labels)
        earlier = {}
    run.record_environment(run_environment(cfg), resumed=cfg.resume)
    log(INFO, "fedlora: run directory %s", run.path)
    recorder: RoundRecorder | None = None
    try:
        evaluator = GlobalEvaluator(lora, tokenize(splits.test, lora.tokenizer, cfg, labels), cfg)
        strategy = build_strategy(cfg, lora)
        exchange, client_dp = training_exchange(strategy, cfg)
        head_mode = resolve_head_mode(cfg, lora.pooling)
        head_round = head_round_for(strategy, cfg, lora, labels, head_mode)
        loop = FederationLoop(strategy, cfg, exchange, refine=head_round)
        # Besides the strategy, what carries state from round to round.
        parts = [part for part in (client_dp, head_round, loop) if part is not None]
        client_config = ConfigRecord({"labels": json.dumps(labels),
                                      TRAIN_HEAD: head_mode != "fit"} if labels else {})
        initial, first_round, best_round = lora.trainable_state(), 0, None
        if cfg.resume and not run.read_rounds() and not checkpoint_exists(run.checkpoint_dir):
            # Stopped before its first round was recorded: nothing is lost by starting over.
            log(INFO, "fedlora: %s recorded no round yet; starting it from round 0", run.path)
        elif cfg.resume:
            state = load_run_state(run.checkpoint_dir)
            run.keep_rounds_through(state.round)
            state.restore(strategy.rng, [strategy, *parts])
            initial = OrderedDict((name, state.adapter[name]) for name in initial)
            first_round, best_round = state.round + 1, state.best
            log(INFO, "fedlora: resuming %s after round %s", run.path, state.round)
            if head_round is not None:
                head_round.stamp_releases(client_config)

        scalars = RoundScalars(run.path / "tensorboard") if cfg.tensorboard else None
        recorder = RoundRecorder(run, evaluator, strategy, cfg, parts, scalars, best_round)
        stop_sources = [lambda: recorder.stop_request]
        if client_dp is not None:
            stop_sources.append(lambda: client_dp.budget_stop)
        final = loop.run(grid, adapter_to_record(initial, "float32"), train_config=client_config,
                         evaluate_config=client_config, evaluate_fn=recorder,
                         first_round=first_round, stop_sources=stop_sources,
                         score_ahead=recorder.score_ahead)
        recorder.wait()
        if scalars is not None:
            scalars.close()
        lora.load_trainable_state(record_to_adapter(final))
        run.save_adapter(exportable(cfg, lora, labels, strategy.base_offsets()), labels)
        best = {}
        if recorder.best is not None:
            lora.load_trainable_state(recorder.best.adapter)
            run.save_adapter(exportable(cfg, lora, labels, recorder.best.offsets), labels,
                             folder="best_adapter")
            best = {"selection-metric": cfg.selection_key, "best-round": recorder.best.round}
        rounds = run.read_rounds()
        if best:
            best["best"] = next((r["server"] for r in rounds
                                 if r["round"] == best["best-round"]), {})
        early = ({"stopped-early": loop.stop.message, "stop-reason": loop.stop.reason.value}
                 if loop.stop else {})
        data_checks = ({"data-checks": strategy.data_check_totals()} if strategy.data_reports
                       else {})
        # What auto resolved to: the pooling the head reads, how the head was made.
        head = {"head": {"mode": head_mode, "pooling": lora.pooling}} if labels else {}
        run.write_summary({**earlier, "status": "completed",
                           "rounds": rounds[-1]["round"] if rounds else 0,
                           **head, **early, **best, **data_checks,
                           "final": rounds[-1]["server"] if rounds else {},
                           "initial": rounds[0]["server"] if rounds else {},
                           "seconds": time.time() - started})
    except BaseException as err:
        if recorder is not None:  # round 0's checkpoint, if it is still being written
            recorder.wait(reraise=False)
        log(ERROR, "fedlora: run failed: %s", err)
        error = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        if earlier.get("status") == "completed":
            # A resume that failed took nothing from a finished run: it stays completed.
            run.write_summary({**earlier, "resume-error": error["error"]})
        else:
            run.write_summary({**earlier, "status": "failed", **error,
                               "seconds": time.time() - started})
        raise
    return run


def _readable_summary(run: RunDirectory) -> dict:
    """The run's summary; {} where it cannot be read (this process rewrites it)."""
    try:
        summary = run.read_summary()
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def head_round_for(strategy: LoraFedAvg, cfg: FedLoraConfig, lora: LoraModel,
                   labels: list[str] | None, head_mode: str) -> HeadRound | None:
    """The head round of a fit head mode (server/head_round.py), else None."""
    if head_mode == "train":
        return None
    return HeadRound(strategy, cfg, lora.head_names(), dim=lora.pooled_feature_dim(),
                     num_labels=len(labels), unit_features=lora.pooling == "mean")


def training_exchange(strategy: LoraFedAvg, cfg: FedLoraConfig
                      ) -> tuple[Exchange, ClientLevelDP | None]:
    """How the rounds' training travels: plain, through client-level DP, and/or through
    SecAgg+; and the client-level DP part, whose accountant is checkpointed."""
    client_dp = ClientLevelDP(strategy, cfg) if cfg.client_level_dp else None
    if cfg.secure_aggregation:
        return SecAggPlusRound(strategy, cfg, client_dp), client_dp
    return (client_dp or plain_exchange(strategy)), client_dp


def exportable(cfg: FedLoraConfig, lora: LoraModel, labels: list[str] | None,
               residual: dict[str, torch.Tensor] | None) -> LoraModel:
    """A plain PEFT adapter that equals the global model. With a residual (strategy exact) the
    adapter is re-factorised at the rank that holds global product + residual exactly."""
    if not residual:
        return lora
    state = lora.trainable_state()
    totals = {prefix: cfg.lora_scaling * state[b].double() @ state[a].double() + residual[prefix]
              for prefix, (a, b) in lora_modules(state).items()}
    rank = max(int(torch.linalg.matrix_rank(t, rtol=1e-7)) for t in totals.values())
    export = build_lora_model(cfg, labels, device=lora.device, rank=rank)
    full = OrderedDict((n, t) for n, t in state.items() if ".lora_" not in n)
    for prefix, (a, b) in lora_modules(export.trainable_state()).items():
        full[b], full[a], _ = factorize(totals[prefix], rank, cfg.lora_scaling)
    export.load_trainable_state(full)
    log(INFO, "fedlora: exported the exact global model as a rank-%s adapter", rank)
    return export
