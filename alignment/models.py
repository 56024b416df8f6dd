"""Model and tokenizer loading from a `ModelConfig`: any Hugging Face model, or a tiny preset.

    tokenizer = load_tokenizer("runs/cache/world-1a2b3c4d5e6f/tokenizer")
    policy = load_causal_lm(cfg.model, tokenizer)              # eval mode; call .train() to train
    nli = load_sequence_classifier(cfg.nli, tokenizer, ["entailment", "neutral", "contradiction"])
    save_model(policy, tokenizer, run.path("model"))           # reload: ModelConfig(name_or_path=<that dir>)

`ModelConfig.name_or_path` loads a pretrained model (local directory or hub id) with
`from_pretrained(..., dtype=...)`; `ModelConfig.preset` builds a random-weight architecture from the
config's size fields and the tokenizer's vocabulary (seed torch first for reproducible weights).
Exactly one of the two is set. Every loader returns the model on its device and dtype, in eval mode.

`name_or_path` (and `preset`) may also name a pretrained model that a package ships, e.g.
`smollm2-135m-instruct` (alignment/model_sources.py), and a LoRA adapter directory (an SFT or DPO checkpoint of a
LoRA run), which loads as its base with the adapter merged.

A pretrained vocabulary is never resized. Pad is the tokenizer's own when it is no stop token; else an existing
special token that is neither a stop token nor bos (one named like a pad token first, then unk); else eos, with
every mask taken from `attention_mask` (a reward model that reads "the last non-pad position" would misread a row
ending in eos, research/ecosystem.md §9 item 6, so the spare token comes first). Only a tokenizer with no pad and
no eos gains a `<pad>` token (and its model's embedding a row).
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
from alignment.files import atomic_replace_dir
from alignment.model_sources import SOURCES, is_source, model_path

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
    """`AutoTokenizer.from_pretrained` (a packaged source's directory for its name), with a pad token that ends
    nothing (see the module docstring); the vocabulary is never grown for a pretrained tokenizer."""
    path = model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stops = set(stop_ids(_generation_config(path), tokenizer))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops:
        return tokenizer
    before = tokenizer.pad_token
    spare = _spare_special_token(tokenizer, stops)
    if spare is not None:
        tokenizer.pad_token = spare
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # every mask comes from attention_mask, never from pad ids
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    log.info("tokenizer %s: pad token was %r; padding with %r (id %d)", name_or_path, before,
             tokenizer.pad_token, tokenizer.pad_token_id)
    return tokenizer


def _generation_config(path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _spare_special_token(tokenizer: Any, stops: set[int]) -> str | None:
    """An existing special token that no text contains and that ends nothing: pad-like names first, then unk."""
    taken = stops | {tokenizer.bos_token_id}
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    candidates = [t for t in special if "pad" in t.lower()] + ([tokenizer.unk_token] if tokenizer.unk_token else [])
    return next((t for t in candidates if tokenizer.convert_tokens_to_ids(t) not in taken), None)


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token to the same id: a guide, a discriminator or a reference model must
    share the policy's vocabulary, or its token ids (and logits) mean other tokens."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def stop_ids(model_or_config: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a row: the generation config's EOS id(s) and the tokenizer's EOS.

    `model_or_config`: a model (its `generation_config`), a `GenerationConfig`, or None. Chat models often stop on
    several ids (Llama 3: <|eot_id|> and <|end_of_text|>); the tokenizer's single `eos_token_id` misses the others.
    """
    config = getattr(model_or_config, "generation_config", model_or_config)
    eos = getattr(config, "eos_token_id", None)
    ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    return sorted(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


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
        close = difflib.get_close_matches(cfg.preset, [*PRESETS, *SOURCES], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        known = ", ".join([*PRESETS, *SOURCES])
        raise ConfigError(f"model.preset: unknown preset {cfg.preset!r} (known: {known}){hint}")
    return PRESETS[cfg.preset](cfg, tokenizer, **head)


def _check_source(cfg: ModelConfig) -> None:
    if (cfg.name_or_path is None) == (cfg.preset is None):
        got = "both" if cfg.preset is not None else "neither"
        raise ConfigError(f"model: set exactly one of model.name_or_path and model.preset (got {got})")


def pretrained_path(cfg: ModelConfig) -> str | None:
    """The directory or hub id to load weights (and the tokenizer) from: a packaged source's cached directory for
    its name; None for a preset built from config (whose tokenizer is the world's)."""
    name = cfg.preset if is_source(cfg.preset) else cfg.name_or_path
    return None if name is None else model_path(name)


def _build(auto_cls: Any, cfg: ModelConfig, tokenizer: Any, **head: Any) -> PreTrainedModel:
    """Pretrained or preset model of the `auto_cls` family, fitted to the tokenizer, on device/dtype, eval mode."""
    _check_source(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    path = pretrained_path(cfg)
    if path is None:
        model = auto_cls.from_config(_preset_config(cfg, tokenizer, **head)).to(dtype=dtype)
    elif (Path(path) / "adapter_config.json").is_file():
        model = _merged_adapter(auto_cls, path, dtype, **head)
    elif head:
        model = _with_new_head(auto_cls, path, dtype, **head)
    else:
        # dtype is always explicit: v5 otherwise loads the dtype stored in config.json (ecosystem.md §2.2).
        # No later .to(dtype): it would also cast the modules a model keeps in fp32 on purpose.
        model = auto_cls.from_pretrained(path, dtype=dtype, **head)
    _fit_to_tokenizer(model, tokenizer)
    model = model.to(device)
    if cfg.lora is not None:
        model = attach_lora(model, cfg.lora)
    return model.eval()


def _with_new_head(auto_cls: Any, path: str, dtype: torch.dtype, **head: Any) -> PreTrainedModel:
    """A classifier with a new head on a checkpoint without one (a causal LM): its head is missing and its lm_head
    unused by design, so transformers' LOAD REPORT table of both (which a newcomer reads as an error) is replaced
    by one log line; any other missing or unexpected key is still a warning that names it."""
    modeling_log = logging.getLogger("transformers.modeling_utils")
    no_report = lambda record: "LOAD REPORT" not in record.getMessage()  # a filter, not a level: transformers
    modeling_log.addFilter(no_report)  # checks its logger's level to decide other warnings
    try:
        model, info = auto_cls.from_pretrained(path, dtype=dtype, output_loading_info=True, **head)
    finally:
        modeling_log.removeFilter(no_report)
    prefix = f"{model.base_model_prefix}."
    missing = [k for k in info["missing_keys"] if k.startswith(prefix)]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("lm_head.")]
    if missing or unexpected or info.get("mismatched_keys"):
        log.warning("%s: weights that do not fit %s: missing %s, unexpected %s, mismatched %s", path,
                    type(model).__name__, missing[:5], unexpected[:5], info.get("mismatched_keys", [])[:5])
    log.info("%s: %s with a new %d-output head (%s), the checkpoint's lm_head unused", path, type(model).__name__,
             model.config.num_labels, ", ".join(k for k in info["missing_keys"] if not k.startswith(prefix)))
    return model


def _merged_adapter(auto_cls: Any, path: str, dtype: torch.dtype, **head: Any) -> PreTrainedModel:
    """A LoRA checkpoint (adapter_config.json + adapter weights) as a plain model: its base with the adapter merged,
    so a later stage can attach an adapter of its own (DPO after a LoRA SFT)."""
    import json

    from peft import PeftModel

    base_name = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = auto_cls.from_pretrained(model_path(base_name), dtype=dtype, **head)
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: Any) -> None:
    """Grow the embedding when the tokenizer gained tokens (a tokenizer without pad or eos), and use its pad id.

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
    if pretrained_path(cfg) is not None:
        pretrained = AutoConfig.from_pretrained(pretrained_path(cfg))
        if any(a.endswith("ForSequenceClassification") for a in pretrained.architectures or []):
            check_label_order(pretrained.id2label, labels, where=pretrained_path(cfg))
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
