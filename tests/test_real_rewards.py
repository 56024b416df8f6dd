"""rewards/ on the real pretrained model (SmolLM2-135M-Instruct) and real-format pairs.

Parity: the micro-batched held-out loss and gradient accumulation of rewards/guides.py give the one-forward numbers
(tiny model). Smoke, slow: the committed real/guides.yaml (LoRA guides from the ELIX fixture, a few steps) saves
guides that reload with the base's tokenizer and give finite token-level rewards; real/persona_rm.yaml trains and
evaluates on the PersonalLLM fixture with the real backbone's own, unresized vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.config import ConfigError, ModelConfig, load_config
from alignment.models import load_causal_lm, load_sequence_classifier, load_tokenizer
from alignment.training import collate
from rewards.guides import GuidesConfig, accumulate, check_base, held_out_loss, rows_per_forward, sequence_rewards

REAL = "smollm2-135m-instruct"
FIXTURES = Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n (prompt ids, response ids) of varied lengths over the tiny vocabulary (ids 8..46: words)."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda k: torch.randint(8, 47, (k,), generator=gen).tolist()  # noqa: E731
    return [(draw(2 + i % 3), draw(1 + (3 * i) % 5)) for i in range(n)]


def test_micro_batched_held_out_loss_equals_the_one_forward_loss(tiny_tokenizer, tiny_model_config):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_config, tiny_tokenizer)
    examples = _examples(11)
    with torch.no_grad():
        one = model(**collate(examples, tiny_tokenizer.pad_token_id)).loss.item()
    for rows in (1, 3, 11):
        assert held_out_loss(model, examples, tiny_tokenizer.pad_token_id, rows) == pytest.approx(one, rel=1e-6)


def test_accumulated_micro_batches_give_the_whole_batch_gradient(tiny_tokenizer, tiny_model_config):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_config, tiny_tokenizer)
    examples, pad_id = _examples(7, seed=1), tiny_tokenizer.pad_token_id
    loss_fn = lambda m, b: m(**b).loss  # noqa: E731

    def grads(chunk: int):
        model.zero_grad()
        loss = accumulate(model, [collate(examples[i:i + chunk], pad_id) for i in range(0, 7, chunk)], loss_fn)
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    (whole, reference), (split, accumulated) = grads(7), grads(2)
    assert split == pytest.approx(whole, rel=1e-6)
    for a, b in zip(accumulated, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_rows_per_forward_bounds_the_logits_of_a_49k_vocabulary():
    assert rows_per_forward(0, 160, 400) >= 256  # a world vocabulary: the held-out 256 stay one forward
    rows = rows_per_forward(0, 160, 49152)
    assert rows * 160 * 49152 * 4 <= 2**29 and rows >= 1
    assert rows_per_forward(4, 160, 49152) == 4


def test_real_pairs_need_a_pretrained_policy(in_tmp):
    from rewards.guides import main

    cfg = load_config(GuidesConfig, ["config=real/guides.yaml", "policy=null", f"runs_dir={in_tmp / 'runs'}"])
    with pytest.raises(ConfigError, match="policy"):
        main(cfg)
    assert not (in_tmp / "runs").exists()  # refused before a run directory exists


def cfg_for(path) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def real_guides(tmp_path_factory):
    """real/guides.yaml cut to 1-2 steps of 2 pairs: (run dir, its config)."""
    from rewards.guides import main

    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(GuidesConfig, ["config=real/guides.yaml", f"runs_dir={runs}", "name=real", "batch_size=2",
                                     f"pairs.source={FIXTURES / 'fspo_elix'}",
                                     "micro_batch=2", "max_length=96", "pad.steps=1", "arm.steps=2", "rm.steps=1",
                                     "warmup=1"])
    return main(cfg), cfg


@pytest.mark.slow
def test_lora_guides_on_real_pairs_reload_with_the_base_tokenizer(real_guides, real_lm):
    run_dir, cfg = real_guides
    base, tokenizer = real_lm
    assert cfg.policy == REAL and cfg.lora is not None and cfg.pairs.adapter == "fspo_elix"
    results = json.loads((run_dir / "results.json").read_text())
    for name in ("pad", "arm", "rm"):
        assert (run_dir / name / "config.json").is_file() and results[name]["steps"] == getattr(cfg, name).steps
        assert load_tokenizer(run_dir / name).get_vocab() == tokenizer.get_vocab()
    assert 0.0 <= results["arm"]["held_out_accuracy"] <= 1.0 and results["pad"]["held_out_loss"] > 0
    assert json.loads((run_dir / "drift.json").read_text())["attributes"]  # the layout decoding reads
    check_base(run_dir, tokenizer)  # the base it was trained for passes

    # GenARM's token-level reward log pi_r(y_t | x, y_<t): finite; LoRA moved the attention projections only
    arm = load_causal_lm(cfg_for(run_dir / "arm"), tokenizer)
    assert arm.get_input_embeddings().num_embeddings == 49152  # never resized
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.tensor([ids + tokenizer(" Air scatters blue light.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(arm(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])
    assert torch.isfinite(logps).all()
    layer, ref = arm.model.layers[0], base.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, ref.self_attn.q_proj.weight)
    assert torch.equal(layer.mlp.up_proj.weight, ref.mlp.up_proj.weight)

    rm = load_sequence_classifier(cfg_for(run_dir / "rm"), tokenizer, ["reward"])
    batch = {"input_ids": torch.cat([ids, ids]), "attention_mask": torch.ones(2, ids.shape[1], dtype=torch.long)}
    with torch.no_grad():
        assert torch.isfinite(sequence_rewards(rm, batch)).all()


@pytest.mark.slow
def test_a_base_with_another_vocabulary_is_refused(real_guides, tiny_tokenizer):
    with pytest.raises(ConfigError, match="49152-token vocabulary"):
        check_base(real_guides[0], tiny_tokenizer)


@pytest.mark.slow
def test_persona_rm_real_config_trains_on_personal_llm_with_the_real_vocabulary(in_tmp, real_lm):
    from rewards.persona_rm import PersonaRMConfig, main

    _, tokenizer = real_lm
    cfg = load_config(PersonaRMConfig, ["config=real/persona_rm.yaml", f"runs_dir={in_tmp / 'runs'}",
                                        f"data={FIXTURES / 'personal_llm'}", "steps={population: 2, weights: 2}",
                                        "simulated_users=6", "max_length=64"])
    assert cfg.model.preset == REAL and cfg.model.lora is not None and cfg.lr <= 1e-3
    run_dir = main(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    for method in ("population", "weights"):
        saved = run_dir / method / "model"
        assert json.loads((saved / "config.json").read_text())["vocab_size"] == 49152
        assert load_tokenizer(saved).get_vocab() == tokenizer.get_vocab()
        assert 0.0 <= results["methods"][method]["unseen"]["0"]["micro"]["mean"] <= 1.0


def test_a_fresh_head_under_lora_gets_the_head_scale(real_dir):
    from alignment.config import LoraConfig
    from rewards.persona_rm import HEAD_SCALE, scale_fresh_head

    torch.manual_seed(0)
    model_cfg = ModelConfig(preset=REAL, dtype="float32", device="cpu", lora=LoraConfig())
    model = load_sequence_classifier(model_cfg, load_tokenizer(REAL), ["basis_0", "basis_1"])
    scale_fresh_head(model, model_cfg)
    trained = model.score.modules_to_save["default"].weight  # the copy LoRA trains and saves
    assert trained.std().item() == pytest.approx(HEAD_SCALE / 576**0.5, rel=0.1)
    assert torch.equal(trained, model.score.original_module.weight)
