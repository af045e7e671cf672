"""Folders replaced by two renames: a process killed between them loses nothing."""

import os

import pytest
import torch

import common.atomic
from common.adapters import find_adapter
from common.atomic import atomic_directory
from server.checkpoint import Checkpoint, checkpoint_exists, load_checkpoint, save_checkpoint


def _checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(round=round_, adapter={"w": torch.full((2, 2), float(round_))},
                      strategy_state={}, rng_state=[3, [1, 2], None])


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
    save_checkpoint(folder, _checkpoint(1))
    with monkeypatch.context() as patch:
        patch.setattr(common.atomic.os, "replace", _dying_on_second_rename())
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(folder, _checkpoint(2))
    assert not folder.exists()
    assert checkpoint_exists(folder)
    restored = load_checkpoint(folder)
    assert restored.round == 1 and torch.equal(restored.adapter["w"], torch.ones(2, 2))
    save_checkpoint(folder, _checkpoint(2))
    assert load_checkpoint(folder).round == 2
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
