"""alignment.models: devices/dtypes, pad tokens, presets, bit-exact save/reload, LoRA once, label order."""

import os

import pytest
import torch

from alignment.config import ConfigError, LoraConfig, ModelConfig
from alignment.models import (
    attach_lora,
    load_causal_lm,
    load_encoder,
    load_sequence_classifier,
    load_tokenizer,
    pick_device,
    pick_dtype,
    save_model,
)
from tests.conftest import build_tiny_tokenizer

NLI = ["entailment", "neutral", "contradiction"]


@pytest.fixture
def ids(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "where do you live ?"}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tiny_tokenizer(text)["input_ids"]])


def test_pick_device_and_dtype():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") == torch.float32  # bf16 only on a CUDA device that supports it
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16 and pick_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="model.dtype: expected one of auto, float32"):
        pick_dtype("fp8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")


def test_tokenizer_without_pad_pads_with_a_spare_special_token(tmp_path, caplog):
    build_tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="alignment.models"):
        tokenizer = load_tokenizer(tmp_path)
    # <pad> is in the vocabulary but not a special token here; unk is, and no text contains it. Nothing is added.
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 3 and len(tokenizer) == 47
    assert "padding with '<unk>'" in caplog.text


def test_tokenizer_with_no_spare_token_pads_with_eos(tmp_path):
    tokenizer = build_tiny_tokenizer(pad=False)
    tokenizer.unk_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token_id == reloaded.eos_token_id == 2 and len(reloaded) == 47  # masks come from lengths


def test_tokenizer_padding_with_eos_is_replaced(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == "<pad>" and reloaded.pad_token_id == 0  # the existing <pad> id, no new token


def test_preset_matches_config_and_tokenizer(tiny_tokenizer, tiny_model_config, ids):
    model = load_causal_lm(tiny_model_config, tiny_tokenizer)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (32, 2, 4, 64)
    assert c.vocab_size == len(tiny_tokenizer) == 47
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert model(ids).logits.shape == (1, ids.shape[1], 47)


def test_exactly_one_source_and_known_preset(tiny_tokenizer, tiny_model_config):
    with pytest.raises(ConfigError, match=r"exactly one of model.name_or_path and model.preset \(got neither\)"):
        load_causal_lm(ModelConfig(), tiny_tokenizer)
    tiny_model_config.name_or_path = "gpt2"
    with pytest.raises(ConfigError, match=r"\(got both\)"):
        load_causal_lm(tiny_model_config, tiny_tokenizer)
    with pytest.raises(ConfigError, match="unknown preset 'lama'.*did you mean 'llama'"):
        load_causal_lm(ModelConfig(preset="lama"), tiny_tokenizer)


def test_saved_model_reloads_bit_exact_in_fp32(tmp_path, tiny_tokenizer, tiny_model_config, ids):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_config, tiny_tokenizer)
    path = save_model(model, tiny_tokenizer, tmp_path / "policy")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(path))
    assert [p for p in os.listdir(tmp_path) if p != "policy"] == []  # no temp directory left
    reloaded = load_causal_lm(ModelConfig(name_or_path=str(path)), load_tokenizer(path))
    assert reloaded.dtype == torch.float32 and not reloaded.training
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_save_model_replaces_an_older_save(tmp_path, tiny_tokenizer, tiny_model_config, ids):
    torch.manual_seed(0)
    first = load_causal_lm(tiny_model_config, tiny_tokenizer)
    save_model(first, tiny_tokenizer, tmp_path / "policy")
    torch.manual_seed(1)
    second = load_causal_lm(tiny_model_config, tiny_tokenizer)
    save_model(second, tiny_tokenizer, tmp_path / "policy")
    reloaded = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "policy")), tiny_tokenizer)
    assert torch.equal(second(ids).logits, reloaded(ids).logits) and os.listdir(tmp_path) == ["policy"]


def test_lora_attaches_once(tiny_tokenizer, tiny_model_config):
    tiny_model_config.lora = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    model = load_causal_lm(tiny_model_config, tiny_tokenizer)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # 2 layers x (q, v) x (A, B) adapter matrices, nothing else.
    assert len(trainable) == 8 and all("lora_" in name for name in trainable)
    with pytest.raises(ValueError, match="already has a LoRA/PEFT adapter; attach LoRA once"):
        attach_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="attach LoRA once"):
        attach_lora(model.get_base_model(), LoraConfig())  # the wrapped model is marked too


def test_lora_model_saves_merged_and_reloads(tmp_path, tiny_tokenizer, tiny_model_config, ids):
    tiny_model_config.lora = LoraConfig(r=2)
    model = load_causal_lm(tiny_model_config, tiny_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)  # lora_B starts at zero: make the adapter matter
    path = save_model(model, tiny_tokenizer, tmp_path / "merged")
    reloaded = load_causal_lm(ModelConfig(name_or_path=str(path)), tiny_tokenizer)
    assert not hasattr(reloaded, "peft_config") and hasattr(model, "peft_config")  # the live model is untouched
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_preset_classifier_has_labels_and_pad(tiny_tokenizer, tiny_model_config, ids):
    model = load_sequence_classifier(tiny_model_config, tiny_tokenizer, NLI)
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert model.config.label2id["contradiction"] == 2 and model.config.pad_token_id == 0
    assert model(ids).logits.shape == (1, 3)
    with pytest.raises(ConfigError, match="preset classifier needs its label names"):
        load_sequence_classifier(tiny_model_config, tiny_tokenizer, None)


def test_pretrained_classifier_label_order_is_checked(tmp_path, tiny_tokenizer, tiny_model_config):
    save_model(load_sequence_classifier(tiny_model_config, tiny_tokenizer, NLI), tiny_tokenizer, tmp_path / "nli")
    cfg = ModelConfig(name_or_path=str(tmp_path / "nli"))
    assert load_sequence_classifier(cfg, tiny_tokenizer, ["Entailment", "NEUTRAL", "contradiction"]) is not None
    expected = (
        "label order ['entailment', 'neutral', 'contradiction'] does not match the expected "
        "['contradiction', 'neutral', 'entailment']"
    )
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_sequence_classifier(cfg, tiny_tokenizer, list(reversed(NLI)))
    assert load_sequence_classifier(cfg, tiny_tokenizer, None).config.id2label[0] == "entailment"  # unchecked


def test_causal_checkpoint_gets_a_new_head_for_labels(tmp_path, tiny_tokenizer, tiny_model_config):
    save_model(load_causal_lm(tiny_model_config, tiny_tokenizer), tiny_tokenizer, tmp_path / "lm")
    model = load_sequence_classifier(ModelConfig(name_or_path=str(tmp_path / "lm")), tiny_tokenizer, ["no", "yes"])
    assert model.config.id2label == {0: "no", 1: "yes"} and model.score.out_features == 2


def test_classifier_lora_trains_the_head(tiny_tokenizer, tiny_model_config):
    tiny_model_config.lora = LoraConfig(r=2)
    model = load_sequence_classifier(tiny_model_config, tiny_tokenizer, ["reward"])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable) and any("lora_" in name for name in trainable)


def test_encoder_preset_returns_hidden_states(tiny_tokenizer, tiny_model_config, ids):
    out = load_encoder(tiny_model_config, tiny_tokenizer)(ids)
    assert out.last_hidden_state.shape == (1, ids.shape[1], 32)


def test_tokenizer_growth_resizes_pretrained_embeddings(tmp_path, tiny_tokenizer, tiny_model_config):
    save_model(load_causal_lm(tiny_model_config, tiny_tokenizer), tiny_tokenizer, tmp_path / "lm")
    grown = build_tiny_tokenizer()
    grown.add_tokens(["lisbon"])
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "lm")), grown)
    assert len(grown) == 48 and model.get_input_embeddings().num_embeddings == 48


def test_new_classifier_head_prints_no_load_report(tmp_path, tiny_tokenizer, tiny_model_config, capfd, caplog):
    """A causal LM checkpoint under a new classification head misses its head and leaves lm_head unused by design;
    transformers' LOAD REPORT table of both reads as an error to a newcomer, so one log line replaces it."""
    from transformers.utils import logging as hf_logging

    save_model(load_causal_lm(tiny_model_config, tiny_tokenizer), tiny_tokenizer, tmp_path / "lm")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        with caplog.at_level("INFO", logger="alignment.models"):
            model = load_sequence_classifier(ModelConfig(name_or_path=str(tmp_path / "lm"), device="cpu"),
                                             tiny_tokenizer, NLI)
    finally:
        hf_logging.set_verbosity(level)
    out = capfd.readouterr()
    assert "LOAD REPORT" not in out.err + out.out and "not sharded" not in out.err + out.out
    assert "with a new 3-output head (score.weight)" in caplog.text and model.config.num_labels == 3
