"""Per-step combination rules of decoding-time personalization: pure functions, tensors in, scores out.

Every function takes the base model's next-token scores `base` (B, V) for one step, whatever its guides
produced for the same step, and per-row preference tensors (one user per row: w, alpha, beta, weights), and
returns new scores (B, V) in float32 that a greedy argmax or a softmax(scores / T) sampler reads. Tokens outside a
rule's support come back as -inf.

The research notes (research/decoding.md §1.3, §2.4, §3.1, §3.3, §7.4) give the rules and their pitfalls:

    PAD     K = topk(z_b, k);  s(a) = z_b(a) + w * (logsoftmax_K z_g (a) - logsoftmax_K z_b (a)),  a in K
            = (1 - w) z_b(a) + w z_g(a) + const on K           (arXiv:2410.04070, official code)
    Drift   s = z_b + (1 / beta) sum_i p_i (log pi_s(. | s_i) - log pi_s(. | s_0))        (arXiv:2502.14289)
    GenARM  s = log pi_b + alpha log pi_arm                                              (arXiv:2410.08193)
    ARGS    s(v) = z_b(v) + w * R(prefix + v),  v in topk(z_b, k)                         (arXiv:2402.01694)

Numerics (research/decoding.md §7.4): everything is upcast to fp32 before any difference is taken (a bf16 logit
near 10 has a spacing of 0.0625); guide log-probs are floored at LOGP_FLOOR so that `0 * logp` and
`-inf - -inf` never produce NaN; and `keep_masked` re-applies the -inf of the incoming scores (tokens that an
earlier processor banned, e.g. EOS under min_new_tokens) after the combination, because a rule that adds a
finite guide term would otherwise revive them, and -inf - -inf = NaN would make argmax pick the banned token
(ecosystem.md §5.2: that bug ended generation after one token).
"""

from __future__ import annotations

import torch

# Floor for log-probs: far below any real log-prob (log(1/V) for V = 256k is -12.5) and far above the fp32
# minimum, so `w * floor` stays finite for any weight a user sets.
LOGP_FLOOR = -1e4


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the last dim, floored at LOGP_FLOOR (shape unchanged)."""
    return logits.float().log_softmax(-1).clamp(min=LOGP_FLOOR)


def keep_masked(scores: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
    """`combined` with every -inf of the incoming `scores` restored, and any NaN turned into -inf. (B, V) both."""
    banned = torch.isneginf(scores) | torch.isnan(combined)
    return combined.masked_fill(banned, float("-inf"))


def topk_support(base: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest base scores and their token ids, each (B, k); k is capped at V."""
    return base.float().topk(min(k, base.shape[-1]), dim=-1)


def scatter_support(base: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, V) scores that are `values` (B, k) at `ids` (B, k) and -inf elsewhere."""
    out = torch.full(base.shape, float("-inf"), dtype=torch.float32, device=base.device)
    return out.scatter(-1, ids, values)


def pad_scores(base: torch.Tensor, guide: torch.Tensor, w: torch.Tensor, k: int = 10) -> torch.Tensor:
    """PAD's step (official `generate_step`): base logits plus w times the guide-vs-base log-ratio on the base top-k.

    Args: base (B, V) base logits (-inf where banned); guide (B, V) logits of the preference-conditioned guide on
    the same tokens; w (B,) per-row weight (0: plain base, 1: the guide's argmax inside the base top-k, 1.5:
    extrapolation past the guide); k: support size (10 in every released config).
    Both terms are renormalized over the same support K, so on K the score equals (1 - w) z_b + w z_g up to a
    per-row constant; a banned token inside K (fewer than k allowed tokens) stays -inf.
    """
    values, ids = topk_support(base, k)  # (B, k)
    g = guide.float().gather(-1, ids)  # (B, k)
    ratio = log_probs(g) - log_probs(values)  # (B, k)
    s = values + w.float().view(-1, 1) * ratio
    return scatter_support(base, ids, s.masked_fill(torch.isneginf(values), float("-inf")))


def drift_scores(base: torch.Tensor, prompted: torch.Tensor, weights: torch.Tensor,
                 beta: torch.Tensor) -> torch.Tensor:
    """Drift's step: z_b + (1 / beta) sum_i p_i (log pi_s(. | s_i) - log pi_s(. | s_0)), full support.

    Args: base (B, V) base logits; prompted (B, 1 + m, V) the small model's logits on the same tokens under the
    neutral prompt s_0 (index 0) and the m attribute prompts s_i; weights (B, m) per-row attribute weights p;
    beta (B,) per-row strength (smaller = stronger).
    Log-probs rather than raw logits: each context has its own normalizer; the difference of two log-softmaxes is
    the token-level attribute reward r_i of the paper, and stays meaningful when rows are mixed.
    """
    logp = log_probs(prompted)  # (B, 1 + m, V)
    ratios = logp[:, 1:] - logp[:, :1]  # (B, m, V)
    drift = torch.einsum("bm,bmv->bv", weights.float(), ratios)  # one einsum for all users, no Python loop
    return base.float() + drift / beta.float().view(-1, 1)


def genarm_scores(base: torch.Tensor, arm: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """GenARM's step: log pi_b + alpha * log pi_arm, (B, V), alpha (B,) per row.

    GenARM samples pi_b * pi_arm^alpha at temperature 1; the official code goes through model-arithmetic, which
    divides by the sum of coefficients and compensates with T = 1 / (1 + alpha). Here temperature acts on these
    scores directly (T = 1 samples the product distribution), so no compensation is needed.
    """
    return log_probs(base) + alpha.float().view(-1, 1) * log_probs(arm)


def args_scores(base: torch.Tensor, ids: torch.Tensor, rewards: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ARGS's step: z_b(v) + w * R(prefix + v) on the candidates `ids` (B, k), -inf elsewhere.

    Args: base (B, V) base logits; ids (B, k) the candidate tokens (the base top-k); rewards (B, k) the sequence
    reward of each prefix extended by its candidate; w (B,) per-row weight.
    """
    values = base.float().gather(-1, ids)
    s = values + w.float().view(-1, 1) * rewards.float()
    return scatter_support(base, ids, s.masked_fill(torch.isneginf(values), float("-inf")))
