"""Decoding on a real pretrained chat model, SmolLM2-135M-Instruct (tests/conftest.py `real_lm`, shared, never
mutated): parity of our KV-cached loop with transformers' greedy `generate` on left-padded chat prompts, of a
guide's cache with a full recompute, and of a batch of users with each user alone for every method; self-guided
PAD and zero-shot Drift (the base itself under personas and attribute prompts, no world artifact); the template's
default system prompt kept when a persona is appended; a guide of another vocabulary refused in one line; the
`decoding.generate` entry point on the real model (void world evaluation, cost per token). fp32, CPU, 1 thread.
"""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignment.config import ConfigError
from alignment.models import save_model, stop_ids
from alignment.sampling import default_system
from decoding.drift import load_attribute_prompts
from decoding.guides import Guide, left_pad, load_guide
from decoding.loop import encode_prompts, generate
from decoding.personalization import Guidance, build_rule, context_text, encode_rows, fit_profile_weights, resolve
from tests.conftest import build_tiny_tokenizer

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Give me one tip for sleeping better at night when I am stressed."}],
         [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi!"}],
         [{"role": "user", "content": "Name a fruit."}]]
COOK = [{"role": "user", "content": "What should I cook tonight?"}]
PIRATE = "The user is a pirate and wants every answer written in pirate speak."
PERSONAS = [PIRATE, "The user is a busy lawyer who wants short, formal answers.", "The user is a child of six."]
WEIGHTS = [{"enthusiastic": 1.0, "bullets": 1.0}, {"formal": 1.0}, {"concise": -1.0, "examples": 2.0}]
DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def guidance(real_lm):
    """Every method on the real base without a world artifact: PAD and Drift guided by the base itself, GenARM's
    arm = the base, ARGS's reward = a tiny random classifier on the base's vocabulary (parity, not quality)."""
    model, tok = real_lm
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id, initializer_range=0.2)).eval()
    return Guidance(tok, model, {"arm": model, "rm": rm}, load_attribute_prompts("real/drift_attributes.json"),
                    "base", {"pad": 1.0, "drift": 2.0, "genarm": 1.0, "args": 5.0}, 10, 10, None, pad_guide="base")


def decode(g: Guidance, requests: list[dict], chats: list[list[dict]], n: int = 12) -> list[list[int]]:
    """Greedy tokens of each request (the decode API's path: resolve, encode_rows, one rule for the batch)."""
    resolved = [resolve(r, None, g) for r in requests]
    rows = [encode_rows(g, c, p) for c, p in zip(chats, resolved, strict=True)]
    ids, mask = left_pad([r.base for r in rows], g.tokenizer.pad_token_id)
    rule = build_rule(g, list(zip(resolved, rows, strict=True)))
    new = generate(g.base, ids, mask, rule, max_new_tokens=n, eos_token_id=stop_ids(g.base, g.tokenizer),
                   pad_token_id=g.tokenizer.pad_token_id)
    return new.tolist()


# --- parity ---------------------------------------------------------------------------------------------------------
def test_decode_loop_equals_transformers_greedy_on_left_padded_chat_prompts(real_lm):
    model, tok = real_lm
    ids, mask = encode_prompts(tok, CHATS)
    assert len(set(mask.sum(1).tolist())) == 4  # four prompt lengths: real left padding
    eos = stop_ids(model, tok)
    ours = generate(model, ids, mask, max_new_tokens=32, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32, eos_token_id=eos,
                        pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(ours, hf)
    assert "Paris" in tok.decode(ours[0], skip_special_tokens=True)


def test_guide_cache_equals_a_full_recompute_of_each_row_alone(real_lm):
    model, tok = real_lm
    ids, mask = encode_prompts(tok, CHATS[:3])
    guide, steps = Guide(model, ids, mask), torch.tensor([[504, 28, 1115], [330, 2, 0], [17, 905, 42]])
    for t in range(steps.shape[1]):
        guide.advance(steps[:, t])
    for b in range(3):
        full = torch.cat([ids[b][mask[b].bool()], steps[b]])[None]
        with torch.inference_mode():
            ref = model(input_ids=full).logits[0, -1].float()
        torch.testing.assert_close(guide.logits[b], ref, atol=2e-3, rtol=1e-4)


def request(method: str, i: int) -> dict:
    if method == "drift":
        return {"method": "drift", "attribute_weights": WEIGHTS[i]}
    return {"method": method, "persona": PERSONAS[i]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "pad", "drift", "genarm", "args"])
def test_users_with_different_personas_batched_get_the_tokens_they_get_alone(guidance, method):
    requests, chats = [request(method, i) for i in range(3)], [COOK, CHATS[1], CHATS[3]]
    batched = decode(guidance, requests, chats)
    alone = [decode(guidance, [r], [c])[0] for r, c in zip(requests, chats, strict=True)]
    for b in range(3):
        n = len(alone[b])  # a row alone stops when it ends; batched, pad follows its EOS
        assert batched[b][:n] == alone[b], (method, b)
    assert len({tuple(a) for a in alone}) == 3  # the personas do steer


# --- self-guided PAD, zero-shot Drift, the default system prompt ----------------------------------------------------
def test_self_guided_pad_reads_the_persona_in_its_guide_only_and_differs_from_prompting(guidance):
    pad, prompt, none = (resolve({"method": m, "persona": PIRATE}, None, guidance) for m in ("pad", "prompt", "none"))
    pad_rows = encode_rows(guidance, COOK, pad)
    assert pad_rows.base == encode_rows(guidance, COOK, none).base  # the base reads no persona ...
    assert pad_rows.contexts == [encode_rows(guidance, COOK, prompt).base]  # ... its guide reads what prompting reads
    out = decode(guidance, [{"method": "none"}, {"method": "prompt", "persona": PIRATE},
                            {"method": "pad", "persona": PIRATE, "strength": 1.0}], [COOK] * 3, n=24)
    assert out[2] != out[1] and out[2] != out[0]  # w = 1 is not prompting: the support is the plain base's top-k


def test_prompt_method_appends_the_persona_to_the_templates_default_system_prompt(real_lm):
    tok = real_lm[1]
    assert default_system(tok) == DEFAULT
    text = context_text(tok, COOK, PIRATE)
    assert f"<|im_start|>system\n{DEFAULT} {PIRATE}<|im_end|>" in text and text.count("<|im_start|>system") == 1
    own = context_text(tok, CHATS[2], PIRATE)  # a chat with its own system turn keeps it, without the default
    assert "You are a pirate. " + PIRATE in own and DEFAULT not in own
    assert context_text(tok, COOK, "") == tok.apply_chat_template(COOK, add_generation_prompt=True, tokenize=False)
    assert default_system(build_tiny_tokenizer()) is None  # the world's template writes no system turn of its own


@pytest.mark.slow
def test_zero_shot_drift_fits_a_positive_bullets_weight_from_pairs_that_prefer_bullet_lists(guidance):
    pairs = [{"prompt": q, "chosen": "\n".join(f"- {s}." for s in steps), "rejected": ", ".join(steps) + "."}
             for q, steps in [("How do I make tea?", ["Boil water", "Add the tea bag", "Wait three minutes"]),
                              ("What helps me focus?", ["Turn off your phone", "Take short breaks", "Drink water"])]]
    weights = fit_profile_weights(guidance, pairs)
    assert list(weights) == guidance.attributes and weights["bullets"] > 0.2


# --- refusals and the entry point -----------------------------------------------------------------------------------
def test_a_guide_with_another_vocabulary_is_refused_in_one_line(tmp_path, real_lm):
    world_tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    world_guide = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(world_tok), hidden_size=16,
                                                             intermediate_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, num_labels=1))
    save_model(world_guide, world_tok, tmp_path / "rm")
    with pytest.raises(ConfigError) as refused:
        load_guide(tmp_path / "rm", real_lm[1], reward=True)
    assert "\n" not in str(refused.value) and "not the base's" in str(refused.value)


@pytest.mark.slow
def test_decode_entry_on_the_real_model_runs_what_is_not_world_bound_and_says_the_rest_is(tmp_path, caplog):
    from decoding.generate import DecodeConfig, DriftSettings, PADSettings, main
    from tests.test_decoding_entry import SMALL

    cfg = DecodeConfig(method="pad", arms=["drift", "genarm"], policy="smollm2-135m-instruct", world=SMALL,
                       runs_dir=str(tmp_path), users=2, prompts_per_user=1, max_new_tokens=8, batch_size=2,
                       temperature=0.7, top_p=0.9, pad=PADSettings(guide="base", base_prompt="plain"),
                       drift=DriftSettings(guide="base", prompts="real/drift_attributes.json", pairs=3,
                                           pair_counts=[3]))
    with caplog.at_level("WARNING"):
        run = main(cfg)
    (line,) = [r.message for r in caplog.records if "world-bound" in r.message]
    assert "void" in line and "genarm (needs world guides)" in line
    results = json.loads((run / "results.json").read_text())
    assert results["table"] is None and results["void"].startswith("void:")
    assert set(results["cost"]) == {"base", "prompting", "pad", "drift"} and results["cost"]["base"]["vs_base"] == 1
    assert set(results["drift"]["mean_weights"]) == set(load_attribute_prompts("real/drift_attributes.json")
                                                        ["attributes"])
    assert "void:" in (run / "results.md").read_text() and "0.500" not in (run / "results.md").read_text()
    assert not list(tmp_path.glob("cache/guides-*"))  # no world guides (nor their SFT policy) were built
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["pad"]["text"] and sample["pad"]["reward"] is None
    with pytest.raises(ConfigError):
        main(DecodeConfig(method="pad", pad=PADSettings(guide="base"), policy="smollm2-135m-instruct"))
