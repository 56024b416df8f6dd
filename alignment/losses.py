"""Preference losses as pure functions: DPO (sigmoid), IPO, and the APC per-statement weighted DPO.

Every loss has the contract shared by the DPO repo, torchtune, open-instruct and TRL's sigmoid branch:

    loss_fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, ...)
        -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,))

Inputs are per-sequence log-probs of the completion tokens (`alignment.logps.sequence_logps`), one number per
pair. The rewards are the implicit DPO rewards beta * log(pi / pi_ref), detached: they are for logging
(reward accuracy, margins), never for gradients. The caller takes `losses.mean()`.

Which log-probs a loss expects, summed over completion tokens or averaged, is part of its contract and is
written in `LENGTH_AVERAGED`: DPO takes sums (as in the paper and TRL), IPO takes per-token averages (as in
TRL 1.16, whose authors confirmed that normalization with the IPO authors). Entry points read the table, so a
loss is never fed the wrong kind.
"""

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss, Eq. 7 of arXiv:2305.18290, with optional conservative label smoothing (cDPO).

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = 0 is plain DPO; eps > 0 says "the label is wrong with probability eps" (cDPO, Mitchell 2023), and may
    be a (B,) tensor of per-pair label noise. Policy equal to reference gives h = 0 and loss = log 2.

    Args: the four log-probs are (B,) sums over completion tokens; beta > 0 is the KL strength.
    Returns: losses (B,), chosen_rewards (B,) = beta * chosen log-ratio, rejected_rewards (B,), rewards detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    # logsigmoid rather than log(sigmoid(.)): stays finite for margins of hundreds of nats
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO loss, Eq. 17 of arXiv:2310.12036, with beta in the role of the paper's tau.

        loss = (h - 1 / (2 * beta))^2,   h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))

    Feed it **length-averaged** log-probs (`sequence_logps(..., average=True)`): that is TRL 1.16's `ipo`,
    which divides each summed log-ratio by its completion length, so that the target margin 1 / (2 beta) is
    per token and does not grow with the completion. With summed log-probs the same beta asks for a margin of
    1 / (2 beta) nats over the whole sequence (50 nats at FSPO's beta = 0.01). Unlike DPO the loss is not
    monotone in h: margins beyond the target are pulled back, which is IPO's guard against overfitting.

    Args: the four log-probs are (B,) per-token averages over completion tokens; beta > 0.
    Returns: losses (B,), chosen_rewards (B,), rejected_rewards (B,): beta times the (averaged) log-ratios,
    detached. TRL logs rewards from summed log-ratios instead, so its `rewards/*` differ from these by the
    completion length.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def apc_pair_weights(
    p_rel: torch.Tensor,
    p_ent_1: torch.Tensor,
    p_con_1: torch.Tensor,
    p_ent_2: torch.Tensor,
    p_con_2: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-statement votes for each direction of an ordered pair (y1, y2), our reading of APC eq. 9.

    Each persona statement i votes for the response that satisfies it better, with the APC constraint that
    applies to it: the active one (entailment) with weight P_rel,i, the passive one (no contradiction) with
    weight 1 - P_rel,i (arXiv:2405.07726, eqs. 3-5 and 8-9; apc_fspo.md §1.1):

        w12 = sum_i mask_i * [P_rel,i (P_ent,i(y1) - P_ent,i(y2))_+ + (1 - P_rel,i) (P_con,i(y2) - P_con,i(y1))_+]
        w21 = the same with y1 and y2 swapped,  (x)_+ = max(x, 0)

    Then w12 - w21 = V_APC(y1) - V_APC(y2) with V_APC(y) = sum_i P_rel,i P_ent,i(y) + (1 - P_rel,i)(1 - P_con,i(y)):
    the direction agrees with the scalar APC gap that the official code ranks by, while w12 + w21 keeps how much
    the statements disagree with each other (two statements pulling in opposite directions cancel in the gap
    but not in the sum).

    Args: all (B, S) tensors of probabilities for B pairs and S statements (padded); mask (B, S) is 1 (or True)
    for real statements and 0 for padding. Padded entries may hold anything, NaN included: they are selected
    out, not multiplied by zero.
    Returns: w12 (B,), w21 (B,), both >= 0.
    """
    shapes = {t.shape for t in (p_rel, p_ent_1, p_con_1, p_ent_2, p_con_2, mask)}
    if len(shapes) != 1 or p_rel.dim() != 2:
        raise ValueError(f"apc_pair_weights: expected six (B, S) tensors of one shape, got shapes {sorted(shapes)}")
    keep = mask.bool()
    # (x)_+ terms, each (B, S): how much statement i prefers y1 (resp. y2) under its active and passive constraint
    active_12 = p_rel * (p_ent_1 - p_ent_2).clamp(min=0)
    passive_12 = (1 - p_rel) * (p_con_2 - p_con_1).clamp(min=0)
    active_21 = p_rel * (p_ent_2 - p_ent_1).clamp(min=0)
    passive_21 = (1 - p_rel) * (p_con_1 - p_con_2).clamp(min=0)
    zero = torch.zeros((), dtype=p_rel.dtype, device=p_rel.device)
    w12 = torch.where(keep, active_12 + passive_12, zero).sum(dim=1)  # (B,)
    w21 = torch.where(keep, active_21 + passive_21, zero).sum(dim=1)  # (B,)
    return w12, w21


def apc_weighted_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    w12: torch.Tensor,
    w21: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relevance-weighted APC DPO loss: a soft-label DPO whose label comes from per-statement votes.

    Here "chosen" is y1 and "rejected" is y2 of an ordered pair; nothing requires y1 to be the better one.
    With l(a > b) the sigmoid DPO loss of the ordered pair (`dpo_loss`) and (w12, w21) from `apc_pair_weights`:

        loss = (w12 * l(y1 > y2) + w21 * l(y2 > y1)) / (w12 + w21)

    This is our reading of APC eq. 9 (L_APC = sum_i P_rel,i L_DPO(active) + (1 - P_rel,i) L_DPO(passive)),
    which the official code never shipped: it ranks by the scalar APC gap and runs plain DPO (apc_fspo.md §1.1).
    It equals `dpo_loss` with label_smoothing = w21 / (w12 + w21): w21 = 0 is plain DPO on (y1, y2), and
    w12 = w21 is the symmetric average of both directions, which pushes the margin towards 0.
    A row with w12 + w21 = 0 (identical responses, or every statement indifferent) carries no preference:
    its loss is exactly 0 and its gradient 0, not NaN.

    Args: the four log-probs are (B,) sums over completion tokens; w12, w21 (B,) >= 0 are treated as labels
    (detached); beta > 0.
    Returns: losses (B,), rewards of y1 (B,) and of y2 (B,), detached.
    """
    if bool((w12 < 0).any()) or bool((w21 < 0).any()):
        raise ValueError("apc_weighted_loss: w12 and w21 must be >= 0 (sums of (x)_+ votes from apc_pair_weights)")
    w12, w21 = w12.detach(), w21.detach()
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    total = w12 + w21  # (B,)
    # a zero total has a zero numerator too; dividing by 1 there gives loss 0 without a 0/0
    denominator = torch.where(total > 0, total, torch.ones_like(total))
    losses = (w12 * -F.logsigmoid(logits) + w21 * -F.logsigmoid(-logits)) / denominator
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# Losses with the plain four-log-prob contract; `apc_weighted_loss` needs (w12, w21) and is called by name.
LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss}

# Whether a loss expects per-token averaged log-probs (True) or sums over the completion (False).
LENGTH_AVERAGED = {"sigmoid": False, "ipo": True, "apc_weighted": False}
