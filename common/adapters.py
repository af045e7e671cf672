"""A saved fedlora adapter (a run's final_adapter/, or `fedlora export --adapter`), loaded for
inference: the base model it was trained on, its label set and its task."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from common.atomic import readable_directory
from common.checksums import verify_checksums
from common.errors import FedLoraError, first_line
from common.model import resolve_model_path

TASK_TYPES = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}
# Beside a PEFT adapter: what fedlora needs to rebuild its model (the pooling its head reads).
SETTINGS_FILE = "fedlora.json"
# Adapters saved before pooling was a choice read the model's own head.
DEFAULT_POOLING = "cls"


@dataclass(frozen=True)
class SavedAdapter:
    path: Path
    task: str  # classification | causal-lm
    base_model: str  # a local folder or a hub id
    labels: list[str] | None  # classification: label id -> name
    run_config: dict  # the run's config.json when the adapter sits in a run directory, else {}
    pooling: str | None = None  # classification: mean or cls


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FedLoraError(f"{path} cannot be read as JSON: {err}") from None


def write_adapter_settings(folder: Path, settings: dict) -> None:
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")


def find_adapter(path: str | Path) -> Path:
    """An adapter folder, or a run directory (its final_adapter/)."""
    path = readable_directory(Path(path).expanduser())
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "metrics.jsonl").is_file() or (path / "config.json").is_file():
        summary = path / "summary.json"
        status = _read_json(summary).get("status") if summary.is_file() else None
        final = readable_directory(path / "final_adapter")
        if not (final / "adapter_config.json").is_file():
            raise FedLoraError(f"run {str(path)!r} has no final adapter (status: "
                               f"{status or 'unknown'}); finish it with fedlora simulate "
                               f"--resume {path}")
        return final
    if not path.exists():
        raise FedLoraError(f"adapter {str(path)!r} does not exist")
    raise FedLoraError(f"{str(path)!r} is neither a PEFT adapter folder (no "
                       f"adapter_config.json) nor a fedlora run directory")


def read_saved_adapter(path: str | Path, model: str | None = None) -> SavedAdapter:
    """What an adapter needs to be loaded; `model` overrides the base model it names (for a
    run directory moved to another machine)."""
    folder = find_adapter(path)
    verify_checksums(folder, "adapter")
    adapter_config = _read_json(folder / "adapter_config.json")
    task = TASK_TYPES.get(str(adapter_config.get("task_type")))
    if task is None:
        raise FedLoraError(f"adapter {str(folder)!r} has task_type "
                           f"{adapter_config.get('task_type')!r}; fedlora adapters are "
                           f"{' or '.join(TASK_TYPES)}")
    run_config_file = folder.parent / "config.json"
    run_config = _read_json(run_config_file) if run_config_file.is_file() else {}
    labels, pooling = None, None
    if task == "classification":
        settings_file = folder / SETTINGS_FILE
        settings = _read_json(settings_file) if settings_file.is_file() else {}
        pooling = settings.get("pooling", DEFAULT_POOLING) if isinstance(settings, dict) else None
        if pooling not in ("mean", "cls"):
            raise FedLoraError(f"{settings_file} names pooling {pooling!r}; expected mean or cls")
        labels_file = folder / "labels.json"
        if not labels_file.is_file():
            raise FedLoraError(f"classification adapter {str(folder)!r} has no labels.json")
        labels = [str(label) for label in _read_json(labels_file)]
    name = model or run_config.get("model") or adapter_config.get("base_model_name_or_path")
    if not name:
        raise FedLoraError(f"adapter {str(folder)!r} names no base model: give --model")
    try:
        base = resolve_model_path(str(name))
    except FedLoraError as err:
        raise FedLoraError(f"{err} (the adapter's base model; give --model)") from None
    return SavedAdapter(path=folder, task=task, base_model=base, labels=labels,
                        run_config=run_config, pooling=pooling)


def load_adapter_model(saved: SavedAdapter, device: torch.device | None = None):
    """(peft model in eval mode, tokenizer), in float32 on `device` (default CPU)."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from common.model import load_base_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(saved.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        base = load_base_model(saved.base_model, saved.labels, saved.pooling,
                               {"dtype": torch.float32})
        if saved.labels is not None and base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(base, saved.path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        reason = first_line(err)
        raise FedLoraError(f"cannot load adapter {str(saved.path)!r} onto "
                           f"{saved.base_model!r}: {reason}") from None
    model.to(device or torch.device("cpu")).eval()
    return model, tokenizer
