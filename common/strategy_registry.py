"""Every strategy by name, with what it can and needs: the one place that knows strategy names.

The config's checks, the client (how it takes a global adapter, its proximal term), the model
builder (a float32 base, FFA's frozen A), the server's privacy checks and `fedlora tune` ask
for a capability here instead of testing names. The aggregation rules themselves live in
server/strategies/, one file each, keyed by the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import FedLoraError

# How a site brings a global adapter of another rank into its own (client/sync.py).
MIXED_RANKS = ("truncate", "refactor")


@dataclass(frozen=True)
class StrategySpec:
    name: str
    summary: str = field(metadata={"help": "one line for --help and the docs"})
    mixed_ranks: str | None = field(default=None, metadata={
        "help": "sites may have different LoRA ranks; how a site takes the global adapter: "
                "'truncate' (its first r ranks) or 'refactor' (the global product re-factorised "
                "to r, the rest folded into its base); None: one rank for all"})
    sum_only: bool = field(default=True, metadata={
        "help": "the aggregate depends on the replies only through their weighted sum, so "
                "SecAgg+ (which reveals nothing else) can compute it"})
    mean_release: bool = field(default=True, metadata={
        "help": "the new global adapter is the weighted mean, so client-level DP noise added "
                "to it has the sensitivity the DP wrappers assume"})
    robust: bool = field(default=False, metadata={
        "help": "bounds what a few bad sites can do; a summed head statistic would not be, so "
                "the head cannot be fitted from sums"})
    float32_base: bool = field(default=False, metadata={
        "help": "every site and the server must hold the same base numbers (a residual folded "
                "into them, or a frozen A that never travels): the base loads as float32"})
    residual_in_base: bool = field(default=False, metadata={
        "help": "a dense residual is added to the base weights, which 4-bit weights cannot hold"})
    frozen_lora_a: bool = field(default=False, metadata={
        "help": "A stays at its seeded initialisation; only B and the head train and travel"})
    proximal_term: bool = field(default=False, metadata={
        "help": "each site adds proximal-mu/2 ||w - w_global||^2 to its loss (not a "
                "per-example term: refused with DP-SGD)"})
    default_server_lr: float = field(default=1.0, metadata={
        "help": "the server learning rate when server-learning-rate is 0"})
    tunable: bool = field(default=False, metadata={"help": "fedlora tune may choose it"})

    @property
    def sums_head_statistics(self) -> bool:
        """The head can be fitted from the sites' summed statistics (server/head_round.py)."""
        return not self.robust


_REGISTRY: dict[str, StrategySpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"strategy {spec.name!r} is registered twice")
    if spec.mixed_ranks not in (None, *MIXED_RANKS):
        raise ValueError(f"strategy {spec.name!r}: mixed_ranks must be one of {MIXED_RANKS}")
    _REGISTRY[spec.name] = spec
    return spec


def strategy_spec(name: str) -> StrategySpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FedLoraError(f"config strategy must be one of {', '.join(_REGISTRY)}, got "
                           f"{name!r}") from None


def strategy_names(capable=lambda spec: True) -> tuple[str, ...]:
    """The registered names, in registration order; those whose spec passes `capable`."""
    return tuple(name for name, spec in _REGISTRY.items() if capable(spec))


for _spec in (
    StrategySpec("fedavg", "example-weighted average of the adapter factors (FedIT)",
                 tunable=True),
    StrategySpec("fedprox", "FedAvg on the server; a proximal term on each site's loss",
                 proximal_term=True, tunable=True),
    StrategySpec("fedadam", "Adam on the server over the averaged adapter delta",
                 mean_release=False, default_server_lr=0.01),
    StrategySpec("fedyogi", "Yogi on the server over the averaged adapter delta",
                 mean_release=False, default_server_lr=0.01),
    StrategySpec("fedavgm", "server momentum on the averaged adapter delta",
                 mean_release=False, tunable=True),
    StrategySpec("ffa", "FFA-LoRA: A frozen at its seeded start, B averaged (exact)",
                 float32_base=True, frozen_lora_a=True, tunable=True),
    StrategySpec("exact", "the exact mean of the sites' B A products, re-factorised, with a "
                 "residual in the base; sites of any rank", mixed_ranks="refactor",
                 sum_only=False, mean_release=False, float32_base=True,
                 residual_in_base=True, tunable=True),
    StrategySpec("hetlora", "HetLoRA: factors zero-padded to the global rank and averaged; "
                 "sites of any rank", mixed_ranks="truncate", sum_only=False,
                 mean_release=False),
    StrategySpec("median", "coordinate-wise median (robust to a minority of bad sites)",
                 sum_only=False, mean_release=False, robust=True),
    StrategySpec("trimmed-mean", "coordinate-wise trimmed mean (trim-fraction each side)",
                 sum_only=False, mean_release=False, robust=True),
):
    register_strategy(_spec)
