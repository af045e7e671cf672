"""A run's state after its last complete round, and the one pair of functions that saves and
loads it: everything needed to continue the run as if it had not stopped.

    checkpoint/
        adapter.safetensors    the global adapter after the round
        strategy.safetensors   each stateful part's tensors ("<group>::<name>": the server
                               optimiser's moments, exact's residual, client-level DP's
                               releases, the loop's retries) and the best round's
                               ("best", "best-adapter", "best-offsets")
        state.json             the round, and the client-sampling RNG state

The folder is replaced atomically, so a process killed at any moment leaves the previous
round's checkpoint or this one, never a mix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_directory, recover_directory
from common.checksums import verify_checksums, write_checksums
from common.errors import FedLoraError

SEPARATOR = "::"  # part tensors are stored as "<group>::<tensor name>"
Tensors = dict[str, torch.Tensor]
# The best round's groups in strategy.safetensors; no part may use these names.
BEST, BEST_ADAPTER, BEST_OFFSETS = "best", "best-adapter", "best-offsets"


class Stateful(Protocol):
    """What carries state from round to round: the strategy and the run's other parts."""

    def state_tensors(self) -> dict[str, Tensors]: ...

    def load_state_tensors(self, state: dict[str, Tensors]) -> None: ...


@dataclass
class BestRound:
    """The best round so far by the run's selection metric, and what it scored."""

    round: int
    value: float
    adapter: Tensors
    offsets: Tensors = field(default_factory=dict)  # what it added to the base (exact)


@dataclass
class RunState:
    round: int
    adapter: Tensors  # the global adapter after `round`
    sampling_rng: object  # random.Random.getstate() of the strategy's client sampling
    parts: dict[str, Tensors]  # group -> tensors, of every Stateful part
    best: BestRound | None = None

    @classmethod
    def capture(cls, server_round: int, adapter: Tensors, rng, parts: Sequence[Stateful],
                best: BestRound | None = None) -> "RunState":
        groups = {group: tensors for part in parts
                  for group, tensors in part.state_tensors().items()}
        clash = {BEST, BEST_ADAPTER, BEST_OFFSETS} & groups.keys()
        if clash:
            raise ValueError(f"state group(s) {sorted(clash)} are the best round's")
        return cls(round=server_round, adapter=adapter, sampling_rng=rng.getstate(),
                   parts=groups, best=best)

    def restore(self, rng, parts: Sequence[Stateful]) -> None:
        """Put the parts and the sampling RNG back as capture() found them."""
        for part in parts:
            part.load_state_tensors(self.parts)
        rng.setstate(self.sampling_rng)

    def frozen(self) -> "RunState":
        """A copy no later round changes (round 0 is saved while round 1 trains)."""
        return RunState(self.round, dict(self.adapter), self.sampling_rng,
                        {group: {name: t.detach().clone() for name, t in tensors.items()}
                         for group, tensors in self.parts.items()}, self.best)


def save_run_state(folder: Path, state: RunState) -> None:
    groups = dict(state.parts)
    if state.best is not None:
        groups[BEST] = {"round": torch.tensor([state.best.round]),
                        "value": torch.tensor([state.best.value], dtype=torch.float64)}
        groups[BEST_ADAPTER], groups[BEST_OFFSETS] = state.best.adapter, state.best.offsets
    with atomic_directory(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.adapter.items()},
                  str(tmp / "adapter.safetensors"))
        save_file({f"{group}{SEPARATOR}{name}": tensor.detach().contiguous().cpu()
                   for group, tensors in groups.items() for name, tensor in tensors.items()},
                  str(tmp / "strategy.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"round": state.round,
                                                    "rng_state": state.sampling_rng}))
        write_checksums(tmp)


def load_run_state(folder: Path) -> RunState:
    if not checkpoint_exists(folder):
        raise FedLoraError(f"nothing to resume: {folder} holds no checkpoint")
    verify_checksums(folder, "checkpoint")
    try:
        saved = json.loads((folder / "state.json").read_text())
        adapter = load_file(str(folder / "adapter.safetensors"))
        groups: dict[str, Tensors] = {}
        for key, tensor in load_file(str(folder / "strategy.safetensors")).items():
            group, _, name = key.partition(SEPARATOR)
            groups.setdefault(group, {})[name] = tensor
        best_round = groups.pop(BEST, {})
        best = BestRound(round=int(best_round["round"][0]), value=float(best_round["value"][0]),
                         adapter=groups.pop(BEST_ADAPTER, {}),
                         offsets=groups.pop(BEST_OFFSETS, {})) if best_round else None
        return RunState(round=int(saved["round"]), adapter=adapter,
                        sampling_rng=_as_rng_state(saved["rng_state"]), parts=groups,
                        best=best)
    except (OSError, ValueError, TypeError, KeyError, IndexError, SafetensorError) as err:
        raise FedLoraError(f"checkpoint in {folder} cannot be read: "
                           f"{type(err).__name__}: {err}") from None


def checkpoint_exists(folder: Path) -> bool:
    return (recover_directory(folder) / "state.json").is_file()


def _as_rng_state(value):
    """random.getstate() is nested tuples; JSON turns them into lists."""
    return tuple(_as_rng_state(v) for v in value) if isinstance(value, list) else value
