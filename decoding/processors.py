"""Guided-decoding rules for a batch of users, usable with transformers `model.generate` and with our own loop.

A *rule* is a per-batch object with two calls (the `Rule` protocol):

    scores = rule(scores)     # (B, V) base scores of this step -> combined fp32 scores, -inf outside the support
    rule.advance(tokens)      # (B,) the tokens emitted this step: advance every guide cache by them

The four methods are built by small functions (`pad_rule`, `drift_rule`, `genarm_rule`, `args_rule`) from
guides (decoding/guides.py), per-row preference tensors and a combiner (decoding/combiners.py). One batch may mix
users with different preferences: every preference value is a (B,) or (B, m) tensor, one row per user.

`RuleProcessor(rule)` makes any rule a transformers `LogitsProcessor`. transformers calls processors with the
full `input_ids` (B, L) and runs user processors after its own masks (repetition penalty, min-length, bad words)
and before temperature / top-k / top-p (ecosystem.md §5.1), so the rule sees raw base logits and its output is
what the sampler warps. The processor owns no guide state: it advances the rule by `input_ids[:, -1]` on every
call after the first and checks that exactly one token arrived since the last call. It refuses beam search and
`num_return_sequences > 1` (the batch would not be the rule's rows), and a second `generate` call (a stale cache:
build one rule per batch).
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
from transformers import LogitsProcessor

from decoding import combiners
from decoding.guides import CandidateReward, Guide


class Rule(Protocol):
    def __call__(self, scores: torch.Tensor) -> torch.Tensor: ...

    def advance(self, tokens: torch.Tensor) -> None: ...


class GuideRule:
    """Scores = combine(base scores (B, V), guide logits (B, c, V)) over one guide, where `index` (B, c) names the
    guide row of each of a user's c contexts (c = 1 for PAD and GenARM, 1 + m for Drift). Rows may be shared: an
    inactive Drift attribute points at its user's neutral row, so its log-ratio is 0 and its row is never built."""

    def __init__(self, guide: Guide, combine, index: torch.Tensor | None = None):
        index = torch.arange(guide.rows).view(-1, 1) if index is None else index
        row_user = torch.full((guide.rows,), -1, dtype=torch.long)
        row_user[index.flatten()] = torch.arange(len(index)).repeat_interleave(index.shape[1])
        if (row_user < 0).any():
            raise ValueError(f"guide rows {torch.nonzero(row_user < 0).flatten().tolist()} belong to no user")
        # on the guide's device once, not copied there at every step
        self.guide, self.combine = guide, combine
        self.index, self.row_user = index.to(guide.device), row_user.to(guide.device)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        B, V = scores.shape
        g = self.guide.logits[..., :V]  # a guide with a padded vocabulary: ids beyond V are never emitted
        if len(self.index) != B or g.shape[-1] != V:
            raise ValueError(f"guide logits {tuple(g.shape)} for {len(self.index)} users do not match scores "
                             f"{tuple(scores.shape)}")
        g = g[self.index].to(scores.device)  # (B, c, V)
        return combiners.keep_masked(scores, self.combine(scores, g if g.shape[1] > 1 else g[:, 0]))

    def advance(self, tokens: torch.Tensor) -> None:
        # every context of a user gets the user's token: contexts differ in their prompts, never in the answer
        self.guide.advance(tokens[self.row_user.to(tokens.device)])


class CandidateRule:
    """ARGS: the base top-k candidates of every row rescored by a `CandidateReward` in one call."""

    def __init__(self, reward: CandidateReward, w: torch.Tensor, top_k: int):
        self.reward, self.w, self.top_k = reward, w, top_k

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        _, ids = combiners.topk_support(scores, self.top_k)
        rewards = self.reward.score(ids).to(scores.device)
        return combiners.keep_masked(scores, combiners.args_scores(scores, ids, rewards, self.w.to(scores.device)))

    def advance(self, tokens: torch.Tensor) -> None:
        self.reward.advance(tokens)


def _rows(value, batch: int, device=None) -> torch.Tensor:
    """A float or a sequence/tensor of per-row values as a (B,) float32 tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.expand(batch).clone() if t.dim() == 0 else t


def pad_rule(guide: Guide, w, top_k: int = 10) -> GuideRule:
    """PAD: top-k interpolation between the base and a preference-conditioned guide; w float or (B,)."""
    return GuideRule(guide, partial(combiners.pad_scores, w=_rows(w, guide.rows, guide.device), k=top_k))


def genarm_rule(arm: Guide, alpha) -> GuideRule:
    """GenARM: base log-probs + alpha * autoregressive-RM log-probs; alpha float or (B,)."""
    return GuideRule(arm, partial(combiners.genarm_scores, alpha=_rows(alpha, arm.rows, arm.device)))


def drift_rows(active: torch.Tensor) -> list[tuple[int, int]]:
    """The (user, context) of each guide row Drift needs: per user its neutral context 0, then the attribute
    contexts i = 1..m with active[user, i - 1]; build the guide's prompt rows in this order. (B, m) bool in."""
    return [(b, i) for b in range(len(active)) for i in range(active.shape[1] + 1) if i == 0 or active[b, i - 1]]


def drift_rule(guide: Guide, weights: torch.Tensor, beta, active: torch.Tensor | None = None) -> GuideRule:
    """Drift: weights (B, m) over the attribute prompts; beta float or (B,).

    The guide's rows follow `drift_rows(active)`: with `active` None every attribute has a row (B (1 + m) rows,
    user b's neutral context at row b (1 + m)); with active = weights != 0 (the sparse fit) only B + nnz rows are
    built, the ragged activation of research/decoding.md §7.2, and the scores are the same.
    """
    weights = torch.as_tensor(weights, dtype=torch.float32)
    B, m = weights.shape
    active = torch.ones(B, m, dtype=torch.bool) if active is None else torch.as_tensor(active, dtype=torch.bool)
    rows = drift_rows(active)
    if len(rows) != guide.rows:
        raise ValueError(f"drift: the guide has {guide.rows} rows, drift_rows(active) needs {len(rows)}")
    index = torch.empty(B, 1 + m, dtype=torch.long)
    for r, (b, i) in enumerate(rows):
        index[b, i] = r
    neutral = index[:, :1].expand(B, 1 + m)
    index = torch.where(torch.cat([torch.ones(B, 1, dtype=torch.bool), active], 1), index, neutral)
    return GuideRule(guide, partial(combiners.drift_scores, weights=weights.to(guide.device),
                                    beta=_rows(beta, B, guide.device)), index)


def args_rule(reward: CandidateReward, w, top_k: int = 10, batch: int | None = None) -> CandidateRule:
    """ARGS: base top-k rescored by `reward`; w float or (B,) (a float needs `batch`)."""
    w = torch.as_tensor(w, dtype=torch.float32)
    return CandidateRule(reward, w.expand(batch).clone() if w.dim() == 0 else w, top_k)


class RuleProcessor(LogitsProcessor):
    """Any rule as a transformers LogitsProcessor: `model.generate(..., logits_processor=[RuleProcessor(rule)])`.

    Greedy or sampling with one sequence per prompt. Build a new rule (and processor) for every generate call.
    """

    def __init__(self, rule: Rule, batch_size: int):
        self.rule, self.batch_size, self.length = rule, batch_size, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"RuleProcessor: {input_ids.shape[0]} rows for a rule built for {self.batch_size}; "
                             "beam search and num_return_sequences > 1 are not supported")
        if self.length is not None:
            if input_ids.shape[1] != self.length + 1:
                raise ValueError(f"RuleProcessor: got {input_ids.shape[1]} tokens after {self.length}; the guides "
                                 "must advance one token per call (build a new rule for every generate call)")
            self.rule.advance(input_ids[:, -1])
        self.length = input_ids.shape[1]
        return self.rule(scores)
