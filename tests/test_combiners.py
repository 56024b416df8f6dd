"""decoding.combiners: worked numbers for GenARM, Drift and ARGS, and PAD against the released `generate_step`."""

import math

import pytest
import torch

from decoding import combiners

ln = math.log


def test_genarm_worked_numbers():
    # base probs (1/4, 3/4), RM probs (3/4, 1/4): alpha = 1 multiplies them to equal scores, alpha = 2 favours token 0
    base = torch.tensor([[0.0, ln(3)]])
    arm = torch.tensor([[ln(3), 0.0]])
    one = combiners.genarm_scores(base, arm, torch.tensor([1.0]))
    torch.testing.assert_close(one, torch.tensor([[ln(3 / 16), ln(3 / 16)]]))
    two = combiners.genarm_scores(base, arm, torch.tensor([2.0]))
    torch.testing.assert_close(two, torch.tensor([[ln(1 / 4) + 2 * ln(3 / 4), ln(3 / 4) + 2 * ln(1 / 4)]]))
    assert two.argmax().item() == 0 and combiners.genarm_scores(base, arm, torch.tensor([0.0])).argmax().item() == 1


def test_drift_worked_numbers():
    # neutral prompt: uniform over 3 tokens; the attribute prompt doubles token 0's odds: p = (1/2, 1/4, 1/4).
    # r = log p_attr - log p_neutral = (ln 3/2, ln 3/4, ln 3/4); weight 1, beta 0.5: scores = z_b + 2 r
    base = torch.tensor([[1.0, 0.0, 0.0]])
    prompted = torch.tensor([[[0.0, 0.0, 0.0], [ln(2), 0.0, 0.0]]])  # (B, 1 + m, V)
    scores = combiners.drift_scores(base, prompted, torch.tensor([[1.0]]), torch.tensor([0.5]))
    torch.testing.assert_close(scores, torch.tensor([[1 + 2 * ln(1.5), 2 * ln(0.75), 2 * ln(0.75)]]))
    # a negative weight moves away from the attribute, and beta scales the move
    away = combiners.drift_scores(base, prompted, torch.tensor([[-1.0]]), torch.tensor([1.0]))
    torch.testing.assert_close(away, torch.tensor([[1 - ln(1.5), -ln(0.75), -ln(0.75)]]))


def test_args_worked_numbers():
    base = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    ids = torch.tensor([[1, 2]])  # the base top-2
    rewards = torch.tensor([[0.5, 2.0]])  # R(prefix + token 1), R(prefix + token 2)
    scores = combiners.args_scores(base, ids, rewards, torch.tensor([1.0]))
    inf = float("-inf")
    torch.testing.assert_close(scores, torch.tensor([[inf, 3.5, 4.0, inf]]))
    assert combiners.args_scores(base, ids, rewards, torch.tensor([0.0])).argmax().item() == 1  # w = 0: the base


def released_generate_step(base: torch.Tensor, guide: torch.Tensor, weight: float, k: int) -> tuple[int, torch.Tensor]:
    """PAD's released greedy step (zjuruizhechen/PAD inference/PAD.py, same-tokenizer branch), written from its
    formula for one row: on the base top-k, new = base_topk + weight * (log_softmax(guide_topk) -
    log_softmax(base_topk)); the token is the argmax of new."""
    prescreen_logits, prescreen_tokens = torch.topk(base, k)
    rewards = guide[prescreen_tokens].log_softmax(-1) - prescreen_logits.log_softmax(-1)
    new_scores = rewards * weight + prescreen_logits
    return int(prescreen_tokens[new_scores.argmax()]), new_scores


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_pad_equals_the_released_generate_step(weight, k):
    g = torch.Generator().manual_seed(int(weight * 10) + k)
    base, guide = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    scores = combiners.pad_scores(base, guide, torch.full((6,), weight), k)
    for row in range(6):
        token, released = released_generate_step(base[row], guide[row], weight, k)
        assert scores[row].argmax().item() == token
        support = torch.topk(base[row], k).indices
        torch.testing.assert_close(scores[row, support], released, atol=1e-5, rtol=0)
        assert torch.isneginf(scores[row]).sum().item() == 50 - k  # outside the top-k: -inf
