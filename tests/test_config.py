import dataclasses
import tomllib

import pytest

from common.config import FedLoraConfig, config_keys, parse_overrides
from common.errors import FedLoraError
from tests.conftest import REPO


def test_pyproject_defaults_equal_the_config_defaults():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = project["tool"]["flwr"]["app"]["config"]
    assert sorted(declared) == sorted(config_keys())
    assert FedLoraConfig.from_run_config(declared) == FedLoraConfig()


def test_run_config_round_trip_and_coercion():
    cfg = FedLoraConfig.from_run_config({"lora-r": 16.0, "learning-rate": 1, "task": "causal-lm"})
    assert cfg.lora_r == 16 and isinstance(cfg.lora_r, int)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert FedLoraConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize("overrides, fragment", [
    ({"lora-rank": 8}, "unknown config key 'lora-rank'"),
    ({"lora-r": 0}, "lora-r must be a positive integer"),
    ({"lora-r": -4}, "lora-r must be a positive integer"),
    ({"lora-r": 2.5}, "lora-r must be an integer"),
    ({"task": "regression"}, "task must be one of"),
    ({"partition": "random"}, "partition must be one of"),
    ({"learning-rate": "fast"}, "learning-rate must be a number"),
    ({"fraction-train": 1.5}, "fraction-train must be in [0, 1]"),
    ({"transfer-dtype": "bfloat16"}, "transfer-dtype must be one of"),
])
def test_bad_values_are_rejected_with_the_key_named(overrides, fragment):
    with pytest.raises(FedLoraError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        FedLoraConfig.from_run_config(overrides)


NUMERIC_KEYS = {f.name.replace("_", "-"): str(f.type) for f in dataclasses.fields(FedLoraConfig)
                if str(f.type) in ("float", "int")}


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_key_rejects_nan_and_infinities(key):
    wording = "a finite number" if NUMERIC_KEYS[key] == "float" else "an integer"
    # Given as TOML gives them (float) and as the CLI gives them (text).
    for raw in (float("nan"), float("inf"), float("-inf"), "nan", "-inf"):
        with pytest.raises(FedLoraError, match=f"^config {key} must be {wording}, got"):
            FedLoraConfig.from_run_config({key: raw})


def test_parse_overrides_reads_toml_values_and_bare_words():
    parsed = parse_overrides("lora-r=4 learning-rate=1e-3 data=/tmp/x.csv model='a b' flag=true")
    assert parsed == {"lora-r": 4, "learning-rate": 0.001, "data": "/tmp/x.csv",
                      "model": "a b", "flag": True}
    with pytest.raises(FedLoraError, match="key=value"):
        parse_overrides("lora-r")


def test_data_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("FEDLORA_DATA", "/some/where.csv")
    assert FedLoraConfig().data_source == "/some/where.csv"
    monkeypatch.delenv("FEDLORA_DATA")
    with pytest.raises(FedLoraError, match="no data set given"):
        FedLoraConfig().data_source


def test_every_command_builds_its_config_in_one_order():
    """Defaults, then layers in order, then --run-config texts in order, then given flags."""
    from common.config import build_config

    cfg = build_config({"lora-r": 4, "seed": 1}, {"seed": 2},
                       overrides=["lora-r=16 learning-rate=0.01", "learning-rate=0.02"],
                       flags={"seed": None, "num-rounds": 7, "lora-r": None})
    assert (cfg.lora_r, cfg.seed, cfg.learning_rate, cfg.num_rounds) == (16, 2, 0.02, 7)
    assert build_config(overrides=["seed=3"], flags={"seed": 5}).seed == 5
    assert build_config().to_run_config() == FedLoraConfig().to_run_config()
