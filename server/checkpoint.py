"""Per-round checkpoints: everything needed to continue a run after the last complete round.

    checkpoint/
        adapter.safetensors    the global adapter after the round
        strategy.safetensors   the strategy's state (server optimiser moments, exact's residual)
        state.json             the round, and the client-sampling RNG state

The folder is replaced atomically, so a process killed at any moment leaves the previous
round's checkpoint or this one, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_directory, recover_directory
from common.checksums import verify_checksums, write_checksums
from common.errors import FedLoraError

SEPARATOR = "::"  # strategy tensors are stored as "<state name>::<tensor name>"


@dataclass
class Checkpoint:
    round: int
    adapter: dict[str, torch.Tensor]
    strategy_state: dict[str, dict[str, torch.Tensor]]
    rng_state: object


def save_checkpoint(folder: Path, ckpt: Checkpoint) -> None:
    with atomic_directory(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in ckpt.adapter.items()},
                  str(tmp / "adapter.safetensors"))
        flat = {f"{group}{SEPARATOR}{name}": tensor.detach().contiguous().cpu()
                for group, tensors in ckpt.strategy_state.items()
                for name, tensor in tensors.items()}
        save_file(flat, str(tmp / "strategy.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"round": ckpt.round,
                                                    "rng_state": ckpt.rng_state}))
        write_checksums(tmp)


def checkpoint_exists(folder: Path) -> bool:
    return (recover_directory(folder) / "state.json").is_file()


def load_checkpoint(folder: Path) -> Checkpoint:
    if not checkpoint_exists(folder):
        raise FedLoraError(f"nothing to resume: {folder} holds no checkpoint")
    verify_checksums(folder, "checkpoint")
    try:
        state = json.loads((folder / "state.json").read_text())
        adapter = load_file(str(folder / "adapter.safetensors"))
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(folder / "strategy.safetensors")).items():
            group, _, name = key.partition(SEPARATOR)
            grouped.setdefault(group, {})[name] = tensor
        return Checkpoint(round=int(state["round"]), adapter=adapter, strategy_state=grouped,
                          rng_state=_as_rng_state(state["rng_state"]))
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as err:
        raise FedLoraError(f"checkpoint in {folder} cannot be read: "
                           f"{type(err).__name__}: {err}") from None


def _as_rng_state(value):
    """random.getstate() is nested tuples; JSON turns them into lists."""
    return tuple(_as_rng_state(v) for v in value) if isinstance(value, list) else value
