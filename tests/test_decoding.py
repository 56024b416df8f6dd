"""Decoding-time personalization: parity of the guided, batched, KV-cached decoding with exact references.

Parity (research/decoding.md §7.6): zero guidance = transformers' greedy `generate`; a guide's cached logits = a
full recompute; a batch of users with different preferences = each user alone; masked candidate scoring = k
separate forwards. Worked numbers: PAD's top-k identity and a hand-computed step; the sparse Drift fit. Behaviour:
banned tokens stay banned, no NaN; Drift's closed form recovers planted weights; the sampler samples softmax(s / T)
from splitmix64 uniforms (checked against a pure-Python splitmix64). Tiny random Llamas on the 47-token test
vocabulary, fp32, CPU; ~10 s in all.
"""

import copy
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from decoding import combiners
from decoding.drift import centred_cosines, fit_weights
from decoding.guides import CachedSequenceReward, Guide, RecomputeReward, classifier_reward, left_pad, positions
from decoding.loop import generate, pick_tokens, seed_tensor, uniforms
from decoding.processors import RuleProcessor, args_rule, drift_rows, drift_rule, genarm_rule, pad_rule

V = 47  # tests/conftest.py's tiny vocabulary; <pad> = 0, </s> = 2
EOS, PAD = 2, 0
M = 3  # Drift attributes in these tests


def tiny_config(seed: int, **kw) -> LlamaConfig:
    # initializer_range 0.2 (default 0.02): peaked next-token distributions, so greedy argmaxes are not near-ties
    # that float noise between a batched and a single-row forward could flip.
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
                       eos_token_id=EOS, initializer_range=0.2, **kw)


def tiny_lm(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(seed)).eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(5)
    rm = LlamaForSequenceClassification(tiny_config(5, num_labels=1)).eval()
    return {"base": tiny_lm(1), "guide": tiny_lm(2), "small": tiny_lm(3), "rm": rm}


def prompts(lengths, seed=0, low=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, V, (n,), generator=g).tolist() for n in lengths]


BASE_PROMPTS = prompts([5, 9, 7], seed=0)
GUIDE_PROMPTS = prompts([11, 4, 8], seed=1)  # each user's own preference-conditioned context: other lengths


def batch_of(rows):
    return left_pad(rows, PAD)


def rule_for(method, models, users, weight):
    """A rule for the users (indices into the prompt lists) with per-row weights `weight` (B,) or (B, M)."""
    guide_rows = [GUIDE_PROMPTS[u] for u in users]
    if method == "pad":
        return pad_rule(Guide(models["guide"], *batch_of(guide_rows)), weight, top_k=5)
    if method == "genarm":
        return genarm_rule(Guide(models["guide"], *batch_of(guide_rows)), weight)
    if method in ("drift", "drift_ragged"):
        active = weight != 0 if method == "drift_ragged" else torch.ones(len(users), M, dtype=torch.bool)
        contexts = [[3 + a] + GUIDE_PROMPTS[users[b]] for b, a in drift_rows(active)]  # a different lead token
        return drift_rule(Guide(models["small"], *batch_of(contexts)), weight, beta=0.5, active=active)
    reward = CachedSequenceReward(models["rm"], *batch_of(guide_rows))
    return args_rule(reward, weight, top_k=5)


def zero_weight(method, b):
    return torch.zeros(b, M) if method.startswith("drift") else torch.zeros(b)


def mixed_weight(method, b):
    if method.startswith("drift"):
        w = torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0], [-1.5, 3.0, 1.0]])  # a zero row among them
        return w[:b]
    return torch.tensor([1.0, 0.0, 1.5, 0.7])[:b] * (3.0 if method in ("genarm", "args") else 1.0)


METHODS = ["pad", "drift", "genarm", "args"]
ALL = [*METHODS, "drift_ragged"]  # Drift with rows only for the attributes a user weighs (B + nnz rows)


def our_generate(model, rows, rule=None, **kw):
    ids, mask = batch_of(rows)
    kw = {"max_new_tokens": 12, "eos_token_id": EOS, "pad_token_id": PAD, **kw}
    return generate(model, ids, mask, rule, **kw)


def hf_generate(model, rows, processor=None, **kw):
    ids, mask = left_pad(rows, PAD, model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=PAD,
                         eos_token_id=EOS, logits_processor=[processor] if processor else None, **kw)
    return out[:, ids.shape[1]:]


# --- zero guidance = plain greedy decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_zero_guidance_gives_the_tokens_of_plain_greedy_generate(models, method):
    base = models["base"]
    plain = hf_generate(base, BASE_PROMPTS)
    assert plain.shape[1] > 3  # a test on an empty continuation could not fail
    assert torch.equal(our_generate(base, BASE_PROMPTS), plain)
    assert torch.equal(our_generate(base, BASE_PROMPTS, rule_for(method, models, [0, 1, 2], zero_weight(method, 3))),
                       plain)
    processor = RuleProcessor(rule_for(method, models, [0, 1, 2], zero_weight(method, 3)), batch_size=3)
    assert torch.equal(hf_generate(base, BASE_PROMPTS, processor), plain)


@pytest.mark.parametrize("method", METHODS)
def test_guidance_through_generate_and_through_a_logits_processor_agree(models, method):
    base, w = models["base"], mixed_weight(method, 3)
    ours = our_generate(base, BASE_PROMPTS, rule_for(method, models, [0, 1, 2], w))
    theirs = hf_generate(base, BASE_PROMPTS, RuleProcessor(rule_for(method, models, [0, 1, 2], w), batch_size=3))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, our_generate(base, BASE_PROMPTS))  # the guidance did something


# --- the same decoding on a GPU (tests marked gpu skip themselves without CUDA) ----------------------------------
def on_cuda(models, dtype=torch.float32):
    return {k: copy.deepcopy(m).to("cuda", dtype) for k, m in models.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_users_batched_on_cuda_get_the_tokens_of_the_cpu(models, method, temperature):
    """Guides, rules, per-row weights and the per-row samplers all follow the model to the GPU (fp32)."""
    w, seeds = mixed_weight(method, 3), [11, 12, 13]
    cpu = our_generate(models["base"], BASE_PROMPTS, rule_for(method, models, [0, 1, 2], w), temperature=temperature,
                       seeds=seeds)
    gpu = on_cuda(models)
    out = our_generate(gpu["base"], BASE_PROMPTS, rule_for(method, gpu, [0, 1, 2], w), temperature=temperature,
                       seeds=seeds)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_logits_processor_on_cuda_gives_the_tokens_of_the_cpu(models, method):
    w = mixed_weight(method, 3)
    cpu = hf_generate(models["base"], BASE_PROMPTS, RuleProcessor(rule_for(method, models, [0, 1, 2], w), 3))
    gpu = on_cuda(models)
    out = hf_generate(gpu["base"], BASE_PROMPTS, RuleProcessor(rule_for(method, gpu, [0, 1, 2], w), 3))
    assert torch.equal(out.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_bf16_guidance_on_cuda_decodes_allowed_tokens(models, method):
    """bf16 base and guides: every combination is upcast to fp32 and the EOS ban of min_new_tokens holds."""
    gpu = on_cuda(models, torch.bfloat16)
    out = our_generate(gpu["base"], BASE_PROMPTS, rule_for(method, gpu, [0, 1, 2], mixed_weight(method, 3)),
                       min_new_tokens=12, temperature=1.0, seeds=[1, 2, 3])
    assert out.shape == (3, 12)
    assert ((out >= 0) & (out < V) & (out != EOS)).all()


# --- cached = full recompute ----------------------------------------------------------------------------------------
def full_logits(model, rows):
    ids, mask = batch_of(rows)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1].float()


@torch.no_grad()
def test_guide_cache_equals_a_full_recompute_over_a_left_padded_batch(models):
    model, rows = models["guide"], [list(r) for r in GUIDE_PROMPTS]
    guide = Guide(model, *batch_of(rows))
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        torch.testing.assert_close(guide.logits, full_logits(model, rows), atol=1e-4, rtol=0)
        tokens = torch.randint(3, V, (len(rows),), generator=g)
        guide.advance(tokens)
        rows = [r + [t] for r, t in zip(rows, tokens.tolist(), strict=True)]
    torch.testing.assert_close(guide.logits, full_logits(model, rows), atol=1e-4, rtol=0)
    assert guide.cache.get_seq_length() == guide.mask.shape[1]


# --- a batch of different users = each user alone -------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_of_users_with_different_preferences_equals_each_user_alone(models, method, temperature):
    base, w = models["base"], mixed_weight(method, 3)
    seeds = [11, 12, 13]
    batch = our_generate(base, BASE_PROMPTS, rule_for(method, models, [0, 1, 2], w), temperature=temperature,
                         seeds=seeds)
    for u in range(3):
        alone = our_generate(base, [BASE_PROMPTS[u]], rule_for(method, models, [u], w[u:u + 1]),
                             temperature=temperature, seeds=seeds[u:u + 1])
        n = alone.shape[1]
        assert torch.equal(batch[u, :n], alone[0]), (method, u)
        assert (batch[u, n:] == PAD).all()  # the batch ran on after this row's EOS: pad only


def test_ragged_drift_rows_give_the_tokens_of_all_rows(models):
    w = mixed_weight("drift", 3)
    ragged = rule_for("drift_ragged", models, [0, 1, 2], w)
    assert ragged.guide.rows == 3 + int((w != 0).sum()) == 8  # not 3 x (1 + M) = 12
    dense = our_generate(models["base"], BASE_PROMPTS, rule_for("drift", models, [0, 1, 2], w))
    assert torch.equal(our_generate(models["base"], BASE_PROMPTS, ragged), dense)


# --- PAD's identity and a worked step -------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.5, 1.0, 1.5])
def test_pad_score_is_interpolation_of_base_and_guide_logits_on_the_top_k(w):
    g = torch.Generator().manual_seed(0)
    base, guide = torch.randn(2000, 30, generator=g) * 3, torch.randn(2000, 30, generator=g) * 3
    s = combiners.pad_scores(base, guide, torch.full((2000,), w), k=10)
    support = torch.isfinite(s)
    assert (support.sum(-1) == 10).all() and torch.equal(support, base >= base.topk(10).values[:, -1:])
    interpolation = ((1 - w) * base + w * guide).masked_fill(~support, float("-inf"))
    offset = s - interpolation
    inf = torch.tensor(float("inf"))
    spread = torch.where(support, offset, -inf).amax(-1) - torch.where(support, offset, inf).amin(-1)
    assert spread.max() < 1e-4  # equal up to one constant per row
    assert torch.equal(s.argmax(-1), interpolation.argmax(-1))


def test_pad_worked_step():
    # K = {0, 1}; log-softmax over K: base [2, 1] -> [-0.3133, -1.3133], guide [0, 3] -> [-3.0486, -0.0486];
    # w = 1: s = base + (guide - base) on K = [2 - 2.7353, 1 + 1.2647] = [-0.7353, 2.2647]
    s = combiners.pad_scores(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.0, 0.0]]),
                             torch.tensor([1.0]), k=2)
    lse = lambda a, b: max(a, b) + math.log1p(math.exp(-abs(a - b)))
    expected = [0.0 - lse(0, 3) + lse(2, 1), 3.0 - lse(0, 3) + lse(2, 1)]
    torch.testing.assert_close(s[0, :2], torch.tensor(expected))
    assert abs(expected[0] + 0.7353) < 1e-4 and abs(expected[1] - 2.2647) < 1e-4
    assert torch.isneginf(s[0, 2:]).all()


# --- masked candidate scoring = k separate forwards -----------------------------------------------------------------
@torch.no_grad()
def test_masked_candidate_scoring_equals_k_separate_forwards(models):
    rm, rows = models["rm"], GUIDE_PROMPTS
    cached = CachedSequenceReward(rm, *batch_of(rows))
    reference = RecomputeReward(classifier_reward(rm), *batch_of(rows))
    g = torch.Generator().manual_seed(4)
    for step in range(6):
        candidates = torch.randint(3, V, (3, 5), generator=g)
        torch.testing.assert_close(cached.score(candidates), reference.score(candidates), atol=1e-5, rtol=0)
        # steps 0-3 emit a candidate (its cached keys/values are kept); steps 4-5 a token outside the candidates
        # of row 1 (a finished row's pad: exact recompute)
        tokens = candidates[torch.arange(3), torch.tensor([step % 5, (step + 2) % 5, 4])]
        if step >= 4:
            tokens[1] = PAD
        cached.advance(tokens)
        reference.advance(tokens)
        assert cached.cache.get_seq_length() == cached.mask.shape[1] == reference.mask.shape[1]


# --- masks ----------------------------------------------------------------------------------------------------------
def test_banned_tokens_stay_banned_and_nothing_is_nan():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 12, generator=g)
    base[:, [2, 5]] = float("-inf")  # banned upstream (e.g. EOS under min_new_tokens)
    base[3, 3:] = float("-inf")  # row 3: only 3 allowed tokens, fewer than k
    guide = torch.randn(4, 12, generator=g)
    guide[0, 7] = float("-inf")  # a guide with its own mask: 0 * -inf must not turn into NaN
    prompted = torch.randn(4, 1 + M, 12, generator=g)
    prompted[1, 0, 4] = float("-inf")
    w, zero = torch.tensor([1.0, 0.0, 1.5, 2.0]), torch.zeros(4)
    ids = base.topk(5).indices
    outputs = [
        combiners.pad_scores(base, guide, w, k=5), combiners.pad_scores(base, guide, zero, k=5),
        combiners.genarm_scores(base, guide, w), combiners.genarm_scores(base, guide, zero),
        combiners.drift_scores(base, prompted, torch.randn(4, M, generator=g), torch.full((4,), 0.5)),
        combiners.args_scores(base, ids, torch.randn(4, 5, generator=g), w),
    ]
    for out in outputs:
        out = combiners.keep_masked(base, out)
        assert not out.isnan().any()
        assert torch.isneginf(out[:, [2, 5]]).all() and torch.isneginf(out[3, 3:]).all()
        assert torch.isfinite(out.max(-1).values).all()  # every row keeps an allowed token


def test_min_new_tokens_ban_survives_guidance_in_generate(models):
    base, w = models["base"], mixed_weight("genarm", 3)
    processor = RuleProcessor(rule_for("genarm", models, [0, 1, 2], w), batch_size=3)
    out = hf_generate(base, BASE_PROMPTS, processor, min_new_tokens=10)
    assert out.shape[1] >= 10 and not (out[:, :10] == EOS).any()
    ours = our_generate(base, BASE_PROMPTS, rule_for("genarm", models, [0, 1, 2], w), min_new_tokens=10)
    assert torch.equal(ours, out)


def test_rule_processor_refuses_a_second_generate_call(models):
    processor = RuleProcessor(rule_for("pad", models, [0, 1, 2], mixed_weight("pad", 3)), batch_size=3)
    hf_generate(models["base"], BASE_PROMPTS, processor)
    with pytest.raises(ValueError, match="one token per call"):
        hf_generate(models["base"], BASE_PROMPTS, processor)


# --- sampling -------------------------------------------------------------------------------------------------------
def test_sampler_samples_softmax_of_scores_over_temperature():
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]])
    T, n = 0.7, 20000
    noise = uniforms(seed_tensor([0] * n), torch.arange(n))  # one row's first n steps
    counts = torch.bincount(pick_tokens(scores.expand(n, 4), T, noise), minlength=4).float()
    expected = torch.softmax(scores / T, -1)[0] * n
    assert counts[3] == 0
    chi2 = (((counts[:3] - expected[:3]) ** 2) / expected[:3]).sum()
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def splitmix64(seed: int, n: int) -> int:
    """Output n (0-based) of splitmix64 (Steele, Lea, Flood 2014), in Python's exact integers."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_uniforms_are_splitmix64_outputs_and_uniform():
    seeds = [0, 1, 2**63 + 5, 2**64 - 1, -3, 12345]
    counters = [0, 7, 3, 1, 2, 10**9]
    got = uniforms(seed_tensor(seeds), torch.tensor(counters))
    expected = [((splitmix64(s % 2**64, c) >> 11) + 0.5) / 2**53 for s, c in zip(seeds, counters, strict=True)]
    assert got.tolist() == expected
    u = uniforms(seed_tensor(list(range(40000))), torch.zeros(40000, dtype=torch.long))  # neighbouring seeds
    counts = torch.bincount((u * 20).long(), minlength=20).float()
    assert ((counts - 2000) ** 2 / 2000).sum() < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    assert (u > 0).all() and (u < 1).all()


# --- Drift fitting --------------------------------------------------------------------------------------------------
def test_sparse_fit_worked_example():
    # a = (3, -1, 0.5), lam = 0.25 * 3 = 0.75 -> S(a) = (2.25, -0.25, 0) -> / sqrt(5.125)
    p = fit_weights(np.array([[3.0, -1.0, 0.5]]), "sparse", 0.25)
    np.testing.assert_allclose(p, np.array([2.25, -0.25, 0.0]) / math.sqrt(5.125))
    np.testing.assert_allclose(fit_weights(np.array([[3.0, -1.0, 0.5]]), "closed_form"),
                               np.array([3.0, -1.0, 0.5]) / math.sqrt(10.25))


def test_closed_form_recovers_planted_weights_from_50_bradley_terry_pairs():
    rng = np.random.default_rng(0)
    cos = []
    for _ in range(50):
        p = rng.standard_normal(7)
        pair_features = rng.standard_normal((50, 7))  # r(y_a) - r(y_b)
        a_wins = rng.random(50) < 1 / (1 + np.exp(-2.0 * pair_features @ p))
        deltas = np.where(a_wins[:, None], pair_features, -pair_features)  # chosen minus rejected
        fitted = fit_weights(deltas, "closed_form")
        cos.append(fitted @ p / np.linalg.norm(p))
    assert np.mean(cos) > 0.85


def test_centred_cosine_ignores_a_direction_all_users_share():
    rng = np.random.default_rng(1)
    personal = rng.standard_normal((40, 5))
    shared = np.array([10.0, 0, 0, 0, 0])
    noise = rng.standard_normal((40, 5))
    # fitted = the shared direction + noise: high raw cosine with the truth, ~0 once both are centred
    true, fitted = shared + personal, shared + noise
    raw = (true * fitted).sum(1) / np.linalg.norm(true, axis=1) / np.linalg.norm(fitted, axis=1)
    assert raw.mean() > 0.6 and abs(centred_cosines(fitted, true).mean()) < 0.2
    np.testing.assert_allclose(centred_cosines(personal * 3 + 1, personal), 1.0)
