"""The ClientApp: trains the global adapter on this site's private data, evaluates it locally.

The base model and the tokenised data are loaded once per process and reused for every message
it handles: in simulation a Ray actor serves many rounds and sites; in deployment Flower 1.41
starts one app process per message, so there each message loads them again (docs/scaling.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from logging import WARNING

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from client.faults import apply_fault, fault_for
from client.head_statistics import feature_statistics
from client.mods import client_dp_clipping_mod, secure_aggregation_mod
from client.personal import (
    local_head_accuracy,
    personal_adapter,
    personal_fit,
    personal_folder,
    personal_metrics,
    save_personal_head,
)
from client.privacy import release_head_statistics, train_adapter_private
from client.sync import load_global
from client.training import frozen, train_adapter
from common.config import FedLoraConfig, SiteConfig
from common.data import (
    DataSplits,
    load_site_rows,
    load_splits,
    resolve_labels,
    tokenize,
    train_val_split,
)
from common.data_checks import DataReport, check_site_rows, report_metrics
from common.errors import FedLoraError
from common.message_types import HEAD_ACTION
from common.metrics import evaluate_examples
from common.model import LoraModel, build_lora_model
from common.records import (
    HEAD_RELEASES,
    PARTITION_ID,
    TASK_KEY,
    TRAIN_HEAD,
    adapter_to_record,
)
from common.strategy_registry import strategy_spec

app = ClientApp()


@dataclass
class SiteState:
    """What one site keeps between messages: the model, its tokenised train/val examples, the
    examples it reports its evaluation on (its val examples, or its share of the test split
    under site-eval-rows=test) and the data checks' report on its rows."""

    lora: LoraModel
    train_examples: list[dict]
    val_examples: list[dict]
    site_id: int
    data_report: DataReport
    eval_examples: list[dict]
    # personal-head's local-only reference (client/personal.py): computed once, then kept.
    local_head_accuracy: float | None = None


@dataclass
class ProcessCache:
    """Per process and run: one base model, the data read once, every site's examples."""

    key: tuple
    model: str  # the run's model key (a runtime's status)
    models: dict[int, LoraModel] = field(default_factory=dict)  # one per LoRA rank in use
    # The training pool: a datasets.Dataset, or rows handed to warm_up (len, select, columns).
    pool: object | None = None
    pool_is_dataset: bool = False  # the partitioners take only a Dataset
    partitions: list[list[int]] | None = None
    # site-eval-rows=test: the test split and each partition's share of it (row indices)
    dealt_test: tuple[object, list[list[int]]] | None = None
    sites: dict[int, SiteState] = field(default_factory=dict)
    refused: dict[int, FedLoraError] = field(default_factory=dict)  # sites a data check refused


_CACHE: ProcessCache | None = None


def resident_sites() -> list[dict]:
    """What this process holds (a site runtime's status): per site, its model and rows."""
    cache = _CACHE  # read once: a message of another run may be replacing it
    if cache is None:
        return []
    return [{"site": site_id, "model": cache.model,
             "train-rows": len(site.train_examples), "val-rows": len(site.val_examples)}
            for site_id, site in list(cache.sites.items())]


# Keys that say how the server runs a run, not what a site loads: runs that differ only in
# these (another out-dir, more rounds, a resume) keep a process's model and data.
SERVER_ONLY_KEYS = {"out-dir", "num-rounds", "resume", "round-timeout", "round-retries",
                    "reply-poll-interval", "packed-arrays",
                    "tensorboard", "early-stopping-patience", "early-stopping-min-delta",
                    "min-train-clients", "min-evaluate-clients", "min-available-clients",
                    "personal-head", "personal-mu", "personal-steps", "personal-learning-rate"}


def _process_cache(cfg: FedLoraConfig, labels: list[str] | None) -> ProcessCache:
    global _CACHE
    key = (tuple(sorted((k, v) for k, v in cfg.to_run_config().items()
                        if k not in SERVER_ONLY_KEYS)), tuple(labels or ()))
    if _CACHE is None or _CACHE.key != key:  # a new run in this process: start over
        torch.set_num_threads(max(1, int(cfg.client_num_cpus)))
        _CACHE = ProcessCache(key=key, model=cfg.model)
    return _CACHE


def _model(cache: ProcessCache, cfg: FedLoraConfig, labels: list[str] | None,
           rank: int) -> LoraModel:
    if rank not in cache.models:
        cache.models[rank] = build_lora_model(cfg, labels, rank=rank)
    return cache.models[rank]


def _load_partitions(cache: ProcessCache, cfg: FedLoraConfig, sites: int,
                     splits: DataSplits | None = None) -> None:
    """The shared data and its split into `sites` partitions, once per process (again only if
    the federation's size is not the one they were made for)."""
    if cache.partitions is None or len(cache.partitions) != sites:
        from common.partitioning import partition_indices

        if splits is not None:
            cache.pool = splits.train
        elif cache.pool is None or not cache.pool_is_dataset:
            cache.pool = load_splits(cfg).train
        cache.pool_is_dataset = True
        cache.partitions = partition_indices(cache.pool, cfg.replace(num_clients=sites))


def warm_up(cfg: FedLoraConfig, labels: list[str] | None = None, rows=None,
            partitions: list[list[int]] | None = None) -> None:
    """Load this process's base model and the simulation's partitioned data before its first
    message, which then finds them here (they took ~10 s on the way to the first training
    step). `rows` (the training pool: len, select, "text"/"target" columns), its `labels` and
    `partitions` (row indices of each of cfg.num_clients sites) if the caller has them; else
    read and resolved as the server resolves them (if the server's labels differ, the first
    message simply starts over). An error is logged, not raised: the first message reports
    it in its own words."""
    try:
        if cfg.eval_data:  # the server's labels also come from eval-data: not known here
            return
        if rows is not None:
            cache = _process_cache(cfg, labels)
            cache.pool, cache.partitions, cache.pool_is_dataset = rows, partitions, False
        else:
            splits = load_splits(cfg)
            labels = resolve_labels(cfg, splits) if cfg.is_classification else None
            cache = _process_cache(cfg, labels)
            _load_partitions(cache, cfg, cfg.num_clients, splits)
        for rank in sorted(set(cfg.site_ranks)):
            _model(cache, cfg, labels, rank)
    except Exception as err:
        log(WARNING, "fedlora: client warm-up skipped: %s", err)


def _site_state(cfg: FedLoraConfig, site: SiteConfig | None, context: Context,
                  labels: list[str] | None) -> SiteState:
    cache = _process_cache(cfg, labels)
    node = context.node_config
    if site is not None:  # deployment: this site's own data, nothing partitioned
        if cfg.site_eval_rows == "test":
            raise FedLoraError("site-eval-rows=test deals the data set's test split out to "
                               "simulated sites; a deployed site scores its validation rows")
        site_id = int(context.node_id) % (2**31)
        rank = site.lora_r or cfg.global_lora_rank
        if site_id not in cache.sites and site_id not in cache.refused:
            site_rows = load_site_rows(cfg, site.data_path)
    elif "partition-id" in node:  # simulation: one partition of the shared data set
        site_id = int(node["partition-id"])
        rank = cfg.site_ranks[site_id % len(cfg.site_ranks)]
        if site_id not in cache.sites and site_id not in cache.refused:
            # The federation's size, not the config's: under `flwr run` it is set there.
            _load_partitions(cache, cfg, int(node.get("num-partitions", cfg.num_clients)))
            site_rows = cache.pool.select(cache.partitions[site_id])
    else:
        raise FedLoraError("node config has neither data-path (deployment) nor partition-id "
                           "(simulation)")
    if site_id in cache.refused:  # decided once: every later message gets the same answer
        raise cache.refused[site_id]
    if site_id not in cache.sites:
        lora = _model(cache, cfg, labels, rank)
        # A refusal raises here: the server leaves the site out, with why.
        try:
            rows, report = check_site_rows(site_rows, lora.tokenizer, cfg, labels, log=log)
        except FedLoraError as refusal:
            cache.refused[site_id] = refusal
            raise
        train_rows, val_rows = train_val_split(list(range(len(rows))), cfg.val_fraction,
                                               cfg.seed + site_id)
        val_examples = tokenize(rows.select(val_rows), lora.tokenizer, cfg, labels)
        cache.sites[site_id] = SiteState(
            lora=lora,
            train_examples=tokenize(rows.select(train_rows), lora.tokenizer, cfg, labels),
            val_examples=val_examples, site_id=site_id, data_report=report,
            eval_examples=(tokenize(_dealt_test_rows(cache, cfg, site_id), lora.tokenizer, cfg,
                                    labels) if cfg.site_eval_rows == "test" else val_examples))
    return cache.sites[site_id]


def _dealt_test_rows(cache: ProcessCache, cfg: FedLoraConfig, site_id: int):
    """A simulated site's share of the test split (site-eval-rows=test: common/partitioning.py
    `deal_by_label`), dealt once per process for all sites."""
    if cache.dealt_test is None:
        from common.partitioning import deal_test_split

        test = load_splits(cfg).test
        cache.dealt_test = (test, deal_test_split(cache.pool, cache.partitions, test, cfg.seed))
    test, dealt = cache.dealt_test
    return test.select(dealt[site_id])


def _prepare(msg: Message, context: Context) -> tuple[FedLoraConfig, SiteState]:
    cfg = FedLoraConfig.from_run_config(context.run_config)
    site_config = SiteConfig.from_node_config(context.node_config)
    if site_config is not None:  # a deployed site's own batch size, device, 4-bit choice
        cfg = site_config.apply(cfg)
    config = msg.content["config"]
    labels = json.loads(str(config["labels"])) if "labels" in config else None
    site = _site_state(cfg, site_config, context, labels)
    load_global(site.lora, msg.content, cfg)
    return cfg, site


@app.train(mods=[secure_aggregation_mod, client_dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    cfg, site = _prepare(msg, context)
    config = msg.content["config"]
    if config.get(TASK_KEY) == HEAD_ACTION:  # head statistics inside SecAgg+ (train messages)
        return _head_statistics(msg, cfg, site)
    server_round = int(config["server-round"])
    fault = fault_for(site.site_id, server_round)
    if fault and apply_fault(fault):
        return Message(content=RecordDict({}), reply_to=msg)
    started, started_at, cpu_started = time.perf_counter(), time.time(), time.process_time()
    seed = cfg.seed + 1000 * server_round + site.site_id
    pad_id, device = site.lora.tokenizer.pad_token_id, site.lora.device
    # A fitted head (head-mode fit) stays as the server solved it.
    fixed = [] if config.get(TRAIN_HEAD, True) else site.lora.head_names()
    with frozen(site.lora.model, fixed):
        # FedProx pulls towards the global adapter this round started from.
        anchor = ([p.detach().clone() for p in site.lora.model.parameters()
                   if p.requires_grad] if strategy_spec(cfg.strategy).proximal_term else None)
        if cfg.differential_privacy:
            stats = train_adapter_private(
                site.lora.model, site.train_examples, cfg,
                releases=int(config.get("train-releases", server_round)),
                head_releases=int(config.get(HEAD_RELEASES, 0)), seed=seed, pad_id=pad_id,
                device=device)
        else:
            stats = train_adapter(site.lora.model, site.train_examples, cfg, seed=seed,
                                  pad_id=pad_id, device=device, anchor=anchor)
    metrics = MetricRecord({
        "num-examples": len(site.train_examples),
        "train-loss": stats["loss"],
        "train-steps": stats["steps"],
        "train-seconds": time.perf_counter() - started,
        # This process's CPU seconds meanwhile: the work itself, however the cores were shared.
        "train-cpu-seconds": time.process_time() - cpu_started,
        "train-started-at": started_at,  # wall clock, for the time to the first step
        **({"dp-epsilon": stats["epsilon"]} if cfg.differential_privacy else {}),
        # Counts only, with every reply: a resumed server learns them again.
        **report_metrics(site.data_report),
    })
    # The fitted head went unchanged: the server has it already.
    adapter = {n: t for n, t in site.lora.trainable_state().items() if n not in fixed}
    arrays = adapter_to_record(adapter, cfg.transfer_dtype)
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.query(HEAD_ACTION)
def head_statistics(msg: Message, context: Context) -> Message:
    cfg, site = _prepare(msg, context)
    return _head_statistics(msg, cfg, site)


def _head_statistics(msg: Message, cfg: FedLoraConfig, site: SiteState) -> Message:
    """The sums of the features the global model's head reads, over this site's training and
    validation rows (common/head.py): counts and sums only, noisy under DP."""
    started = time.perf_counter()
    config = msg.content["config"]
    fault = fault_for(site.site_id, int(config["server-round"]))
    if fault and apply_fault(fault):
        return Message(content=RecordDict({}), reply_to=msg)
    lora, num_labels = site.lora, len(json.loads(str(config["labels"])))
    # Under DP one row's share is bounded by its features' norm: at most 1 (mean pooling's
    # features are unit length already).
    bound = 1.0 if cfg.private_head else None
    batch_size = max(cfg.batch_size, 64)
    splits = [feature_statistics(lora, examples, num_labels, batch_size, bound)
              for examples in (site.train_examples, site.val_examples)]
    metrics = {"num-examples": len(site.train_examples)}
    if cfg.private_head:
        splits, metrics["dp-epsilon"] = release_head_statistics(
            splits, len(site.train_examples), cfg, releases=int(config[HEAD_RELEASES]),
            train_releases=int(config.get("train-releases", 0)))
    arrays = {**splits[0].to_arrays("train"), **splits[1].to_arrays("val")}
    metrics["head-seconds"] = time.perf_counter() - started
    record = ArrayRecord({name: Array.from_numpy_ndarray(t.numpy()) for name, t in arrays.items()})
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, site = _prepare(msg, context)
    started, cpu_started = time.perf_counter(), time.process_time()
    examples = site.eval_examples
    result = evaluate_examples(site.lora.model, examples, batch_size=cfg.batch_size,
                               pad_id=site.lora.tokenizer.pad_token_id,
                               device=site.lora.device,
                               classification=cfg.is_classification) if examples else {}
    metrics = {"num-examples": len(examples)}
    metrics.update({f"eval-{name}": value for name, value in result.items()})
    if cfg.personal_head:
        metrics.update(_personal_head(msg, context, cfg, site))
    if "partition-id" in context.node_config:  # a simulated site: which one, for comparisons
        metrics[PARTITION_ID] = int(context.node_config["partition-id"])
    metrics["eval-seconds"] = time.perf_counter() - started
    metrics["eval-cpu-seconds"] = time.process_time() - cpu_started
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _personal_head(msg: Message, context: Context, cfg: FedLoraConfig, site: SiteState
                   ) -> dict[str, float]:
    """This site's personal head under the global model just received: solved, scored beside
    the global head, and kept in the site's folder; its accuracies, never the head, go back."""
    seed = cfg.seed + site.site_id
    fit = personal_fit(site.lora, site.train_examples, cfg, seed)
    metrics = personal_metrics(site.lora, fit, site.eval_examples, cfg)
    if site.local_head_accuracy is None:
        site.local_head_accuracy = local_head_accuracy(site.lora, site.train_examples,
                                                       site.eval_examples, cfg, seed)
    if site.local_head_accuracy is not None:
        metrics["eval-local-head-accuracy"] = site.local_head_accuracy
    site_config = SiteConfig.from_node_config(context.node_config)
    folder = personal_folder(cfg, site_config.personal_dir if site_config else None,
                             context.run_id, site.site_id)
    server_round = int(msg.content["config"]["server-round"])
    save_personal_head(folder, fit, server_round=server_round, site_id=site.site_id,
                       model=cfg.model)
    if cfg.personal_steps and server_round >= cfg.num_rounds:  # the last round's model
        config = msg.content["config"]
        labels = json.loads(str(config["labels"])) if "labels" in config else None
        adapted = personal_adapter(site.lora, fit, site.train_examples, site.eval_examples, cfg,
                                   labels=labels, folder=folder, seed=seed)
        if adapted is not None:
            metrics["eval-personal-adapter-accuracy"] = adapted
    return metrics
