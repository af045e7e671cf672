"""What a run writes survives: folders replaced by two renames lose nothing when killed between
them, and checkpoints and adapters with flipped bytes are refused, not loaded."""

import os

import pytest
import torch
from safetensors.torch import save_file

import common.atomic
from common.adapters import find_adapter
from common.atomic import atomic_directory
from common.checksums import CHECKSUMS_FILE, write_checksums
from common.errors import FedLoraError
from server.checkpoint import (
    BestRound,
    RunState,
    checkpoint_exists,
    load_run_state,
    save_run_state,
)


def _checkpoint(round_: int) -> RunState:
    return RunState(round=round_, adapter={"w": torch.full((2, 2), float(round_))},
                    sampling_rng=(3, (1, 2), None), parts={})


class _Moments:
    """A Stateful part: its tensors under its own group."""

    def __init__(self, value: float) -> None:
        self.m = torch.full((3,), value)

    def state_tensors(self):
        return {"moments": {"m": self.m}}

    def load_state_tensors(self, state):
        self.m = state["moments"]["m"].clone()


def test_the_run_state_saves_and_loads_as_it_was_captured(tmp_path):
    import random

    rng, part = random.Random(7), _Moments(2.5)
    best = BestRound(round=1, value=0.75, adapter={"w": torch.ones(2)},
                     offsets={"x": torch.zeros(2, 2, dtype=torch.float64)})
    state = RunState.capture(2, {"w": torch.full((2,), 3.0)}, rng, [part], best)
    save_run_state(tmp_path / "checkpoint", state)
    expected = rng.random()
    rng.random()
    loaded = load_run_state(tmp_path / "checkpoint")
    assert loaded.round == 2 and torch.equal(loaded.adapter["w"], torch.full((2,), 3.0))
    assert loaded.best.round == 1 and loaded.best.value == 0.75
    assert torch.equal(loaded.best.adapter["w"], torch.ones(2))
    assert loaded.best.offsets["x"].dtype == torch.float64
    assert set(loaded.parts) == {"moments"}  # the best round's groups are not a part's
    restored = _Moments(0.0)
    loaded.restore(rng, [restored])
    assert torch.equal(restored.m, torch.full((3,), 2.5)) and rng.random() == expected
    with pytest.raises(ValueError, match="best"):
        RunState.capture(2, {}, rng, [type("Clash", (), {
            "state_tensors": lambda self: {"best": {}}})()])


def _dying_on_second_rename():
    """os.replace that dies on its second call: the old folder aside, the new one not in."""
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        os.rename(src, dst)
    return replace


def test_a_checkpoint_replaced_when_killed_between_renames_resumes_from_the_old(tmp_path,
                                                                                 monkeypatch):
    folder = tmp_path / "checkpoint"
    save_run_state(folder, _checkpoint(1))
    with monkeypatch.context() as patch:
        patch.setattr(common.atomic.os, "replace", _dying_on_second_rename())
        with pytest.raises(KeyboardInterrupt):
            save_run_state(folder, _checkpoint(2))
    assert not folder.exists()
    assert checkpoint_exists(folder)
    restored = load_run_state(folder)
    assert restored.round == 1 and torch.equal(restored.adapter["w"], torch.ones(2, 2))
    save_run_state(folder, _checkpoint(2))
    assert load_run_state(folder).round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_an_adapter_swap_killed_between_renames_is_still_found(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with atomic_directory(run / "final_adapter") as tmp:
        (tmp / "adapter_config.json").write_text('{"round": 1}')
    with monkeypatch.context() as patch:
        patch.setattr(common.atomic.os, "replace", _dying_on_second_rename())
        with pytest.raises(KeyboardInterrupt), atomic_directory(run / "final_adapter") as tmp:
            (tmp / "adapter_config.json").write_text('{"round": 2}')
    found = find_adapter(run)
    assert (found / "adapter_config.json").read_text() == '{"round": 1}'
    assert not (run / "final_adapter").exists()  # a reader leaves the folder as it found it


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # a tensor value's byte: the file still parses
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_flipped_bytes_is_refused_not_resumed(tmp_path):
    folder = tmp_path / "checkpoint"
    save_run_state(folder, _checkpoint(3))
    assert load_run_state(folder).round == 3
    _flip_last_byte(folder / "adapter.safetensors")
    with pytest.raises(FedLoraError, match="is corrupt: adapter.safetensors is not what was"):
        load_run_state(folder)
    (folder / CHECKSUMS_FILE).unlink()  # a checkpoint of an older version: read as it is
    assert load_run_state(folder).adapter["w"][1, 1] != 3.0


def test_a_corrupt_adapter_is_one_line_for_evaluate_and_export(tmp_path, capsys):
    from simulations.cli import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"task_type": "SEQ_CLS", "base_model_name_or_path": "default"}')
    (adapter / "labels.json").write_text('["a", "b"]')
    save_file({"w": torch.ones(4)}, str(adapter / "adapter_model.safetensors"))
    write_checksums(adapter)
    _flip_last_byte(adapter / "adapter_model.safetensors")
    for argv in (["export", str(adapter), "--adapter", str(tmp_path / "out")],
                 ["export", str(adapter), "--merged", str(tmp_path / "out")],
                 ["evaluate", "--adapter", str(adapter), "--data", str(tmp_path)]):
        assert main(argv) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert "is corrupt: adapter_model.safetensors is not what was written" in line, line
    assert not (tmp_path / "out").exists()
    # Without checksums (another tool's adapter) a file cut short is still refused.
    (adapter / CHECKSUMS_FILE).unlink()
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert main(["export", str(adapter), "--adapter", str(tmp_path / "out")]) == 2
    assert "adapter_model.safetensors does not load" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
