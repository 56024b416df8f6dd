"""FSPO (alignment/fspo.py, alignment/fspo_eval.py): the shared-prompt log-probs against a full recompute, batches,
user splits, on-policy targets, reference log-probs computed once, exact resume, the entry point on the world and
on the FSPO Roleplay/ELIX/Review fixtures through the adapters, and the held-out-user evaluation."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.adapters import split_counts
from alignment.config import AdapterData, ModelConfig
from alignment.fspo import (
    FSPOConfig,
    bucketed_order,
    collate,
    other_description,
    shared_prompt_logps,
    token_counts,
)
from alignment.fspo_eval import EvalSettings, attribute_space, posterior_mean, true_reward_fn, win_rates
from alignment.records import Episode, PreferencePair
from alignment.shots import Encoded
from alignment.world import WorldSpec

FIXTURES = Path(__file__).parent / "fixtures"
SPEC = WorldSpec(seed=3, characters=9, min_statements=8, max_statements=14, users=[8, 3, 4], train_pairs=6,
                 context_pairs=5, target_pairs=3, dialogues=60)
TINY = dict(preset="llama", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dtype="float32",
            device="cpu")


def tiny_policy(tokenizer, path: Path, max_positions: int = 512) -> Path:
    """A random tiny Llama saved with `tokenizer` as an HF directory (a starting policy without SFT)."""
    from alignment.models import load_causal_lm, save_model

    torch.manual_seed(0)
    return save_model(load_causal_lm(ModelConfig(**TINY, max_positions=max_positions), tokenizer), tokenizer, path)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    from alignment.world import build_world

    path = tmp_path_factory.mktemp("world")
    build_world(SPEC, path)
    return path


@pytest.fixture(scope="module")
def world_policy(world_dir, tmp_path_factory):
    from alignment.models import load_tokenizer

    return tiny_policy(load_tokenizer(world_dir / "tokenizer"), tmp_path_factory.mktemp("policy") / "model")


def world_cfg(world_dir, policy, tmp_path, **kw) -> FSPOConfig:
    defaults = dict(world=SPEC, world_dir=str(world_dir), policy=str(policy), runs_dir=str(tmp_path / "runs"),
                    k_min=0, k_max=3, episodes_per_user=4, targets_per_shots=2, epochs=2, batch_size=4,
                    max_length=384, log_every=1,
                    checkpoint_every=2, evaluate=False, lr=1e-3)
    return FSPOConfig(**{**defaults, **kw})


# --- shared prompt forward: parity with the concatenated recompute ------------------------------------------------
def encoded_pairs(tok):
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id]
    shots = "<|user|> where do you live ? like lyon dislike paris <|end|> "  # a shared few-shot prefix
    rows = [(shots + "<|user|> where do you live ? <|end|> <|assistant|>", "i live in lyon .", "paris"),
            (shots + "<|system|> i like tea <|end|> <|user|> what is your job ? <|end|> <|assistant|>",
             "i work as a baker and i like coffee .", "nurse ."),
            ("<|user|> hey <|end|> <|assistant|>", "hello", "good day , i like dogs and cats .")]
    return rows, [Encoded("u", ids(p), ids(c) + eos, ids(r) + eos, 0, False) for p, c, r in rows]


@pytest.mark.parametrize(("average", "grouping"), [(False, [[0], [1], [2]]), (True, [[0, 1], [2]])])
def test_shared_prompt_logps_equal_the_concatenated_forward_values_and_gradients(tiny_tokenizer, tiny_model_config,
                                                                                average, grouping):
    """One prompt forward per pair, or per group of pairs sharing a prefix, = TRL-layout full recompute."""
    from alignment.logps import build_pair_batch, pair_logps
    from alignment.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_config, tiny_tokenizer).train()
    rows, encoded = encoded_pairs(tiny_tokenizer)
    reference = build_pair_batch(tiny_tokenizer, *map(list, zip(*rows, strict=True)), max_length=64)
    c1, r1 = pair_logps(model, reference, average=average)
    (c1.sum() - 2 * r1.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    batch = collate([[encoded[i] for i in group] for group in grouping], tiny_tokenizer.pad_token_id)
    c2, r2 = shared_prompt_logps(model, batch)
    if average:
        counts = token_counts(batch)
        c2, r2 = c2 / counts[:, 0], r2 / counts[:, 1]
    (c2.sum() - 2 * r2.sum()).backward()
    torch.testing.assert_close(c2, c1, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r2, r1, atol=1e-4, rtol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


def test_collate_shares_each_groups_prefix_and_interleaves_chosen_and_rejected():
    a = Encoded("u", [5, 6, 7, 1], [8, 2], [9, 9, 2], 0, False)
    b = Encoded("u", [5, 6, 4], [3, 2], [2], 0, False)
    c = Encoded("v", [5], [3, 2], [4, 2], 0, False)
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch["prefix_ids"].tolist() == [[5, 6], [0, 0]]  # common prefix [5, 6]; c keeps its only token
    assert batch["prefix_mask"].tolist() == [[1, 1], [0, 0]]
    assert batch["row_group"].tolist() == [0, 0, 0, 0, 1, 1]
    assert batch["row_ids"].tolist() == [[7, 1, 8, 2, 0], [7, 1, 9, 9, 2], [4, 3, 2, 0, 0], [4, 2, 0, 0, 0],
                                         [5, 3, 2, 0, 0], [5, 4, 2, 0, 0]]
    assert batch["score_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0],
                                            [0, 1, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert batch["row_mask"].sum(-1).tolist() == [4, 5, 3, 2, 3, 3]
    assert token_counts(batch).tolist() == [[2, 3], [2, 1], [2, 2]]


def test_bucketed_order_is_a_seeded_partition_of_similar_lengths():
    lengths = list(np.random.default_rng(0).integers(10, 600, size=203))
    plan = bucketed_order(lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(i for b in plan for i in b) == list(range(203))
    assert plan == bucketed_order(lengths, 8, torch.Generator().manual_seed(1))
    assert plan != bucketed_order(lengths, 8, torch.Generator().manual_seed(2))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan])
    assert spread < 150  # random batches of 8 from U[10, 600) spread ~460 tokens


# --- users, targets, descriptions -------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "shares", "expected"), [
    (10, [0.8, 0.1, 0.1], [8, 1, 1]),
    (2, [0.8, 0.1, 0.1], [1, 1, 0]),  # too few users for a test split: the first non-zero shares come first
    (3, [0.8, 0.1, 0.1], [1, 1, 1]),
    (7, [1, 0, 1], [4, 0, 3]),
])
def test_user_split_counts(n, shares, expected):
    assert split_counts(n, shares) == expected


def test_on_policy_targets_are_the_best_and_worst_sample_by_the_users_reward(monkeypatch, tiny_tokenizer):
    import alignment.sampling
    from alignment.fspo import on_policy_targets

    samples = [["a", "bb", "ccc"], ["x", "y", "z"]]
    monkeypatch.setattr(alignment.sampling, "sample_responses", lambda *a, **kw: samples)
    target = PreferencePair(user_id="u", prompt=[{"role": "user", "content": "hey"}], chosen="c", rejected="r",
                            prompt_id="p")
    episodes = [Episode(user_id="u", shots=[], target=target), Episode(user_id="u", shots=[], target=target)]
    reward = lambda user, prompt_id, text: 0.0 if text in "xyz" else float(len(text) % 3)  # a:1 bb:2 ccc:0
    cfg = FSPOConfig(samples=3, max_length=64, max_new_tokens=8)
    kept, dropped = on_policy_targets(cfg, episodes, None, tiny_tokenizer, reward)
    assert dropped == 1  # the second episode's samples all tie
    assert (kept[0].target.chosen, kept[0].target.rejected) == ("bb", "ccc")
    assert (kept[0].target.chosen_reward, kept[0].target.rejected_reward) == (2.0, 0.0)


def test_persona_targets_are_sampled_with_the_users_persona_and_keep_the_shots(monkeypatch, tiny_tokenizer):
    import alignment.sampling
    from alignment.fspo import on_policy_targets

    seen = []

    def fake_sample(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        return [["a", "bb"] for _ in prompts]

    monkeypatch.setattr(alignment.sampling, "sample_responses", fake_sample)
    system = {"role": "system", "content": "i am ann ."}
    shot = PreferencePair(user_id="u", prompt=[{"role": "user", "content": "yo"}], chosen="s+", rejected="s-")
    target = PreferencePair(user_id="u", prompt=[system, {"role": "user", "content": "hey"}], chosen="c",
                            rejected="r", prompt_id="p")
    episodes = [Episode(user_id="u", shots=[shot] * 40, target=target)]  # far over max_length: nothing is dropped
    cfg = FSPOConfig(samples=2, max_length=64, max_new_tokens=8, targets="persona")
    kept, dropped = on_policy_targets(cfg, episodes, None, tiny_tokenizer, lambda u, p, text: float(len(text)),
                                      persona={"u": "the user likes jokes ."})
    assert seen == [[{"role": "system", "content": "i am ann . the user likes jokes ."},
                     {"role": "user", "content": "hey"}]]
    assert dropped == 0 and len(kept[0].shots) == 40
    assert (kept[0].target.chosen, kept[0].target.rejected) == ("bb", "a")


def test_rejected_description_is_another_users_and_stable():
    persona = {"u1": "the user likes jokes .", "u2": "the user likes jokes .", "u3": "the user dislikes jokes ."}
    target = PreferencePair(user_id="u1", prompt=[{"role": "user", "content": "hey"}], chosen="c", rejected="r")
    episode = Episode(user_id="u1", shots=[], target=target)
    assert other_description(persona, episode, 0) == "the user dislikes jokes ."  # never the same text
    assert other_description(persona, episode, 0) == other_description(persona, episode, 0)


def test_win_rates_count_ties_half():
    assert win_rates(np.array([1.0, 0.0, -1.0, -10.0]), np.array([0.0, 0.0, 0.0, -10.0])).tolist() == \
        [1.0, 0.5, 0.0, 0.5]


def test_attribute_space_holds_every_style_a_world_response_can_take():
    from alignment import language as lang
    from alignment.people import sample_style

    space = {tuple(a) for a in attribute_space()}
    rng = np.random.default_rng(0)
    assert all(tuple(lang.attribute_vector(sample_style(rng, p))) in space for p in rng.random(500))
    assert len(space) == 4 * 5 * 2 ** 5  # length 0..3, formality -1..1 in halves, five on/off attributes


def test_posterior_mean_reads_the_shots_toward_the_user_who_labelled_them():
    """Two kinds of users with opposite tastes in the prior: shots labelled by one pull E[w | shots] to it."""
    rng = np.random.default_rng(0)
    w = np.array([1.0, -1.0, 0.5, 0.0, 2.0, -0.5, 1.0])
    prior = np.concatenate([w + 0.1 * rng.standard_normal((500, 7)), -w + 0.1 * rng.standard_normal((500, 7))])
    assert np.abs(posterior_mean(prior, np.zeros((0, 7)), 4.0)).max() < 0.1  # no shots: the prior's mean
    diffs = rng.uniform(-1, 1, (6, 7))
    diffs *= np.sign(diffs @ w)[:, None]  # every shot's chosen is the one w prefers
    assert np.allclose(posterior_mean(prior, diffs, 4.0), w, atol=0.1)
    assert np.allclose(posterior_mean(prior, -diffs, 4.0), -w, atol=0.1)  # flipped labels: the other user
    # labels that a shared reward term (quality) explains by a wide margin say nothing about w
    assert np.abs(posterior_mean(prior, -diffs, 4.0, offsets=np.full(6, 20.0))).max() < 0.1


def test_true_reward_fn_reproduces_the_worlds_labels(world_dir):
    from alignment.world import load_world

    world = load_world(world_dir)
    reward = true_reward_fn(world)
    for p in world["pairs"][:50]:
        assert reward(p["user_id"], p["prompt_id"], p["chosen"]) == pytest.approx(p["chosen_reward"])
        assert reward(p["user_id"], p["prompt_id"], p["rejected"]) == pytest.approx(p["rejected_reward"])
    assert reward(p["user_id"], p["prompt_id"], "lyon lyon") == -10.0


# --- the entry point --------------------------------------------------------------------------------------------
def test_training_uses_train_users_caches_reference_once_and_updates_every_parameter(world_dir, world_policy,
                                                                                     tmp_path, monkeypatch):
    import alignment.fspo as fspo
    from alignment.records import read_jsonl
    from alignment.training import final_model
    from alignment.world import load_world

    calls = []
    original = fspo.reference_logps
    monkeypatch.setattr(fspo, "reference_logps", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    run = fspo.main(world_cfg(world_dir, world_policy, tmp_path))
    users = {u["user_id"]: u["split"] for u in load_world(world_dir)["users"]}
    episodes = read_jsonl(run / "episodes.jsonl", Episode)
    assert {users[e.user_id] for e in episodes} == {"train"}
    assert all(s.split == "train_context" for e in episodes for s in [*e.shots, e.target])
    ks = [len(e.shots) for e in episodes]
    assert max(ks) <= 3 and len(set(ks)) > 1
    assert len({id(e) for e in episodes}) == len(episodes) == 8 * 4
    # one reference pass for training (+ a policy and a reference pass per held-out split), not one per step
    steps = json.loads((run / "results.json").read_text())["steps"]
    assert steps >= 4 and len(calls) == 1 + 2 * 2
    meta = json.loads((run / "meta.json").read_text())
    assert meta["data"]["budget"]["examples_dropped"] == 0
    before = fspo.load_policy(world_policy, 384)[1].state_dict()
    after = fspo.load_policy(final_model(run), 384)[1].state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "a parameter did not move"
    held_out = json.loads((run / "results.json").read_text())["held_out"]
    assert held_out["val"]["pairs"] == 3 * 2 and held_out["test"]["pairs"] == 4 * 2


def test_resume_replays_the_uninterrupted_run(world_dir, world_policy, tmp_path):
    import shutil

    import alignment.fspo as fspo
    from alignment.training import final_model

    cfg = world_cfg(world_dir, world_policy, tmp_path, name="full")
    full = fspo.main(cfg)
    # simulate a crash after the second-to-last checkpoint: keep it, point `latest` at it, resume
    crashed = full.parent / "crashed"
    shutil.copytree(full, crashed)
    checkpoints = sorted((crashed / "ckpt").glob("step_*"))
    shutil.rmtree(checkpoints[-1])
    (crashed / "ckpt" / "latest").write_text(checkpoints[-2].name + "\n")
    (crashed / "DONE").unlink()
    ref_mtime = (crashed / "ref_logps.safetensors").stat().st_mtime_ns
    fspo.main(dataclasses.replace(cfg, name="crashed", resume=True))
    a = fspo.load_policy(final_model(full), 384)[1].state_dict()
    b = fspo.load_policy(final_model(crashed), 384)[1].state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    assert (crashed / "ref_logps.safetensors").stat().st_mtime_ns == ref_mtime  # read back, not recomputed


def test_pref_ft_stage_lowers_the_nll_of_chosen_and_becomes_the_reference(world_dir, world_policy, tmp_path):
    import alignment.fspo as fspo

    run = fspo.main(world_cfg(world_dir, world_policy, tmp_path, sft_epochs=3, epochs=1, sft_lr=1e-2))
    nll = [m["pref_ft/nll"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if "pref_ft/nll" in m]
    assert len(nll) >= 6 and np.mean(nll[-3:]) < np.mean(nll[:3]) - 0.5  # a random model starts at ~log(V) = 5.9
    first_stage2 = json.loads((run / "metrics.jsonl").read_text().splitlines()[len(nll)])
    # step 1 is scored before its update: the policy is still the stage-1 model, so the margin is 0 only if that
    # model is also the reference
    assert first_stage2["step"] == 1 and abs(first_stage2["reward_margin"]) < 1e-3


def test_on_policy_with_an_untrained_policy_fails_with_a_clear_error(world_dir, world_policy, tmp_path):
    import alignment.fspo as fspo

    with pytest.raises(RuntimeError, match="tie in true reward"):
        fspo.main(world_cfg(world_dir, world_policy, tmp_path, targets="on_policy", samples=2, max_new_tokens=4))


@pytest.mark.slow
def test_world_smoke_with_evaluation_and_description_variant(world_dir, world_policy, tmp_path):
    """The whole command: training, population baseline (cached), every evaluation row, the k curve, the plot."""
    import alignment.fspo as fspo

    settings = EvalSettings(users=2, prompts_per_user=2, k_curve=[0, 2, 5], max_new_tokens=12, max_length=448)
    run = fspo.main(world_cfg(world_dir, world_policy, tmp_path, describe=True, evaluate=True, eval=settings,
                              epochs=1, sft_epochs=1, sft_weight=1.0))
    results = json.loads((run / "results.json").read_text())["eval"]
    assert set(results["rows"]) == {"base", "few-shot prompting", "few-shot Pref-FT", "population", "FSPO",
                                    "oracle persona"}
    assert (run / "pref_ft" / "model.safetensors").exists() and 0 <= results["description_agreement"] <= 1
    stage1 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in stage1 if "pref_ft/nll" in m][-1] == 0  # stage 1 logs before stage 2's steps
    assert results["rows"]["base"]["win_rate"]["mean"] == 0.5
    assert set(results["k_curve"]) == {"0", "2", "3", "5"} and results["prompts"] == 4
    assert results["k_curve"]["5"]["mean_shots"] == 5.0  # test users have 5 context pairs
    assert set(results["reader_ceiling"]) == set(results["k_curve"])
    assert all(0 <= row["mean"] <= 1 for row in results["reader_ceiling"].values())
    for name in ("results.md", "win_rate_vs_k.png", "samples.jsonl"):
        assert (run / name).stat().st_size > 0
    assert "5 (unseen in training)" in (run / "results.md").read_text()
    assert len(list((tmp_path / "runs" / "cache").glob("fspo-population-*/run/DONE"))) == 1


# --- adapter data: FSPO Roleplay / ELIX / Review fixtures through the same entry point ----------------------------
def byte_tokenizer():
    """A byte-level tokenizer (no merges, no <unk>) with the chat template: stands in for a real model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alignment.world import CHAT_TEMPLATE, SPECIAL_TOKENS

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + alphabet)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("adapter", ["fspo_roleplay", "fspo_elix", "fspo_review"])
def test_the_same_command_on_fspo_format_data(adapter, tmp_path):
    import alignment.fspo as fspo
    from alignment.records import read_jsonl

    policy = tiny_policy(byte_tokenizer(), tmp_path / "policy", max_positions=2048)
    cfg = FSPOConfig(data=AdapterData(adapter=adapter, source=str(FIXTURES / adapter)), policy=str(policy),
                     format="fspo", k_min=0, k_max=1, episodes_per_user=2, epochs=1, batch_size=2, max_length=1024,
                     runs_dir=str(tmp_path / "runs"), log_every=1, val_episodes_per_user=1)
    run = fspo.main(cfg)
    results = json.loads((run / "results.json").read_text())
    meta = json.loads((run / "meta.json").read_text())
    assert meta["data"]["users"] == {"train": 1, "val": 1, "test": 0}
    train_users = {e.user_id for e in read_jsonl(run / "episodes.jsonl", Episode)}
    assert len(train_users) == 1 and results["held_out"]["val"]["pairs"] >= 1  # the val user is another user
    assert "eval" not in results  # no true reward for real users: the held-out check is the implicit reward


def test_adapter_data_needs_a_policy_and_refuses_on_policy_targets(tmp_path):
    import alignment.fspo as fspo

    data = AdapterData(adapter="fspo_elix", source=str(FIXTURES / "fspo_elix"))
    with pytest.raises(ValueError, match="on_policy needs the world"):
        fspo.main(FSPOConfig(data=data, policy="x", targets="on_policy", runs_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="adapter data needs a policy"):
        fspo.main(FSPOConfig(data=data, runs_dir=str(tmp_path)))


def test_committed_config_loads():
    from alignment.config import load_config

    cfg = load_config(FSPOConfig, ["config=fspo.yaml"])
    assert cfg.k_min <= cfg.k_max and cfg.data is None
