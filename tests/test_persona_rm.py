"""Persona-conditioned reward models: user-weight math, inputs, scoring invariances, data splits, smoke runs.

Worked numbers and behaviour for `rewards/user_weights.py` (MAP recovers a known w on synthetic phi), the exact
inputs of the shots method, parity of the KV-cached context path with a full recompute, padding-side invariance
of the score, the adapters path on the PRISM / PersonalLLM fixtures, and one smoke run of the entry point on a
small world (slow).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from alignment.sampling import with_system_suffix
from rewards import user_weights as uw
from rewards.persona_rm import (
    PersonaRMConfig,
    conversation_ids,
    from_adapter,
    kernel_margins,
    pad,
    score,
    score_in_context,
    shot_sides,
    shot_vectors,
)
from rewards.rm_eval import flipped

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- user weights -------------------------------------------------------------------------------------------------
def _bt_data(w: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n basis differences whose rows are oriented chosen - rejected under BT labels from w."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, w.numel(), generator=gen, dtype=torch.float64)
    flip = torch.rand(n, generator=gen, dtype=torch.float64) > torch.sigmoid(d @ w)
    return torch.where(flip[:, None], -d, d)


def test_map_recovers_known_weights_on_synthetic_phi():
    w_true = torch.tensor([1.5, -2.0, 0.5, 0.0], dtype=torch.float64)
    d = _bt_data(w_true, 4000, seed=0)
    w, hess, _ = uw.map_weights(d, torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64) * 1e-3)
    # 4000 BT labels: the MLE's standard error is ~sqrt(diag(H^-1)) ~ 0.04-0.06 per coordinate.
    se = torch.linalg.inv(hess).diagonal().sqrt()
    assert torch.all((w - w_true).abs() < 4 * se), (w, se)
    assert torch.all(se < 0.08)


def test_map_with_no_pairs_is_the_prior_mean_and_a_strong_prior_shrinks():
    mean = torch.tensor([0.3, -0.1], dtype=torch.float64)
    w, hess, _ = uw.map_weights(torch.zeros(0, 2, dtype=torch.float64), mean, torch.eye(2, dtype=torch.float64))
    assert torch.equal(w, mean) and torch.equal(hess, torch.eye(2, dtype=torch.float64))
    d = _bt_data(torch.tensor([3.0, 3.0], dtype=torch.float64), 8, seed=1)
    weak, _, _ = uw.map_weights(d, mean, torch.eye(2, dtype=torch.float64) * 0.01)
    strong, _, _ = uw.map_weights(d, mean, torch.eye(2, dtype=torch.float64) * 100.0)
    assert (strong - mean).norm() < 0.1 * (weak - mean).norm()


def test_map_one_pair_worked_number():
    # One pair d = (1,), prior N(0, 1): d/dw [log sigmoid(w) - w^2 / 2] = sigmoid(-w) - w = 0, whose root is
    # w = 0.40106 (sigmoid(-0.40106) = 1 / (1 + e^0.40106) = 1 / 2.49341 = 0.40106).
    w, _, _ = uw.map_weights(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                             torch.eye(1, dtype=torch.float64))
    assert w.item() == pytest.approx(0.40106, abs=1e-5)
    assert w.item() == pytest.approx(torch.sigmoid(-w).item(), abs=1e-9)


def test_gaussian_prior_is_mean_and_covariance():
    weights = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    prior = uw.fit_gaussian(weights, ridge=0.0)
    assert torch.allclose(prior.means[0], torch.tensor([1.0, 1.0], dtype=torch.float64))
    # sample covariance (n - 1 = 3): var = 4/3 per axis, covariance 0
    assert torch.allclose(prior.covariances[0], torch.eye(2, dtype=torch.float64) * 4 / 3)
    assert uw.Prior.from_dict(json.loads(json.dumps(prior.to_dict()))).means.equal(prior.means)


def test_mixture_prior_finds_two_clusters_and_adaptation_picks_the_right_one():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    weights = torch.cat([centres[0] + 0.3 * torch.randn(100, 2, generator=gen),
                         centres[1] + 0.3 * torch.randn(60, 2, generator=gen)])
    prior = uw.fit_mixture(weights, components=2)
    order = prior.means[:, 0].argsort(descending=True)
    assert torch.allclose(prior.means[order], centres.double(), atol=0.15)
    assert torch.allclose(prior.log_weights[order].exp(), torch.tensor([100 / 160, 60 / 160], dtype=torch.float64),
                          atol=1e-3)
    d = _bt_data(centres[1].double(), 6, seed=3)  # a user from the smaller cluster, 6 pairs
    ws, log_resp = uw.adapt(d, prior)
    assert log_resp.exp()[order[1]] > 0.95
    targets = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert (uw.predictive_margin(targets, ws, log_resp) * torch.tensor([-1.0, 1.0])).min() > 0


def test_single_component_predictive_margin_is_the_dot_product():
    ws, log_resp = torch.tensor([[2.0, -1.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    targets = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=torch.float64)
    assert torch.allclose(uw.predictive_margin(targets, ws, log_resp), torch.tensor([1.0, -1.0], dtype=torch.float64))


# --- inputs -------------------------------------------------------------------------------------------------------
@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


def _pair(chosen: str, rejected: str, query: str = "where do you live ?") -> dict:
    return {"user_id": "u", "prompt": [{"role": "system", "content": "i live in lyon ."},
                                       {"role": "user", "content": query}],
            "chosen": chosen, "rejected": rejected, "chosen_reward": 1.0, "rejected_reward": 0.0}


def test_a_shot_keeps_only_the_tokens_where_the_responses_differ(tok):
    pair = _pair("hey ! i live in lyon !", "i live in paris .")
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    # difflib over ids: the chosen side keeps "hey !" and "lyon !", the rejected side "paris ."
    assert shot_sides(tok, pair, 48) == ([bos, *words("hey ! lyon !")], [bos, *words("paris .")])
    assert shot_sides(tok, pair, 2) == ([bos, *words("hey !")], [bos, *words("paris .")])
    assert shot_sides(tok, flipped(pair), 48) == tuple(reversed(shot_sides(tok, pair, 48)))
    # one response contained in the other: the shorter side is just BOS
    assert shot_sides(tok, _pair("hey ! good day !", "good day !"), 48) == ([bos, *words("hey !")], [bos])


def test_persona_goes_into_the_system_turn():
    prompt = [{"role": "system", "content": "i live in lyon ."}, {"role": "user", "content": "hello"}]
    joined = with_system_suffix(prompt, "the user likes jokes .")[0]["content"]
    assert joined == "i live in lyon . the user likes jokes ."
    assert with_system_suffix(prompt[1:], "p")[0] == {"role": "system", "content": "p"}
    assert prompt[0]["content"] == "i live in lyon ."  # not mutated


# --- scoring ------------------------------------------------------------------------------------------------------
@pytest.fixture
def classifier(tok, tiny_model_config):
    from alignment.models import load_sequence_classifier

    torch.manual_seed(0)
    return load_sequence_classifier(replace(tiny_model_config, max_positions=256), tok, ["a", "b"])  # hidden 32


def _random_seqs(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 40, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def test_score_is_read_at_the_last_real_token_whatever_the_padding(classifier, tok):
    seqs = _random_seqs(4, [3, 9, 5, 12], seed=0)
    with torch.no_grad():
        right = score(classifier, seqs, tok.pad_token_id)
        alone = torch.cat([score(classifier, [s], tok.pad_token_id) for s in seqs])
        ids, mask = pad(seqs, tok.pad_token_id, left=True)
        left = classifier(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])  # different inputs, different scores: the check can fail


def test_context_vectors_are_antisymmetric_in_the_label(classifier, tok):
    pairs = [_pair("hey ! i live in lyon !", "i live in paris ."), _pair("good day .", "hey .")]
    with torch.no_grad():
        vectors = shot_vectors(classifier, tok, pairs, 48)
        back = shot_vectors(classifier, tok, [flipped(p) for p in pairs], 48)
    assert vectors.shape == (2, classifier.config.hidden_size)
    assert torch.equal(back, -vectors) and vectors.abs().sum() > 0


def test_scores_in_context_do_not_depend_on_the_batch_or_its_padding(classifier, tok):
    gen = torch.Generator().manual_seed(0)
    contexts = [torch.randn(3, 32, generator=gen), torch.zeros(0, 32), torch.randn(1, 32, generator=gen)]
    targets = [_random_seqs(2, [4, 9], 3), _random_seqs(1, [6], 4), _random_seqs(2, [12, 5], 5)]
    with torch.no_grad():
        together = score_in_context(classifier, contexts, targets, tok.pad_token_id)
        alone = torch.cat([score_in_context(classifier, [c], [[t]], tok.pad_token_id)
                           for c, rows in zip(contexts, targets, strict=True) for t in rows])
        no_context = score(classifier, targets[1], tok.pad_token_id)
    assert together.shape == (5, 2) and torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together[2:3], no_context, atol=1e-5)  # k = 0 is the plain conversation score
    assert not torch.allclose(alone[0], alone[1])  # the check can fail: different rows score differently


def test_context_passes_gradients_to_the_shot_encoder(classifier, tok):
    classifier.train()
    vectors = shot_vectors(classifier, tok, [_pair("hey ! i live in lyon !", "i live in paris .")], 48)
    score_in_context(classifier, [vectors], [_random_seqs(2, [4], 2)], tok.pad_token_id).sum().backward()
    lyon = tok.convert_tokens_to_ids("lyon")
    assert classifier.get_input_embeddings().weight.grad[lyon].abs().sum() > 0  # a shot-only token


def test_kernel_margins_read_the_users_weights_off_the_shots():
    gen = torch.Generator().manual_seed(0)
    targets = [torch.randn(4, 3, generator=gen), torch.randn(2, 3, generator=gen)]  # (c0 r0 c1 r1), (c0 r0)
    shots = [torch.randn(6, 3, generator=gen), torch.zeros(0, 3)]  # user 0: k = 3, user 1: k = 0
    margins = kernel_margins(targets, shots)
    d = shots[0][0::2, 1:] - shots[0][1::2, 1:]
    z = d.sum(0) / 4  # three shots and one of no difference
    expected = [targets[0][2 * i, 0] - targets[0][2 * i + 1, 0] + (targets[0][2 * i, 1:] - targets[0][2 * i + 1, 1:])
                @ z for i in range(2)] + [targets[1][0, 0] - targets[1][1, 0]]  # k = 0: the population's margin
    assert torch.allclose(margins, torch.stack(expected))
    swapped = [s.view(-1, 2, 3).flip(1).reshape(-1, 3) for s in shots]  # every shot's label flipped
    flipped_margins = kernel_margins(targets, swapped)
    personal = margins[:2] - (targets[0][0::2, 0] - targets[0][1::2, 0])
    assert personal.abs().min() > 0  # the check can fail
    assert torch.allclose(flipped_margins[:2] - (targets[0][0::2, 0] - targets[0][1::2, 0]), -personal)


def test_kernel_scorer_gives_the_training_margins(classifier, tok):
    from rewards.persona_rm import ShotScorer
    from rewards.rm_eval import Request

    cfg = PersonaRMConfig(shot_readout="kernel", max_length=64)
    shots = [_pair("hey ! i live in lyon !", "i live in paris ."), _pair("good day .", "hey .")]
    targets = [_pair("i live in lyon .", "cheers ! i live in paris !")]
    encode = lambda pairs: [conversation_ids(tok, p["prompt"], p[side], 64)
                            for p in pairs for side in ("chosen", "rejected")]
    with torch.no_grad():
        expected = kernel_margins([score(classifier, encode(targets), tok.pad_token_id)],
                                  [score(classifier, encode(shots), tok.pad_token_id)])
    got = ShotScorer(classifier, tok, cfg).margins([Request("u", "", shots, targets)])
    assert np.allclose(got[0], expected.numpy(), atol=1e-5)


# --- data ---------------------------------------------------------------------------------------------------------
def test_prism_fixture_splits_users_and_prompts():
    from alignment.adapters import prism

    adapted = prism(str(FIXTURES / "prism"))
    data = from_adapter(adapted, "prism", test_users=0.5, context_share=0.5, seed=0)
    for (user, part), pairs in data.pairs.items():
        assert all(p["user_id"] == user for p in pairs)
        other = data.pairs[(user, "target" if part == "context" else "context")]
        assert not {p["prompt_id"] for p in pairs} & {p["prompt_id"] for p in other}  # prompt-disjoint
    assert sum(len(v) for v in data.pairs.values()) <= len(adapted.pairs)
    again = from_adapter(adapted, "prism", test_users=0.5, context_share=0.5, seed=0)
    assert again.pairs == data.pairs and again.users == data.users  # deterministic


def test_personal_llm_fixture_uses_the_dataset_split_for_context_and_target():
    from alignment.adapters import personal_llm

    adapted = personal_llm(str(FIXTURES / "personal_llm"), n_users=6, pairs_per_user=2)
    data = from_adapter(adapted, "personal_llm", test_users=0.5, context_share=0.5, seed=0)
    by_prompt = {p.prompt_id: p.split for p in adapted.pairs}
    for (_, part), pairs in data.pairs.items():
        assert {by_prompt[p["prompt_id"]] for p in pairs} == {"train" if part == "context" else "test"}
    assert set(data.user_ids("train")) | set(data.user_ids("test")) <= {u.user_id for u in adapted.users}
    assert math.isclose(len(data.user_ids("test")) / 6, 0.5, abs_tol=0.35)


# --- entry point --------------------------------------------------------------------------------------------------
def _tiny_run_config(tiny_model_config, runs_dir, **kw) -> PersonaRMConfig:
    from rewards.persona_rm import METHODS
    from rewards.rm_eval import RMEvalSettings

    return PersonaRMConfig(runs_dir=str(runs_dir), model=replace(tiny_model_config, max_positions=512),
                           steps={m: 3 for m in METHODS}, batch_pairs=4, episode_users=2, episode_targets=2, k_max=3,
                           basis=3, evaluation=RMEvalSettings(ks=[0, 1, 2], k=1, seen_users=3, n_boot=50), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("readout", ["kernel", "tokens"])
def test_smoke_every_method_trains_and_evaluates_on_a_small_world(in_tmp, tiny_model_config, readout):
    from alignment.eval_rm import EvalRMConfig
    from alignment.eval_rm import main as evaluate_run
    from alignment.world import WorldSpec
    from rewards.persona_rm import METHODS, load_scorers, main

    world = WorldSpec(characters=6, min_statements=8, max_statements=12, users=[10, 2, 5], train_pairs=12,
                      context_pairs=6, target_pairs=4, dialogues=100)
    cfg = _tiny_run_config(tiny_model_config, in_tmp / "runs", world=world, prior_components=2, shot_readout=readout)
    run_dir = main(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS)
    assert results["users"] == {"unseen": 5, "seen": 3} and results["pairs"]["unseen"] == 20
    assert 0.5 < results["bayes_ceiling"]["unseen"] <= 1.0 and results["world_statistics"]["unseen"]
    for method in METHODS:
        assert (run_dir / method / "model" / "config.json").is_file() and (run_dir / method / "state.json").is_file()
    assert "flip_rate" in results["methods"]["shots"] and "flip_rate" in results["methods"]["weights"]
    assert (run_dir / "results.md").read_text().startswith("Reward models on")
    assert (run_dir / "accuracy_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    # the evaluation entry point re-scores the saved models: the same numbers
    again = evaluate_run(EvalRMConfig(run=str(run_dir), runs_dir=str(in_tmp / "runs"), evaluation=cfg.evaluation))
    rerun = json.loads((again / "results.json").read_text())
    for method in METHODS:
        for k in ("0", "1", "2"):
            assert rerun["methods"][method]["unseen"][k]["micro"] == results["methods"][method]["unseen"][k]["micro"]
    other = "tokens" if readout == "kernel" else "kernel"  # a config that does not match the saved head: one line
    with pytest.raises(ValueError, match="head outputs, but shots"):
        load_scorers(run_dir, replace(cfg, shot_readout=other), methods=["shots"])


@pytest.fixture
def tokenizer_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def prism_users(tmp_path):
    """The PRISM fixture's two-turn conversation, as if 8 users had had it: every user then has two prompts, one
    for context and one for target (the fixture itself has one user with two prompts)."""
    rows = [json.loads(line) for line in (FIXTURES / "prism" / "conversations.jsonl").read_text().splitlines()]
    multi = max(rows, key=lambda r: len({t["turn"] for t in r["conversation_history"]}))
    out = tmp_path / "prism"
    out.mkdir()
    lines = [json.dumps({**multi, "user_id": f"user{i}", "conversation_id": f"c{i}"}) for i in range(8)]
    (out / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    (out / "survey.jsonl").write_text((FIXTURES / "prism" / "survey.jsonl").read_text())
    return out


@pytest.mark.parametrize("adapter", ["prism", "personal_llm"])
def test_real_data_runs_through_the_adapters(adapter, in_tmp, tiny_model_config, tokenizer_dir, prism_users):
    from rewards.persona_rm import main

    source = prism_users if adapter == "prism" else FIXTURES / "personal_llm"
    cfg = _tiny_run_config(tiny_model_config, in_tmp / "runs", adapter=adapter, data=str(source),
                           tokenizer=str(tokenizer_dir), simulated_users=8, test_users=0.5, context_share=0.5,
                           methods=["population", "persona", "weights"], seed=1)
    results = json.loads((main(cfg) / "results.json").read_text())
    assert results["bayes_ceiling"] == {"unseen": None, "seen": None}  # real users: no known truth
    assert results["users"]["unseen"] >= 1 and results["users"]["seen"] >= 1
    for row in results["methods"].values():
        assert 0.0 <= row["unseen"]["0"]["micro"]["mean"] <= 1.0 and "normalized_gain" not in row
