"""The run configuration: one typed object, built once from Flower's run_config.

Flower hands every app a flat ``run_config`` dict (``key-with-dashes`` -> bool/int/float/str),
fused from ``[tool.flwr.app.config]`` in pyproject.toml and ``--run-config`` overrides. We turn
it into a frozen dataclass here, reject unknown keys and bad values with one clear message, and
pass the object down; no other module reads raw run_config keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

from common.errors import FedLoraError
from common.strategy_registry import strategy_names, strategy_spec

TASKS = ("classification", "causal-lm")
PARTITIONS = ("iid", "dirichlet", "quantity")
SITE_EVAL_ROWS = ("validation", "test")
TRANSFER_DTYPES = ("float32", "float16", "int8")
DEVICES = ("auto", "cuda", "mps", "cpu")
CLIENT_DP_CLIPPING = ("client", "server")
SELECTION_METRICS = ("auto", "accuracy", "macro-f1", "loss", "perplexity")
DATA_CHECK_POLICIES = ("warn", "drop", "refuse")
POOLINGS = ("auto", "mean", "cls")
HEAD_MODES = ("auto", "fit", "train", "fit-then-train")
STRATEGIES = strategy_names()
DATA_ENV_VAR = "FEDLORA_DATA"
# A personal adapter starts from the trained global one: at the sites' full learning rate its
# few steps on a site's rows undid more than they added on some sites (docs/benchmarks.md).
PERSONAL_LR_DIVISOR = 5


@dataclass(frozen=True)
class FedLoraConfig:
    # Model and LoRA
    model: str = "default"  # "default" = the bundled all-MiniLM-L6-v2; else a hub id or a folder
    task: str = "classification"  # classification (text -> label) or causal-lm (prompt -> response)
    lora_r: int = 8  # LoRA rank of every site's adapter, unless client-ranks sets them
    lora_alpha: float = 16.0  # LoRA scale = lora-alpha / the global rank, the same at every rank
    lora_dropout: float = 0.05  # dropout on the input of the LoRA branch while training
    lora_target_modules: str = "auto"  # comma-separated module names, or "auto" per architecture
    max_length: int = 128  # tokens per example; longer examples are truncated
    device: str = "auto"  # auto = CUDA (bf16/fp16), else MPS, else CPU (float32; see cpu-bf16)
    load_in_4bit: bool = False  # QLoRA on the clients: needs CUDA and bitsandbytes
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    cpu_bf16: bool = True  # local training under bf16 autocast on CPUs with native bf16
                           # (AVX512-BF16, AMX, Arm BF16); not for exact, ffa or DP-SGD
    pooling: str = "auto"  # classification: what the head reads: mean (of the last hidden
                           # states, unit length), cls (the model's own head), or auto (mean for
                           # models made for mean pooling, e.g. sentence-transformers folders)
    # Classification head
    head_mode: str = "auto"  # fit: closed form from the sites' summed statistics before round 1,
                             # frozen while LoRA trains; train: trained with LoRA from a random
                             # start; fit-then-train: fitted, then trained; auto: fit where the
                             # strategy can use summed statistics, else train
    head_refit_every: int = 0  # fit modes: fit the head again after every N-th round; 0 = never
    personal_head: bool = False  # each site also solves a head of its own in closed form (its
                                 # rows, pulled toward the global head), scores it on its
                                 # validation rows at every evaluation and keeps it: never sent
    personal_mu: str = "auto"  # the personal head's pull toward the global head: a number >= 0
                               # (0: the site's own fit), or auto: chosen per site on its rows
    personal_steps: int = 0  # with personal-head: after the last round each site also trains
                             # the global adapter with its personal head this many steps on its
                             # rows and keeps it as its personal adapter; 0 = none
    personal_learning_rate: float = 0.0  # the personal adapter's learning rate; 0 = a fifth
                                         # of learning-rate (it starts from a trained model)
    # Data
    data: str = ""  # file, folder or hub data set; empty falls back to $FEDLORA_DATA
    eval_data: str = ""  # the server's evaluation set (deployment); empty = data's test split
    text_column: str = "text"  # classification: the column holding the text
    label_column: str = "label"  # classification: the column holding the label
    prompt_column: str = "prompt"  # causal-lm: the column holding the prompt
    response_column: str = "response"  # causal-lm: the column holding the response (trained on)
    prompt_template: str = "{prompt}\n"  # causal-lm: text before the response, containing {prompt}
    labels: str = ""  # the shared label set: comma list or JSON file; empty = every label in data
    test_fraction: float = 0.1  # held back for server evaluation when the data has no test split
    val_fraction: float = 0.1  # of each client's partition, for client-side evaluation
    site_eval_rows: str = "validation"  # what a simulated site scores at evaluation:
                                        # validation (its val-fraction) or test
                                        # (classification: the data's test split dealt to the
                                        # sites by their share of each label: more rows of
                                        # its own distribution)
    max_train_examples: int = 0  # use a random subset of this many training examples; 0 = all
    max_eval_examples: int = 0  # use a random subset of this many evaluation examples; 0 = all
    # Data checks: each site checks its training rows before its first round and reports the
    # counts; per check, warn (log the count), drop (leave those rows out) or refuse (no training)
    check_empty: str = "drop"  # empty or missing text or label: nothing to learn from, so
                               # left out, as fedlora always did
    check_duplicates: str = "warn"  # text and label of an earlier row again: often a real,
                                    # frequent query, so kept; drop deduplicates
    check_too_long: str = "warn"  # more tokens than max-length: truncated, which most texts
                                  # survive; watch the share
    check_unknown_labels: str = "refuse"  # a label outside the shared set: usually misspelt or
                                          # unmapped, never trainable; leaving it out silently
                                          # would skew the site's data
    # Federation
    num_rounds: int = 3  # federated rounds to run; 0 = the head round alone (fit head modes)
    fraction_train: float = 1.0  # share of the connected sites sampled to train
    fraction_evaluate: float = 1.0  # share of the connected sites sampled to evaluate; 0 = none
    min_train_clients: int = 2  # fewest sites sampled to train, and usable replies a round needs
    min_evaluate_clients: int = 2  # fewest sites sampled to evaluate (none if fraction-evaluate=0)
    min_available_clients: int = 2  # sampling waits until this many sites are connected
    round_timeout: float = 3600.0  # seconds to wait for replies; late clients are left out
    round_retries: int = 1  # a round with fewer usable replies than min-train-clients is retried
    reply_poll_interval: float = 0.1  # server looks for replies every N s when due; 0: Flower's 3 s
    packed_arrays: bool = True  # each message's arrays travel as one (an object is a request each)
    # Model selection: the best round by the server's evaluation, and early stopping
    selection_metric: str = "auto"  # auto = accuracy (classification) or loss (causal-lm)
    early_stopping_patience: int = 0  # stop after this many rounds without improvement; 0 = never
    early_stopping_min_delta: float = 0.0  # an improvement must be larger than this
    # Local training
    local_epochs: int = 1  # passes over a site's training data each round
    local_steps: int = 0  # > 0 overrides local-epochs: a fixed number of optimiser steps
    batch_size: int = 32  # examples per micro-batch (DP-SGD: the expected batch size)
    learning_rate: float = 0.005  # learning rate of the sites' AdamW optimiser
    weight_decay: float = 0.0  # weight decay of the sites' AdamW optimiser
    max_grad_norm: float = 1.0  # L2 bound on each optimiser step's gradient; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches whose gradients add up to one optimiser step
    transfer_dtype: str = "float32"  # adapters on the wire: float32, float16, int8 (+ scales)
    class_weighted_loss: bool = False  # weigh each class by 1 / its share of the site's data
    # Example-level differential privacy (DP-SGD on each site); noise multiplier 0 = off
    dp_noise_multiplier: float = 0.0  # noise std / dp-clip-norm; 0 = no DP-SGD
    dp_clip_norm: float = 1.0  # per-example gradient norm bound; must be positive
    dp_delta: float = 1e-5  # the delta of each site's (epsilon, delta) guarantee, in (0, 1)
    dp_target_epsilon: float = 0.0  # a site stops training before it would exceed this; 0 = none
    head_dp_noise_multiplier: float = 0.0  # noise std / sensitivity on each site's head
                                           # statistics (fit head modes); 0 = dp-noise-multiplier
    # Client-level differential privacy (Flower's fixed-clipping wrappers); noise 0 = off
    client_dp_noise_multiplier: float = 0.0  # Gaussian noise std / (clip norm / clients sampled)
    client_dp_clip_norm: float = 0.1  # L2 bound (> 0) on each site's update (its adapter - global)
    client_dp_clipping: str = "client"  # where updates are clipped: client (mod) or server
    client_dp_delta: float = 1e-5  # the delta of the run's (epsilon, delta) guarantee, in (0, 1)
    client_dp_target_epsilon: float = 0.0  # the run ends before a release would exceed it
    # Secure aggregation (Flower's SecAgg+): the server learns only the sum of the updates
    secure_aggregation: bool = False  # sum the sites' updates with SecAgg+ instead of reading each
    secagg_shares: float = 1.0  # fraction of the sampled sites each site shares its secrets with
    secagg_threshold: float = 0.5  # fraction of a site's shares that reconstructs its secrets
    secagg_clipping_range: float = 8.0  # adapter values must lie within +- this to be summed
    secagg_max_weight: float = 10000.0  # the most training examples any one site may weigh
    # Aggregation
    strategy: str = "fedavg"  # how the sites' updates are combined; see docs/strategies.md
    proximal_mu: float = 0.01  # fedprox: weight of (mu/2) * ||w - w_global||^2
    server_learning_rate: float = 0.0  # 0 = the strategy's own (fedadam/yogi 0.01, fedavgm 1)
    server_momentum: float = 0.9  # fedavgm: momentum of the server's update
    server_beta1: float = 0.9  # fedadam, fedyogi: decay of the first moment
    server_beta2: float = 0.99  # fedadam, fedyogi: decay of the second moment
    server_tau: float = 0.001  # fedadam, fedyogi: tau in m / (sqrt(v) + tau), the adaptivity
    client_ranks: str = ""  # per-site LoRA ranks "4,8,16", cycled over sites; empty = lora-r
    global_rank: int = 0  # rank of the global adapter; 0 = the largest client rank
    max_update_norm: float = 0.0  # replies whose update is larger (L2) are dropped; 0 = off
    max_examples_ratio: float = 100.0  # drop a reply over this x the others' median count; 0 = off
    max_update_norm_ratio: float = 10.0  # drop updates over this x the others' median norm; 0 = off
    trim_fraction: float = 0.2  # trimmed-mean: share cut from each end per coordinate
    # Simulation
    num_clients: int = 10  # simulated sites; under flwr run the federation's node count instead
    partition: str = "iid"  # how data is split: iid, dirichlet (label skew), quantity (size skew)
    alpha: float = 0.5  # Dirichlet concentration for the label- and quantity-skew partitions
    client_num_cpus: float = 1.0  # CPU cores per simulated site (Ray), also its torch threads
    client_num_gpus: float = 0.0  # GPUs per simulated site (Ray); a fraction shares one GPU
    seed: int = 42  # for partitions, splits, client sampling, initial weights and shuffling
    out_dir: str = ""  # the run directory; empty = runs/<UTC timestamp>
    resume: bool = False  # continue the run in out-dir after its last checkpointed round
    tensorboard: bool = False  # also write TensorBoard event files to <out-dir>/tensorboard

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # A non-finite learning rate or timeout would fail a round later, far from its cause.
            if str(f.type) == "float" and not math.isfinite(value):
                raise FedLoraError(f"config {_key(f.name)} must be a finite number, got {value}")
        _check_choice("task", self.task, TASKS)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("site-eval-rows", self.site_eval_rows, SITE_EVAL_ROWS)
        _check_choice("transfer-dtype", self.transfer_dtype, TRANSFER_DTYPES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("check-empty", self.check_empty, DATA_CHECK_POLICIES)
        _check_choice("check-duplicates", self.check_duplicates, DATA_CHECK_POLICIES)
        _check_choice("check-too-long", self.check_too_long, DATA_CHECK_POLICIES)
        _check_choice("check-unknown-labels", self.check_unknown_labels, DATA_CHECK_POLICIES)
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("head-mode", self.head_mode, HEAD_MODES)
        self._require(("lora-r", "max-length", "local-epochs", "batch-size",
                       "grad-accum-steps", "num-clients", "min-train-clients",
                       "min-evaluate-clients", "min-available-clients"),
                      lambda v: v > 0, "be a positive integer")
        self._require(("lora-alpha", "learning-rate", "alpha", "round-timeout",
                       "client-num-cpus", "secagg-clipping-range", "secagg-max-weight"),
                      lambda v: v > 0, "be positive")
        self._require(("local-steps", "max-train-examples", "early-stopping-patience",
                       "early-stopping-min-delta", "max-eval-examples", "weight-decay",
                       "max-grad-norm", "client-num-gpus", "proximal-mu", "server-learning-rate",
                       "server-momentum", "global-rank", "max-update-norm", "round-retries",
                       "max-examples-ratio", "max-update-norm-ratio", "reply-poll-interval",
                       "dp-noise-multiplier", "dp-target-epsilon", "client-dp-noise-multiplier",
                       "client-dp-target-epsilon", "head-refit-every", "num-rounds",
                       "head-dp-noise-multiplier", "personal-steps", "personal-learning-rate"),
                      lambda v: v >= 0, "not be negative")
        self._require(("lora-dropout", "test-fraction", "val-fraction", "server-beta1",
                       "server-beta2"), lambda v: 0 <= v < 1, "be in [0, 1)")
        self._require(("fraction-train", "fraction-evaluate"), lambda v: 0 <= v <= 1,
                      "be in [0, 1]")
        self._require(("secagg-shares", "secagg-threshold"), lambda v: 0 < v <= 1,
                      "be in (0, 1]")
        self._require(("trim-fraction",), lambda v: 0 <= v < 0.5, "be in [0, 0.5)")
        ranks = self.site_ranks  # parses client-ranks
        spec = strategy_spec(self.strategy)
        mixed = strategy_names(lambda s: s.mixed_ranks is not None)
        if len(set(ranks)) > 1 and spec.mixed_ranks is None:
            raise FedLoraError(f"strategy {self.strategy} needs one LoRA rank for all clients; "
                               f"client-ranks {self.client_ranks!r} needs strategy "
                               f"{' or '.join(mixed)}")
        if spec.mixed_ranks is None and self.global_rank and self.global_rank != self.lora_r:
            raise FedLoraError(f"strategy {self.strategy} keeps one rank: global-rank must be 0 "
                               f"or equal lora-r ({self.lora_r})")
        if spec.mixed_ranks == "truncate" and self.global_lora_rank < max(ranks):
            raise FedLoraError(f"{self.strategy} pads client adapters up to global-rank, which "
                               f"must be at least the largest client rank {max(ranks)}")
        if self.dp_clip_norm <= 0 or not 0 < self.dp_delta < 1:
            raise FedLoraError(f"config dp-clip-norm must be positive and dp-delta in (0, 1), "
                               f"got {self.dp_clip_norm} and {self.dp_delta}")
        if self.differential_privacy and spec.proximal_term:
            raise FedLoraError(f"DP-SGD clips per-example gradients of the loss; "
                               f"{self.strategy}'s proximal term is not per example: use another "
                               f"strategy")
        if self.differential_privacy and not self.is_classification:
            raise FedLoraError("DP-SGD needs a loss per example; causal-lm averages over the "
                               "batch's tokens, which does not bound one example's gradient")
        if self.differential_privacy and self.grad_accum_steps != 1:
            raise FedLoraError("DP-SGD samples its own batches: set grad-accum-steps=1")
        if self.dp_target_epsilon and not (self.differential_privacy or self.private_head):
            raise FedLoraError("dp-target-epsilon needs differential privacy: set "
                               "dp-noise-multiplier > 0 (or head-dp-noise-multiplier > 0)")
        self._check_client_dp_and_secagg()
        self._check_selection()
        self._check_head()
        if self.load_in_4bit and spec.residual_in_base:
            raise FedLoraError(f"strategy {self.strategy} folds a residual into the base "
                               f"weights, which 4-bit weights cannot hold: use another strategy "
                               f"or load-in-4bit=false")
        if "{prompt}" not in self.prompt_template:
            raise FedLoraError("config prompt-template must contain '{prompt}'")

    def _require(self, keys: tuple[str, ...], test: Callable[[Any], bool], wording: str) -> None:
        for key in keys:
            value = getattr(self, _field(key))
            if not test(value):
                raise FedLoraError(f"config {key} must {wording}, got {value}")

    def _check_selection(self) -> None:
        _check_choice("selection-metric", self.selection_metric, SELECTION_METRICS)
        task_metrics = {"classification": ("auto", "accuracy", "macro-f1", "loss"),
                        "causal-lm": ("auto", "loss", "perplexity")}[self.task]
        if self.selection_metric not in task_metrics:
            raise FedLoraError(f"config selection-metric {self.selection_metric} is not "
                               f"measured for task {self.task}: use one of "
                               f"{', '.join(task_metrics)}")
        if self.class_weighted_loss and not self.is_classification:
            raise FedLoraError("class-weighted-loss needs task classification")
        if self.class_weighted_loss and self.differential_privacy:
            raise FedLoraError("class-weighted-loss is not available with DP-SGD (Opacus "
                               "scales per-example gradients for an unweighted mean)")

    def _check_head(self) -> None:
        if self.num_rounds == 0 and self.head_mode == "train":
            raise FedLoraError("num-rounds=0 runs the head round alone, which head-mode=train "
                               "does not have: use num-rounds > 0 or a fit head mode")
        if self.head_dp_noise_multiplier and not self.differential_privacy and self.num_rounds:
            raise FedLoraError("head-dp-noise-multiplier protects the head statistics only; the "
                               "training rounds would send updates without DP: set "
                               "dp-noise-multiplier too, or num-rounds=0 (the head alone)")
        self.personal_mu_value  # raises on a bad value
        if self.personal_steps and not self.personal_head:
            raise FedLoraError("personal-steps trains a personal adapter from the personal "
                               "head: set personal-head=true too")
        if self.personal_learning_rate and not self.personal_steps:
            raise FedLoraError("personal-learning-rate is the personal adapter's: set "
                               "personal-steps too")
        if self.is_classification:
            return
        if self.personal_head:
            raise FedLoraError("config personal-head applies to classification; task causal-lm "
                               "has no head to personalise")
        if self.site_eval_rows == "test":
            raise FedLoraError("config site-eval-rows=test deals test rows out by label; task "
                               "causal-lm has no labels: use site-eval-rows=validation")
        if self.pooling != "auto":
            raise FedLoraError(f"config pooling={self.pooling} applies to classification; "
                               f"task causal-lm predicts every token and pools nothing")
        if self.head_mode not in ("auto", "train"):
            raise FedLoraError(f"config head-mode={self.head_mode} fits a classification head; "
                               f"task causal-lm has none: use head-mode=auto or train")

    def _check_client_dp_and_secagg(self) -> None:
        _check_choice("client-dp-clipping", self.client_dp_clipping, CLIENT_DP_CLIPPING)
        if self.client_dp_clip_norm <= 0 or not 0 < self.client_dp_delta < 1:
            raise FedLoraError(f"config client-dp-clip-norm must be positive and client-dp-delta "
                               f"in (0, 1), got {self.client_dp_clip_norm} and "
                               f"{self.client_dp_delta}")
        if self.client_dp_target_epsilon and not self.client_level_dp:
            raise FedLoraError("client-dp-target-epsilon needs client-level DP: set "
                               "client-dp-noise-multiplier > 0")
        if self.client_level_dp and self.differential_privacy:
            raise FedLoraError("choose one kind of differential privacy: example-level "
                               "(dp-noise-multiplier) or client-level (client-dp-noise-multiplier)")
        if self.secure_aggregation and self.client_level_dp and self.client_dp_clipping != "client":
            raise FedLoraError("with secure-aggregation the server never sees an update to clip: "
                               "set client-dp-clipping=client")
        if self.client_level_dp and self.transfer_dtype == "int8":
            raise FedLoraError("client-level DP clips updates of the arrays as sent, which int8 "
                               "values and their scales are not: use transfer-dtype float32 or "
                               "float16")
        if self.secure_aggregation and self.min_train_clients < 2:
            raise FedLoraError("secure aggregation sums at least 2 sites a round (one site's sum "
                               "is its update): set min-train-clients >= 2")
        if self.secure_aggregation and self.max_update_norm:
            raise FedLoraError("with secure-aggregation the server cannot check each update's "
                               "norm: set max-update-norm=0 (or clip with client-level DP)")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedLoraConfig":
        """Build from Flower's flat run_config; unknown keys and wrong types are errors."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = _field(key)
            if name not in known:
                raise FedLoraError(f"unknown config key {key!r} (known keys: "
                                   f"{', '.join(sorted(config_keys()))})")
            values[name] = _coerce(key, raw, known[name].type)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The flat, dash-keyed dict Flower expects (inverse of from_run_config)."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> "FedLoraConfig":
        return dataclasses.replace(self, **changes)

    # -- derived values ----------------------------------------------------------------------
    @property
    def data_source(self) -> str:
        source = self.data or os.environ.get(DATA_ENV_VAR, "")
        if not source:
            raise FedLoraError(f"no data set given: set config data=PATH (or --data PATH) or "
                               f"the {DATA_ENV_VAR} environment variable")
        return source

    @property
    def personal_mu_value(self) -> float | None:
        """personal-mu as a number; None for auto (chosen per site)."""
        if self.personal_mu.strip() == "auto":
            return None
        try:
            value = float(self.personal_mu)
        except ValueError:
            value = math.nan
        if not value >= 0 or math.isinf(value):
            raise FedLoraError(f"config personal-mu must be auto or a number >= 0, got "
                               f"{self.personal_mu!r}")
        return value

    @property
    def target_modules(self) -> list[str] | None:
        """Explicit LoRA target modules, or None for the per-architecture default."""
        if self.lora_target_modules.strip() in ("", "auto"):
            return None
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def site_ranks(self) -> list[int]:
        """The LoRA rank of each simulated site, cycled by partition id."""
        if not self.client_ranks.strip():
            return [self.lora_r]
        try:
            ranks = [int(r) for r in self.client_ranks.split(",") if r.strip()]
        except ValueError:
            raise FedLoraError(f"config client-ranks must be comma-separated integers, got "
                               f"{self.client_ranks!r}") from None
        if not ranks or min(ranks) <= 0:
            raise FedLoraError(f"config client-ranks must be positive, got {self.client_ranks!r}")
        return ranks

    @property
    def global_lora_rank(self) -> int:
        return self.global_rank or max(self.site_ranks)

    @property
    def lora_scaling(self) -> float:
        """s in W + s * B @ A, the same for every rank so factors of any rank combine."""
        return self.lora_alpha / self.global_lora_rank

    def effective_server_lr(self) -> float:
        return self.server_learning_rate or strategy_spec(self.strategy).default_server_lr

    def effective_personal_lr(self) -> float:
        return self.personal_learning_rate or self.learning_rate / PERSONAL_LR_DIVISOR

    @property
    def differential_privacy(self) -> bool:
        return self.dp_noise_multiplier > 0

    @property
    def head_noise_multiplier(self) -> float:
        """Noise std / sensitivity on the head statistics a site releases (0 = none)."""
        return self.head_dp_noise_multiplier or self.dp_noise_multiplier

    @property
    def private_head(self) -> bool:
        return self.head_noise_multiplier > 0

    @property
    def client_level_dp(self) -> bool:
        return self.client_dp_noise_multiplier > 0

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    @property
    def selection_key(self) -> str:
        """The server metric that picks the best round (auto: accuracy or loss)."""
        if self.selection_metric != "auto":
            return self.selection_metric
        return "accuracy" if self.is_classification else "loss"

    def to_json(self) -> str:
        return json.dumps(self.to_run_config(), indent=2, sort_keys=True)


# Keys a SuperNode's --node-config may hold: Flower's own (simulation) and a site's settings.
FLOWER_NODE_KEYS = ("partition-id", "num-partitions")


@dataclass(frozen=True)
class SiteConfig:
    """A deployed site's own settings, from its SuperNode's --node-config. The site's data is
    read from data-path only; the other keys override the run's config on that site alone."""

    data_path: str
    lora_r: int = 0  # 0 = the run's global rank; differing ranks need strategy exact or hetlora
    batch_size: int = 0  # 0 = the run's batch-size
    device: str = ""  # "" = the run's device
    load_in_4bit: bool = False  # QLoRA on this site (or on all, with the run's key)
    gradient_checkpointing: bool = False  # on this site (or on all, with the run's key)
    personal_dir: str = ""  # where personal-head keeps this site's head; "" = ~/.fedlora/personal

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "SiteConfig | None":
        """None for a simulated node (no data-path); unknown keys and bad values are errors."""
        if "data-path" not in node_config:
            return None
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in node_config.items():
            if key in FLOWER_NODE_KEYS:
                continue
            if _field(key) not in known or "_" in key:  # keys are spelled with dashes
                raise FedLoraError(f"unknown node-config key {key!r} (known: "
                                   f"{', '.join(_key(n) for n in known)})")
            try:
                values[_field(key)] = _coerce(key, raw, known[_field(key)].type)
            except FedLoraError as err:
                raise FedLoraError(f"node-{err}") from None  # "node-config KEY must be ..."
        site = cls(**values)
        if not site.data_path.strip():
            raise FedLoraError("node-config data-path is empty")
        if site.lora_r < 0 or site.batch_size < 0:
            raise FedLoraError("node-config lora-r and batch-size must be positive integers")
        if site.device:
            _check_choice("device", site.device, DEVICES)
        return site

    def apply(self, cfg: FedLoraConfig) -> FedLoraConfig:
        """The run's config as this site trains with it."""
        return cfg.replace(batch_size=self.batch_size or cfg.batch_size,
                           device=self.device or cfg.device,
                           load_in_4bit=self.load_in_4bit or cfg.load_in_4bit,
                           gradient_checkpointing=(self.gradient_checkpointing
                                                   or cfg.gradient_checkpointing))


def config_keys() -> list[str]:
    return [_key(f.name) for f in fields(FedLoraConfig)]


def build_config(*layers: Mapping[str, Any], overrides: Sequence[str] = (),
                 flags: Mapping[str, Any] | None = None) -> FedLoraConfig:
    """How every command builds its config: the defaults, then each layer in order (a saved
    run's config, what the command fixes), then the `--run-config` texts in order, then the
    command's own flags that were given (None: not given). Later values win."""
    values = dict(FedLoraConfig().to_run_config())
    for layer in layers:
        values.update(layer)
    for text in overrides:
        values.update(parse_overrides(text))
    values.update({key: value for key, value in (flags or {}).items() if value is not None})
    return FedLoraConfig.from_run_config(values)


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"key=value key2='a b'"`` as flwr's ``--run-config`` does (values in TOML syntax,
    bare words taken as strings), or, like flwr, the path of a .toml file of such keys (what
    `fedlora tune` writes)."""
    import shlex
    import tomllib

    if text.strip().endswith(".toml"):
        path = os.path.expanduser(text.strip())
        if not os.path.isfile(path):
            raise FedLoraError(f"run-config file {text.strip()!r} does not exist")
        try:
            with open(path, "rb") as handle:
                return tomllib.load(handle)
        except tomllib.TOMLDecodeError as err:
            raise FedLoraError(f"run-config file {text.strip()!r} is not TOML: {err}") from None
    result: dict[str, Any] = {}
    try:
        items = shlex.split(text)
    except ValueError as err:
        raise FedLoraError(f"cannot parse --run-config {text!r}: {err}") from None
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FedLoraError(f"--run-config expects key=value pairs, got {item!r}")
        try:
            result[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            result[key] = value
    return result


def _field(key: str) -> str:
    return key.replace("-", "_")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FedLoraError(f"config {key} must be one of {', '.join(choices)}; got {value!r}")


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    type_name = str(type_name)
    if type_name == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
        raise FedLoraError(f"config {key} must be true or false, got {raw!r}")
    if type_name == "int":
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise FedLoraError(f"config {key} must be an integer, got {raw!r}")
        try:
            value = float(raw)
        except ValueError:
            raise FedLoraError(f"config {key} must be an integer, got {raw!r}") from None
        if not value.is_integer():
            raise FedLoraError(f"config {key} must be an integer, got {raw!r}")
        return int(value)
    if type_name == "float":
        if isinstance(raw, bool):
            raise FedLoraError(f"config {key} must be a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise FedLoraError(f"config {key} must be a number, got {raw!r}") from None
    return str(raw)


# Keys a resumed run may change; every other key must equal the interrupted run's.
RESUMABLE_CHANGES = {"num-rounds", "resume", "round-timeout", "round-retries", "out-dir",
                     "personal-head", "personal-mu", "personal-steps", "personal-learning-rate",
                     "reply-poll-interval", "packed-arrays",
                     "gradient-checkpointing", "cpu-bf16", "tensorboard", "early-stopping-patience",
                     "early-stopping-min-delta",
                     "client-num-cpus",
                     "client-num-gpus", "data", "min-train-clients", "min-evaluate-clients",
                     "min-available-clients"}


def check_resumable(saved: Mapping[str, Any], cfg: FedLoraConfig) -> None:
    current = cfg.to_run_config()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and
                     k in saved and saved[k] != current[k])
    if changed:
        raise FedLoraError(f"cannot resume with a different config: {', '.join(changed)} "
                           f"differ from the interrupted run's")
