"""Model and tokenizer loading from a `ModelConfig`: any Hugging Face model, or a tiny preset.

    tokenizer = load_tokenizer("runs/cache/world-1a2b3c4d5e6f/tokenizer")
    policy = load_causal_lm(cfg.model, tokenizer)              # eval mode; call .train() to train
    nli = load_sequence_classifier(cfg.nli, tokenizer, ["entailment", "neutral", "contradiction"])
    save_model(policy, tokenizer, run.path("model"))           # reload: ModelConfig(name_or_path=<that dir>)

`ModelConfig.name_or_path` loads a pretrained model (local directory or hub id) with
`from_pretrained(..., dtype=...)`; `ModelConfig.preset` builds a random-weight architecture from the
config's size fields and the tokenizer's vocabulary (seed torch first for reproducible weights).
Exactly one of the two is set. Every loader returns the model on its device and dtype, in eval mode.

The tokenizer always has a dedicated pad token (never pad = eos: with pad = eos a reward model that
reads the last non-pad position reads the wrong token; see research/ecosystem.md §9 item 6).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from alignment.config import ConfigError, LoraConfig, ModelConfig
from alignment.runs import atomic_replace_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD_TOKEN = "<pad>"


def pick_device(spec: str = "auto") -> torch.device:
    """`auto`: cuda if available, else cpu. Explicit: `cpu`, `cuda`, `cuda:1`."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {spec!r} requested but CUDA is not available; use cpu or auto")
    return device


def pick_dtype(spec: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """`auto`: bfloat16 on a CUDA device that supports it, else float32. Explicit: float32, bfloat16, float16."""
    if spec != "auto":
        if spec not in DTYPES:
            raise ConfigError(f"model.dtype: expected one of auto, {', '.join(DTYPES)}, got {spec!r}")
        return DTYPES[spec]
    device = pick_device() if device is None else torch.device(device)
    # CPU bf16 is emulated on most CPUs and measured 2x slower than fp32 (ecosystem.md §0), so fp32 there.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """`AutoTokenizer.from_pretrained`, plus a dedicated `<pad>` token when it has none or pads with eos."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        before = tokenizer.pad_token
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        log.info("tokenizer %s: pad token was %r; using a dedicated %s (id %d)",
                 name_or_path, before, PAD_TOKEN, tokenizer.pad_token_id)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Presets: tiny architectures built from ModelConfig's size fields for a given tokenizer.


def _llama_preset(cfg: ModelConfig, tokenizer: Any, **head: Any) -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **head,
    )


PRESETS: dict[str, Callable[..., PretrainedConfig]] = {"llama": _llama_preset}


def _preset_config(cfg: ModelConfig, tokenizer: Any, **head: Any) -> PretrainedConfig:
    if cfg.preset not in PRESETS:
        close = difflib.get_close_matches(cfg.preset, list(PRESETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.preset: unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)}){hint}")
    return PRESETS[cfg.preset](cfg, tokenizer, **head)


def _check_source(cfg: ModelConfig) -> None:
    if (cfg.name_or_path is None) == (cfg.preset is None):
        got = "both" if cfg.preset is not None else "neither"
        raise ConfigError(f"model: set exactly one of model.name_or_path and model.preset (got {got})")


def _build(auto_cls: Any, cfg: ModelConfig, tokenizer: Any, **head: Any) -> PreTrainedModel:
    """Pretrained or preset model of the `auto_cls` family, fitted to the tokenizer, on device/dtype, eval mode."""
    _check_source(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.preset is not None:
        model = auto_cls.from_config(_preset_config(cfg, tokenizer, **head)).to(dtype=dtype)
    else:
        # dtype is always explicit: v5 otherwise loads the dtype stored in config.json (ecosystem.md §2.2).
        # No later .to(dtype): it would also cast the modules a model keeps in fp32 on purpose.
        model = auto_cls.from_pretrained(cfg.name_or_path, dtype=dtype, **head)
    _fit_to_tokenizer(model, tokenizer)
    model = model.to(device)
    if cfg.lora is not None:
        model = attach_lora(model, cfg.lora)
    return model.eval()


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: Any) -> None:
    """Grow the embedding when the tokenizer gained tokens (e.g. `<pad>`), and use its pad id.

    bos/eos stay as the checkpoint has them: chat models often stop on several eos ids (a list in
    generation_config) that the tokenizer's single `eos_token_id` would overwrite.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        log.info("resizing embeddings from %d to %d tokens to fit the tokenizer", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(cfg: ModelConfig, tokenizer: Any) -> PreTrainedModel:
    """A causal LM from `cfg.name_or_path` or `cfg.preset`, with LoRA when `cfg.lora` is set; eval mode."""
    return _build(AutoModelForCausalLM, cfg, tokenizer)


def load_encoder(cfg: ModelConfig, tokenizer: Any) -> PreTrainedModel:
    """A bare encoder/decoder stack (`AutoModel`: hidden states, no head), e.g. for bi-encoders; eval mode."""
    return _build(AutoModel, cfg, tokenizer)


def load_sequence_classifier(cfg: ModelConfig, tokenizer: Any, labels: list[str] | None) -> PreTrainedModel:
    """A sequence classifier whose output i means `labels[i]`; eval mode.

    A pretrained classifier must already have that label order (case-insensitive), or this raises
    naming both orders; a pretrained model without a classification head gets a new head for `labels`.
    `labels=None` keeps a pretrained classifier's own labels unchecked.
    """
    if labels is None:
        if cfg.preset is not None:
            raise ConfigError("labels: a preset classifier needs its label names (e.g. ['reward'] for one score)")
        return _build(AutoModelForSequenceClassification, cfg, tokenizer)
    label2id = {name: i for i, name in enumerate(labels)}
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": label2id}
    if cfg.name_or_path is not None and cfg.preset is None:
        pretrained = AutoConfig.from_pretrained(cfg.name_or_path)
        if any(a.endswith("ForSequenceClassification") for a in pretrained.architectures or []):
            check_label_order(pretrained.id2label, labels, where=cfg.name_or_path)
            head = {}  # its trained head and label names stay as they are
    return _build(AutoModelForSequenceClassification, cfg, tokenizer, **head)


def check_label_order(id2label: dict[int, str], labels: list[str], where: str = "classifier") -> None:
    """Raise if output i of the classifier is not `labels[i]` (compared case-insensitively)."""
    found = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if [name.lower() for name in found] != [name.lower() for name in labels]:
        raise ValueError(f"{where}: label order {found} does not match the expected {list(labels)}")


# --------------------------------------------------------------------------------------------------
# LoRA and saving


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") or getattr(model, "_hf_peft_config_loaded", False)


# PEFT task type by model class suffix: SEQ_CLS also trains the new classification head.
LORA_TASKS = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS"}


def attach_lora(model: PreTrainedModel, lora: LoraConfig) -> Any:
    """Wrap `model` with a fresh LoRA adapter (`peft.get_peft_model`); only the adapter is trainable."""
    if _is_peft(model):
        # PEFT itself only warns and stacks a second adapter, which silently doubles the update.
        raise ValueError(f"{type(model).__name__} already has a LoRA/PEFT adapter; attach LoRA once")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    name = type(model).__name__
    task = next((t for suffix, t in LORA_TASKS.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        task_type=task,
    )
    with warnings.catch_warnings():
        # peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`: noise on every run, not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_cfg)


def save_model(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save model (safetensors) + tokenizer as a Hugging Face directory, atomically (temp dir, then rename).

    A LoRA model is saved merged into a plain model, so `ModelConfig(name_or_path=path)` reloads it with
    nothing else; merging works on a copy (one extra model in memory) and leaves `model` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_peft(model) and hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
