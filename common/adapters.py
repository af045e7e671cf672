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
# A site's personal head (config personal-head), in the site's own folder.
PERSONAL_HEAD_FILE = "personal_head.safetensors"
PERSONAL_HEAD_FORMAT = "fedlora-personal-head"


@dataclass(frozen=True)
class SavedAdapter:
    path: Path
    task: str  # classification | causal-lm
    base_model: str  # a local folder or a hub id
    labels: list[str] | None  # classification: label id -> name
    run_config: dict  # the run's config.json when the adapter sits in a run directory, else {}
    pooling: str | None = None  # classification: mean or cls
    # A site's personal head (its folder or file) that replaces the adapter's head when loaded.
    personal_head: str | None = None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FedLoraError(f"{path} cannot be read as JSON: {err}") from None


def write_adapter_settings(folder: Path, settings: dict) -> None:
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")


def save_adapter_folder(lora, labels: list[str] | None, folder: str | Path) -> None:
    """`lora` (a common.model.LoraModel) as a PEFT adapter folder that read_saved_adapter
    reads: weights, adapter_config.json, tokenizer, labels.json, fedlora.json, checksums;
    written whole or not at all."""
    from common.atomic import atomic_directory
    from common.checksums import write_checksums

    with atomic_directory(folder) as tmp:
        lora.model.save_pretrained(tmp)
        lora.tokenizer.save_pretrained(tmp)
        if labels is not None:
            (tmp / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        if lora.pooling is not None:
            write_adapter_settings(tmp, {"pooling": lora.pooling})
        write_checksums(tmp)


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


def read_saved_adapter(path: str | Path, model: str | None = None,
                       personal_head: str | None = None) -> SavedAdapter:
    """What an adapter needs to be loaded; `model` overrides the base model it names (for a
    run directory moved to another machine); `personal_head`: a site's, to load in place of
    the adapter's head (checked here: it exists and the adapter has a head)."""
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
    if personal_head is not None:
        if task != "classification":
            raise FedLoraError(f"a personal head replaces a classification head; adapter "
                               f"{str(folder)!r} is a {task} adapter")
        head = Path(personal_head).expanduser()
        if not (head / PERSONAL_HEAD_FILE if head.is_dir() else head).is_file():
            raise FedLoraError(f"personal head {personal_head!r} does not exist (a site's "
                               f"folder or its {PERSONAL_HEAD_FILE})")
    return SavedAdapter(path=folder, task=task, base_model=base, labels=labels,
                        run_config=run_config, pooling=pooling, personal_head=personal_head)


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
    if saved.personal_head:
        apply_personal_head(model, saved.personal_head)
    model.to(device or torch.device("cpu")).eval()
    return model, tokenizer


def write_personal_head(folder: str | Path, weight: torch.Tensor, bias: torch.Tensor,
                        metadata: dict[str, str]) -> Path:
    """A site's personal head as FOLDER/personal_head.safetensors, written whole or not at
    all; the inverse of read_personal_head."""
    from safetensors.torch import save

    from common.atomic import atomic_write_bytes

    tensors = {"weight": weight.to(torch.float32).contiguous(),
               "bias": bias.to(torch.float32).contiguous()}
    path = Path(folder) / PERSONAL_HEAD_FILE
    atomic_write_bytes(path, save(tensors, metadata={**metadata,
                                                     "format": PERSONAL_HEAD_FORMAT}))
    return path


def read_personal_head(path: str | Path, num_labels: int, dim: int) -> dict[str, torch.Tensor]:
    """A personal head (the file, or the site folder holding it) as {weight, bias} for a head
    of `num_labels` x `dim`; FedLoraError naming what is wrong."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / PERSONAL_HEAD_FILE
    if not path.is_file():
        raise FedLoraError(f"personal head {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != PERSONAL_HEAD_FORMAT:
                raise FedLoraError(f"{str(path)!r} is not a fedlora personal head")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise FedLoraError(f"personal head {str(path)!r} does not load: "
                           f"{first_line(err)}") from None
    for name, shape in {"weight": (num_labels, dim), "bias": (num_labels,)}.items():
        found = tuple(tensors[name].shape) if name in tensors else None
        if found != shape:
            raise FedLoraError(f"personal head {str(path)!r}: {name} is "
                               f"{found or 'missing'}, this model's head needs {shape}")
    return {"weight": tensors["weight"], "bias": tensors["bias"]}


def apply_personal_head(model: torch.nn.Module, path: str | Path) -> None:
    """Put a site's personal head in place of the adapter's head in `model` (a PeftModel
    from load_adapter_model)."""
    from peft.utils import ModulesToSaveWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    head = wrappers[0].modules_to_save[wrappers[0].active_adapter] if len(wrappers) == 1 \
        else None
    if not isinstance(head, torch.nn.Linear) or head.bias is None:
        raise FedLoraError("a personal head replaces one linear classification head with a "
                           "bias; this adapter's model has none")
    tensors = read_personal_head(path, head.out_features, head.in_features)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
