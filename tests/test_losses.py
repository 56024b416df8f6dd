"""Preference losses: worked numbers, behaviour, the APC weights' identities, and parity with TRL 1.16."""

import copy
import math

import pytest
import torch

from alignment.losses import LENGTH_AVERAGED, LOSSES, apc_pair_weights, apc_weighted_loss, dpo_loss, ipo_loss


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), the DPO loss of an ordered pair whose scaled margin is -x."""
    return math.log1p(math.exp(x))


def logps(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- DPO (sigmoid) -------------------------------------------------------------------------------------------


def test_dpo_loss_is_log2_when_policy_equals_reference():
    policy = torch.randn(2, 5)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[0], policy[1], policy[0], policy[1], beta=0.1)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2)))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_dpo_loss_worked_numbers():
    """beta = 0.1, two pairs.

    Pair 0: policy (-1, -3), reference (-2, -2): log-ratios +1 and -1, margin h = 2, beta*h = 0.2,
            loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139; rewards +0.1, -0.1.
    Pair 1: policy (-5, -4), reference (-4, -4): log-ratios -1 and 0, h = -1, beta*h = -0.1,
            loss = log(1 + e^0.1) = log(2.105171) = 0.744397; rewards -0.1, 0.
    cDPO, eps = 0.25 on pair 0: 0.75 * log(1 + e^-0.2) + 0.25 * log(1 + e^0.2) = 0.75*0.598139 + 0.25*0.798139
            = 0.648139 (the two softplus terms differ by exactly 0.2).
    """
    args = logps(-1, -5), logps(-3, -4), logps(-2, -4), logps(-2, -4)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=0.1)
    torch.testing.assert_close(losses, logps(0.598139, 0.744397), atol=1e-6, rtol=0)
    torch.testing.assert_close(losses, logps(softplus(-0.2), softplus(0.1)))
    torch.testing.assert_close(chosen_rewards, logps(0.1, -0.1))
    torch.testing.assert_close(rejected_rewards, logps(-0.1, 0.0))
    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.25)
    torch.testing.assert_close(smoothed[0], torch.tensor(0.648139), atol=1e-6, rtol=0)


def test_chosen_preferred_gives_lower_loss():
    ref = torch.zeros(4)
    margins = logps(-2, -0.5, 0.5, 2)  # policy chosen log-ratio minus rejected, increasing
    losses, _, _ = dpo_loss(margins, torch.zeros(4), ref, ref, beta=0.5)
    assert torch.all(losses[1:] < losses[:-1])


def test_dpo_gradients_push_chosen_up_and_rejected_down():
    chosen, rejected = logps(-3, -1).requires_grad_(), logps(-2, -2).requires_grad_()
    losses, _, _ = dpo_loss(chosen, rejected, logps(-2, -2), logps(-2, -2), beta=0.1)
    losses.sum().backward()
    # gradient descent moves against the gradient: chosen.grad < 0 raises chosen, rejected.grad > 0 lowers rejected
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)
    torch.testing.assert_close(chosen.grad, -rejected.grad)


@pytest.mark.parametrize("name", ["sigmoid", "ipo"])
def test_rewards_are_detached(name):
    chosen, rejected = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = LOSSES[name](chosen, rejected, torch.randn(3), torch.randn(3), 0.1)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


# --- IPO -----------------------------------------------------------------------------------------------------


def test_ipo_loss_worked_numbers():
    """beta = 0.1, so the target margin is 1 / (2 beta) = 5 (per token: inputs are length-averaged).

    Pair 0: policy (-1, -2), reference (-1.5, -1.5): h = 0.5 - (-0.5) = 1, loss = (1 - 5)^2 = 16.
    Pair 1: policy (0, -5), reference (0, 0): h = 5, loss = 0 (at the target).
    Pair 2: policy (0, -8), reference (0, 0): h = 8, loss = (8 - 5)^2 = 9 (past the target is penalized).
    Policy = reference: h = 0, loss = 5^2 = 25.
    """
    losses, chosen_rewards, _ = ipo_loss(logps(-1, 0, 0), logps(-2, -5, -8), logps(-1.5, 0, 0), logps(-1.5, 0, 0), 0.1)
    torch.testing.assert_close(losses, logps(16, 0, 9))
    torch.testing.assert_close(chosen_rewards, logps(0.05, 0, 0))
    same = logps(-3.0)
    torch.testing.assert_close(ipo_loss(same, same, same, same, beta=0.1)[0], logps(25))


def test_loss_table_and_length_convention():
    assert LOSSES == {"sigmoid": dpo_loss, "ipo": ipo_loss}
    assert LENGTH_AVERAGED["ipo"] and not LENGTH_AVERAGED["sigmoid"] and not LENGTH_AVERAGED["apc_weighted"]
    for fn in LOSSES.values():
        out = fn(torch.randn(6), torch.randn(6), torch.randn(6), torch.randn(6), 0.1)
        assert len(out) == 3 and all(t.shape == (6,) for t in out)


# --- APC weights and the APC-weighted loss -------------------------------------------------------------------


def random_statements(batch: int, statements: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = ["p_rel", "p_ent_1", "p_con_1", "p_ent_2", "p_con_2"]
    probs = {name: torch.rand(batch, statements, generator=g) for name in names}
    return probs | {"mask": torch.ones(batch, statements, dtype=torch.bool)}


def v_apc(p_rel, p_ent, p_con, mask):
    """V_APC(y) = sum_i P_rel,i P_ent,i(y) + (1 - P_rel,i)(1 - P_con,i(y)) over real statements (B,)."""
    return ((p_rel * p_ent + (1 - p_rel) * (1 - p_con)) * mask).sum(1)


def test_apc_weights_hand_computed_two_statements():
    """Two statements, y1 vs y2.

    s1: P_rel 0.9; y1 ent 0.8 con 0.1; y2 ent 0.2 con 0.1
    s2: P_rel 0.2; y1 ent 0.0 con 0.6; y2 ent 0.1 con 0.1
    w12 = 0.9*(0.8-0.2)+ + 0.1*(0.1-0.1)+ + 0.2*(0.0-0.1)+ + 0.8*(0.1-0.6)+ = 0.54 + 0 + 0 + 0 = 0.54
    w21 = 0.9*(0.2-0.8)+ + 0.1*(0.1-0.1)+ + 0.2*(0.1-0.0)+ + 0.8*(0.6-0.1)+ = 0 + 0 + 0.02 + 0.40 = 0.42
    V(y1) = 0.72 + 0.09 + 0 + 0.32 = 1.13, V(y2) = 0.18 + 0.09 + 0.02 + 0.72 = 1.01, gap 0.12 = w12 - w21.
    Loss with beta = 0.1 and margin h = 2 (beta*h = 0.2): l12 = log(1 + e^-0.2) = 0.598139,
    l21 = log(1 + e^0.2) = l12 + 0.2 = 0.798139, loss = (0.54 l12 + 0.42 l21) / 0.96 = l12 + 0.2 * 0.4375
    = 0.685639.
    """
    t = lambda *v: torch.tensor([v])  # (1, 2)
    w12, w21 = apc_pair_weights(t(0.9, 0.2), t(0.8, 0.0), t(0.1, 0.6), t(0.2, 0.1), t(0.1, 0.1), t(1, 1))
    torch.testing.assert_close(w12, logps(0.54))
    torch.testing.assert_close(w21, logps(0.42))
    losses, _, _ = apc_weighted_loss(logps(-1), logps(-3), logps(-2), logps(-2), w12, w21, beta=0.1)
    torch.testing.assert_close(losses, logps(0.685639), atol=1e-6, rtol=0)


def test_apc_weight_gap_equals_v_apc_gap():
    p = random_statements(batch=16, statements=9, seed=3)
    p["mask"][:, 6:] = False  # some padding too
    w12, w21 = apc_pair_weights(**p)
    v1 = v_apc(p["p_rel"], p["p_ent_1"], p["p_con_1"], p["mask"])
    v2 = v_apc(p["p_rel"], p["p_ent_2"], p["p_con_2"], p["mask"])
    torch.testing.assert_close(w12 - w21, v1 - v2)
    assert torch.all(w12 >= 0) and torch.all(w21 >= 0)
    assert torch.all(w12 + w21 > (w12 - w21).abs())  # with 6 random statements some disagree: the sum keeps it


def test_apc_masked_statements_contribute_nothing():
    p = random_statements(batch=4, statements=5, seed=1)
    want = apc_pair_weights(**{k: v[:, :3] for k, v in p.items()})
    padded = {k: v.clone() for k, v in p.items()}
    padded["mask"][:, 3:] = False
    padded["p_ent_1"][:, 3:] = float("nan")  # garbage in padding must not leak through
    padded["p_rel"][:, 4] = 7.0
    got = apc_pair_weights(**padded)
    torch.testing.assert_close(got, want)


def test_apc_pair_weights_rejects_mismatched_shapes():
    p = random_statements(batch=2, statements=3)
    p["p_con_2"] = p["p_con_2"][:, :2]
    with pytest.raises(ValueError, match="apc_pair_weights"):
        apc_pair_weights(**p)


def test_apc_one_sided_weights_equal_dpo():
    args = torch.randn(4, 5).unbind(0)
    w12 = torch.rand(5) + 0.1
    got, chosen_rewards, _ = apc_weighted_loss(*args, w12, torch.zeros(5), beta=0.3)
    want, want_rewards, _ = dpo_loss(*args, beta=0.3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(chosen_rewards, want_rewards)


def test_apc_equal_weights_average_both_directions():
    pc, pr, rc, rr = torch.randn(4, 5).unbind(0)
    w = torch.rand(5) + 0.1
    got, _, _ = apc_weighted_loss(pc, pr, rc, rr, w, w, beta=0.3)
    forward, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    backward, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.3)
    torch.testing.assert_close(got, (forward + backward) / 2)
    # symmetric in (y1, y2): swapping the pair leaves the loss unchanged
    torch.testing.assert_close(apc_weighted_loss(pr, pc, rr, rc, w, w, beta=0.3)[0], got)


def test_apc_loss_is_dpo_with_label_smoothing_from_the_weights():
    pc, pr, rc, rr = torch.randn(4, 6).unbind(0)
    w12, w21 = torch.rand(6), torch.rand(6)
    got, _, _ = apc_weighted_loss(pc, pr, rc, rr, w12, w21, beta=0.2)
    want, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=w21 / (w12 + w21))
    torch.testing.assert_close(got, want)


def test_apc_identical_responses_give_zero_loss_and_no_nan():
    p = random_statements(batch=3, statements=4)
    p["p_ent_2"], p["p_con_2"] = p["p_ent_1"].clone(), p["p_con_1"].clone()  # row-wise identical responses
    w12, w21 = apc_pair_weights(**p)
    assert torch.all(w12 == 0) and torch.all(w21 == 0)
    chosen, rejected = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    losses, _, _ = apc_weighted_loss(chosen, rejected, torch.randn(3), torch.randn(3), w12, w21, beta=0.1)
    losses.sum().backward()
    assert torch.all(losses == 0)
    assert torch.all(chosen.grad == 0) and torch.all(rejected.grad == 0)  # finite zeros, not NaN


def test_apc_weights_are_labels_not_parameters():
    w12, w21 = torch.tensor([0.6], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    chosen = torch.tensor([-1.0], requires_grad=True)
    losses, _, _ = apc_weighted_loss(chosen, logps(-2), logps(-1), logps(-1), w12, w21, beta=0.1)
    losses.sum().backward()
    assert w12.grad is None and w21.grad is None and chosen.grad is not None


def test_apc_rejects_negative_weights():
    with pytest.raises(ValueError, match=">= 0"):
        apc_weighted_loss(logps(0), logps(0), logps(0), logps(0), logps(-0.1), logps(0.5), beta=0.1)


# --- parity with TRL 1.16's DPOTrainer on the same batch -----------------------------------------------------

PAIRS = {
    "prompt": ["where do you live ?", "what is your job ?", "where ?", "do you live in lyon ?"],
    # leading spaces: TRL tokenizes prompt + completion as one string; completions of different lengths make
    # IPO's per-token averaging matter
    "chosen": [" i live in lyon", " i a baker", " paris", " i do"],
    "rejected": [" paris", " i live in paris in paris", " what", " i live in a lyon"],
}


def trl_trainer(tmp_path, monkeypatch, **args):
    """(tokenizer, DPOTrainer) over PAIRS: a 2-layer Llama policy moved off its reference copy, TRL 1.16 args."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = "<pad> </s> <unk> where do you live ? i in lyon paris what is your job a baker".split()
    raw = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
    ))  # fmt: skip
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # move the policy off the reference, else every loss is its h = 0 value
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    config = DPOConfig(output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none",
                       save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, **args)
    return tok, DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_dict(PAIRS),
                           processing_class=tok)


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "max_length"), [("sigmoid", 64), ("ipo", 64), ("sigmoid", 9)])
def test_losses_match_trl_dpo_trainer(loss_type, max_length, tmp_path, monkeypatch):
    """Our build_pair_batch, pair_logps and loss reproduce DPOTrainer's batch, log-probs and loss; also with
    max_length 9, which cuts the completions of two pairs (TRL keeps the start of prompt + completion, as we do while
    the prompt fits; a prompt longer than max_length keeps its end here, and at least one completion token, where
    TRL would keep no completion token at all)."""
    from alignment.logps import build_pair_batch, pair_logps

    beta = 0.1
    tok, trainer = trl_trainer(tmp_path, monkeypatch, per_device_train_batch_size=4, max_length=max_length,
                               beta=beta, loss_type=[loss_type])

    # same layout: TRL's collator on its own tokenized rows, in order, equals our batch
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS["prompt"]))])
    ours = build_pair_batch(tok, PAIRS["prompt"], PAIRS["chosen"], PAIRS["rejected"], max_length=max_length)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key
    if max_length < 64:  # the cut happened: rows of max_length tokens, some without their EOS
        assert ours["input_ids"].shape[1] == max_length and (ours["input_ids"][:, -1] != tok.eos_token_id).any()

    batch = next(iter(trainer.get_train_dataloader()))  # shuffled: the rows' order is TRL's, not ours
    average = LENGTH_AVERAGED[loss_type]
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)  # summed, on the policy
        policy = pair_logps(trainer.model, batch, average=average)
        ref = pair_logps(trainer.ref_model, batch, average=average)
        summed = pair_logps(trainer.model, batch)
        summed_ref = pair_logps(trainer.ref_model, batch)
    torch.testing.assert_close(summed[0], trl_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(summed[1], trl_rejected, atol=1e-5, rtol=0)

    losses, chosen_rewards, _ = LOSSES[loss_type](*policy, *ref, beta)
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-5, rtol=1e-6)
    at_reference = {"sigmoid": math.log(2), "ipo": 1 / (2 * beta) ** 2}[loss_type]
    assert abs(trl_loss.item() - at_reference) > 1e-3  # the policy differs from the reference enough to tell
    if loss_type == "sigmoid":  # TRL logs rewards from summed log-ratios, as dpo_loss returns them
        logged = trainer._metrics["train"]["rewards/chosen"][-1]
        torch.testing.assert_close(chosen_rewards.mean().item(), logged, atol=1e-6, rtol=0)
    else:  # the other length convention gives a different IPO loss: the test can tell sum from average
        wrong = ipo_loss(*summed, *summed_ref, beta)[0].mean()
        assert abs(wrong.item() - trl_loss.item()) > 1e-2


@pytest.mark.slow
def test_label_smoothing_matches_trl_on_single_pairs(tmp_path, monkeypatch):
    """dpo_loss with label smoothing eps (conservative DPO, the form eq. 9's soft labels take) against TRL 1.16,
    whose sigmoid loss ignores label_smoothing: its `aot` loss is -(1 - eps) log s(b d) - eps log s(-b d) over
    log-ratio differences d sorted across the batch, which for a batch of one pair is exactly this loss."""
    from alignment.logps import pair_logps

    beta, eps = 0.1, 0.25
    _, trainer = trl_trainer(tmp_path, monkeypatch, per_device_train_batch_size=1, max_length=64, beta=beta,
                             loss_type=["aot"], label_smoothing=eps)
    for i in range(len(PAIRS["prompt"])):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch)
            ours = dpo_loss(*pair_logps(trainer.model, batch), *pair_logps(trainer.ref_model, batch), beta=beta,
                            label_smoothing=eps)[0]
            plain = dpo_loss(*pair_logps(trainer.model, batch), *pair_logps(trainer.ref_model, batch), beta=beta)[0]
        torch.testing.assert_close(ours[0], trl_loss, atol=1e-6, rtol=1e-6)
        assert abs(plain.item() - trl_loss.item()) > 1e-4  # the smoothing changes the loss enough to tell
