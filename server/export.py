"""A run's final adapter, exported: the PEFT adapter alone, or the base model with it merged in
(loadable with `AutoModelFor...from_pretrained(OUT)`, no peft needed; a mean-pooling head ships
its model code beside the weights and loads with `trust_remote_code=True`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from common.adapters import SavedAdapter, load_adapter_model
from common.atomic import atomic_directory
from common.checksums import write_checksums
from common.errors import FedLoraError, first_line


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FedLoraError(f"export: {str(out)!r} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise FedLoraError(f"export: {str(out)!r} is a file, not a folder")


def export_adapter(saved: SavedAdapter, out: str | Path, force: bool = False) -> Path:
    """Copy the adapter folder (weights, adapter_config.json, tokenizer, labels.json); with a
    personal head, the weights with that head in place of the adapter's."""
    out = Path(out).expanduser()
    _check_target(out, force)
    for weights in saved.path.glob("*.safetensors"):
        try:  # an adapter of another tool has no checksums: its weights must at least load
            load_file(str(weights))
        except (OSError, SafetensorError) as err:
            raise FedLoraError(f"adapter {str(saved.path)!r} is corrupt: {weights.name} does "
                               f"not load ({first_line(err)})") from None
    with atomic_directory(out) as tmp:
        for item in saved.path.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if saved.personal_head:
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            model, _ = load_adapter_model(saved)
            state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_checksums(tmp)
    return out


def export_merged(saved: SavedAdapter, out: str | Path, force: bool = False) -> Path:
    """The base model with the adapter's low-rank products added to its weights and the
    trained head in place, saved with its tokenizer (and label names in its config)."""
    out = Path(out).expanduser()
    _check_target(out, force)
    model, tokenizer = load_adapter_model(saved)
    merged = model.merge_and_unload()
    if saved.pooling == "mean":
        import common.mean_pooling as mean_pooling

        merged.config.auto_map = mean_pooling.AUTO_MAP
    with atomic_directory(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if saved.pooling == "mean":
            shutil.copy2(mean_pooling.__file__, tmp / "modeling_fedlora.py")
        tokenizer.save_pretrained(tmp)
        if saved.labels is not None:
            (tmp / "labels.json").write_text(json.dumps(saved.labels, indent=1) + "\n")
        write_checksums(tmp)
    return out
