"""Per-request personalization for the decode API: what a request asks for, resolved against the user's stored
profile, turned into token rows, and, for a batch of requests, into ONE rule over all of its rows.

A request's `personalization` object (all fields optional):

    method             none | prompt | pad | drift | genarm | args                      (default: none)
    user_id            a stored profile (decoding/profiles.py) supplying persona and/or attribute weights
    persona            preference text, used instead of the profile's
    attribute_weights  {attribute: weight} over the Drift attribute prompts, used instead of the profile's
    strength           the method's weight (default per method in the server config):
                           pad: w (0 = base, 1 = guide argmax in the base top-k)     PAD, arXiv:2410.04070
                           drift: 1 / beta                                           Drift, arXiv:2502.14289
                           genarm: alpha                                             GenARM, arXiv:2410.08193
                           args: w                                                   ARGS, arXiv:2402.01694
                           prompt, none: unused

What each method reads (the same prompts as `decoding.generate`'s arms):

    method   base model reads          guide rows read                              needs
    none     the prompt                -                                            -
    prompt   prompt + persona          -                                            persona
    pad      prompt + persona          pad guide: prompt + persona                  persona, guides_dir/pad
    pad      the prompt                the base itself: prompt + persona            persona (pad_guide: base)
    genarm   prompt + persona          arm guide: prompt + persona                  persona, guides_dir/arm
    args     prompt + persona          rm: prompt + persona                         persona, guides_dir/rm
    drift    the prompt                drift guide: prompt + s_0, prompt + s_i      weights, drift.json + its guide

"prompt + persona" is the persona appended to the system turn of a chat (how the world's data state
preferences; a chat without one gets the template's default system text first, `alignment.sampling.default_system`),
or written on a line before a plain completion prompt. Self-guided PAD (`pad_guide: base`, PAD's zero-training
case, arXiv:2410.04070) uses the base itself as the personalized model, so the base must read the prompt without
the persona: if both read it, PAD is prompting at twice the cost. Zero-shot Drift (`drift_guide: base`) scores
the attribute prompts with the base itself.

Batching: `build_rule(guidance, rows)` groups a batch's rows by method and builds one rule per method present
(decoding/processors.py: one guide forward per model per step for all its rows, per-row strengths and weights),
composed by `RowGroupsRule`; rows of none/prompt keep the base scores bit for bit. Rows leave and join a running
batch between steps (`RowGroupsRule.select` / `merge`, decoding/scheduler.py) with their guides' cache rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

METHODS = ("none", "prompt", "pad", "drift", "genarm", "args")
PREFERENCE_BASE = {"prompt", "pad", "genarm", "args"}  # the base model reads the persona
GUIDE_OF = {"pad": "pad", "genarm": "arm", "args": "rm"}  # method -> guide directory under guides_dir


class PersonalizationError(ValueError):
    """A request that cannot be served as asked: HTTP `status`, the request field `param`, one-line message."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class Guidance:
    """Everything rules are built from: tokenizer, base model, loaded guides, Drift prompts, settings."""

    tokenizer: Any
    base: Any
    guides: dict[str, Any] = field(default_factory=dict)  # pad / arm / rm models that guides_dir provides
    drift_prompts: dict | None = None  # {"neutral": str, "attributes": {name: str}} from guides_dir/drift.json
    drift_guide: str = "pad"  # the small LM under the Drift prompts: a guide name or "base"
    strengths: dict[str, float] = field(default_factory=dict)  # default strength per method
    pad_top_k: int = 10
    args_top_k: int = 10
    guides_dir: str | None = None
    pad_guide: str = "pad"  # PAD's personalized model: the pad guide, or "base" (self-guided)

    @property
    def attributes(self) -> list[str]:
        return list(self.drift_prompts["attributes"]) if self.drift_prompts else []

    def drift_model(self):
        return self.base if self.drift_guide == "base" else self.guides.get(self.drift_guide)

    def guide_model(self, method: str):
        """The model of a method's guide rows (PAD's may be the base itself), or None when it is not loaded."""
        if method == "drift":
            return self.drift_model()
        if method == "pad" and self.pad_guide == "base":
            return self.base
        return self.guides.get(GUIDE_OF[method])

    def base_reads_persona(self, method: str) -> bool:
        return method in PREFERENCE_BASE and not (method == "pad" and self.pad_guide == "base")

    def served(self) -> list[str]:
        """The methods this server can run."""
        return [m for m in METHODS if self.missing(m) is None]

    def missing(self, method: str) -> str | None:
        """Why `method` cannot run on this server (one line naming what is missing), or None."""
        where = f"guides_dir {self.guides_dir}" if self.guides_dir else "no guides_dir configured"
        if method in GUIDE_OF and self.guide_model(method) is None:
            return (f"method {method!r} needs the {GUIDE_OF[method]!r} guide, which this server has not loaded "
                    f"({where})")
        if method == "drift" and (self.drift_prompts is None or self.drift_model() is None):
            return (f"method 'drift' needs drift.json and the {self.drift_guide!r} guide, which this server has not "
                    f"loaded ({where})")
        return None


@dataclass
class Resolved:
    """A request's personalization after the profile lookup: what `encode_rows` and `build_rule` read."""

    method: str = "none"
    strength: float = 0.0
    persona: str = ""
    weights: list[float] | None = None  # (m,) in Guidance.attributes order, drift only
    user_id: str | None = None

    def echo(self, attributes: list[str]) -> dict:
        out = {"method": self.method, "strength": self.strength, "user_id": self.user_id,
               "persona": self.persona or None}
        out["attribute_weights"] = dict(zip(attributes, self.weights, strict=True)) if self.weights else None
        return out


# Drift's weights multiply log-prob differences of a few nats: |w| = 100 already swamps the base model entirely.
MAX_WEIGHT = 100.0


def weight_vector(weights: dict[str, float], attributes: list[str], param: str) -> list[float]:
    """{attribute: weight} -> (m,) list in `attributes` order (absent = 0); unknown names (every name, on a server
    without Drift attributes) and weights outside [-MAX_WEIGHT, MAX_WEIGHT] are a 400."""
    unknown = sorted(set(weights) - set(attributes))
    if unknown:
        known = ", ".join(attributes) if attributes else "none (this server serves no Drift attributes)"
        raise PersonalizationError(f"unknown attributes {unknown}; known: {known}", param)
    if not all(math.isfinite(v) and abs(v) <= MAX_WEIGHT for v in weights.values()):
        raise PersonalizationError(f"attribute weights must be numbers in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]", param)
    return [float(weights.get(a, 0.0)) for a in attributes]


def resolve(request: dict | None, profile: dict | None, guidance: Guidance) -> Resolved:
    """The personalization of one request: inline fields override the profile's; checks what the method needs."""
    request = request or {}
    method = request.get("method") or "none"
    if method not in METHODS:
        raise PersonalizationError(f"unknown method {method!r}; known: {', '.join(METHODS)}", "personalization.method")
    profile = profile or {}
    out = Resolved(method=method, user_id=request.get("user_id"))
    out.persona = request.get("persona") if request.get("persona") is not None else profile.get("persona") or ""
    strength = request.get("strength")
    out.strength = float(guidance.strengths.get(method, 0.0) if strength is None else strength)
    if method == "none":
        return out
    if method in PREFERENCE_BASE and not out.persona.strip():
        raise PersonalizationError(f"method {method!r} needs preference text: personalization.persona, or a user_id "
                                   "whose profile has a persona", "personalization.persona")
    why = guidance.missing(method)
    if why:
        raise PersonalizationError(why, "personalization.method", code="guide_not_configured")
    if method == "drift":
        weights = request.get("attribute_weights")
        if weights is None:
            weights = profile.get("attribute_weights")
        if weights is None:
            raise PersonalizationError("method 'drift' needs attribute weights: personalization.attribute_weights, "
                                       "or a user_id whose profile has weights or labelled pairs",
                                       "personalization.attribute_weights")
        out.weights = weight_vector(weights, guidance.attributes, "personalization.attribute_weights")
    return out


# --- token rows -----------------------------------------------------------------------------------------------------
def context_text(tokenizer, prompt: str | list[dict], suffix: str) -> str:
    """The text a model reads: a chat (messages) with `suffix` appended to the system turn, rendered with the
    assistant header; or a plain completion prompt with `suffix` on a line before it."""
    from alignment.sampling import default_system, render_prompt, with_system_suffix

    if isinstance(prompt, str):
        return f"{suffix}\n{prompt}" if suffix else prompt
    return render_prompt(tokenizer, with_system_suffix(prompt, suffix, default_system(tokenizer) if suffix else None))


def encode_context(tokenizer, prompt: str | list[dict], suffix: str) -> list[int]:
    """Token ids of `context_text`; special tokens are added for plain prompts only (a chat template writes its
    own), and an empty plain prompt becomes [BOS]."""
    ids = tokenizer(context_text(tokenizer, prompt, suffix), add_special_tokens=isinstance(prompt, str))["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


@dataclass
class RowTokens:
    """One row's token ids: the base prompt and, per guide context, the guide's prompt."""

    base: list[int]
    contexts: list[list[int]]  # pad/genarm/args: [persona context]; drift: [s_0, s_1..s_m contexts]; else []


def encode_rows(guidance: Guidance, prompt: str | list[dict], p: Resolved) -> RowTokens:
    """The base and guide prompts of one request prompt under its resolved personalization."""
    tok = guidance.tokenizer
    base = encode_context(tok, prompt, p.persona if guidance.base_reads_persona(p.method) else "")
    if p.method in GUIDE_OF:
        return RowTokens(base, [encode_context(tok, prompt, p.persona)])
    if p.method == "drift":
        texts = [guidance.drift_prompts["neutral"], *guidance.drift_prompts["attributes"].values()]
        return RowTokens(base, [encode_context(tok, prompt, t) for t in texts])
    return RowTokens(base, [])


# --- rules for a batch ----------------------------------------------------------------------------------------------
@dataclass
class Group:
    """One method's rows of a batch: their batch rows (ascending), personalizations, and the guide state over
    their guide rows (`guide_rows` per user, user-major: 1, or Drift's 1 + nnz), with the rule built over it."""

    method: str
    rows: torch.Tensor  # (n,) long
    people: list[Resolved]
    guide_rows: list[int]
    state: Any  # decoding.guides.Guide | CachedSequenceReward
    rule: Any = None


class RowGroupsRule:
    """Rules over disjoint row groups of one batch (one `Group` per method present): scores[rows] =
    rule(scores[rows]); rows in no group keep their scores unchanged. (B, V) in and out.

    Rows leave (`select`) and join (`merge`) between steps: each group's guide state keeps or gains exactly its
    users' guide rows, and its rule (per-row strengths, weights) is rebuilt over them, so every guide cache stays
    in lockstep with the batch. `fill()` prefills the guides' prompts chunk by chunk (`build_rule(chunk=...)`)."""

    def __init__(self, guidance: Guidance, groups: list[Group]):
        self.g, self.groups = guidance, groups
        for group in groups:
            group.rule = RULES[group.method](guidance, group.state, group.people)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        for group in self.groups:
            idx = group.rows.to(scores.device)
            out[idx] = group.rule(scores[idx])
        return out

    def advance(self, tokens: torch.Tensor) -> None:
        for group in self.groups:
            group.rule.advance(tokens[group.rows.to(tokens.device)])

    def fill(self) -> bool:
        """One prefill chunk of the first guide whose prompt is not all cached yet; True once all are."""
        pending = [group for group in self.groups if not group.state.prompt.done]
        return not pending or (pending[0].state.fill() and len(pending) == 1)

    def select(self, keep: torch.Tensor, rows: int) -> None:
        """Keep the batch rows `keep` (n,) ascending, of `rows`; they become rows 0..n-1."""
        new = torch.full((rows,), -1, dtype=torch.long)
        new[keep.cpu()] = torch.arange(len(keep))
        groups = []
        for group in self.groups:
            where = new[group.rows]
            kept = (where >= 0).tolist()
            if not any(kept):
                continue
            starts = np.cumsum([0, *group.guide_rows])
            guide_keep = [r for b, k in enumerate(kept) if k for r in range(starts[b], starts[b + 1])]
            if not all(kept):
                group.state.select(torch.tensor(guide_keep))
                group.people = [p for p, k in zip(group.people, kept, strict=True) if k]
                group.guide_rows = [n for n, k in zip(group.guide_rows, kept, strict=True) if k]
                group.rule = RULES[group.method](self.g, group.state, group.people)
            group.rows = where[where >= 0]
            groups.append(group)
        self.groups = groups

    def merge(self, other: RowGroupsRule, offset: int) -> None:
        """Append `other`'s rows, which become batch rows offset, offset + 1, ...; its guides' rows join ours."""
        mine = {group.method: group for group in self.groups}
        for group in other.groups:
            group.rows = group.rows + offset
            if group.method not in mine:
                self.groups.append(group)
                continue
            into = mine[group.method]
            into.state.merge(group.state)
            into.rows, into.people = torch.cat([into.rows, group.rows]), into.people + group.people
            into.guide_rows = into.guide_rows + group.guide_rows
            into.rule = RULES[into.method](self.g, into.state, into.people)


def _padded(guidance: Guidance, rows: list[list[int]], model):
    from decoding.guides import left_pad

    return left_pad(rows, guidance.tokenizer.pad_token_id, model.device)


def _strengths(people: list[Resolved]) -> torch.Tensor:
    return torch.tensor([p.strength for p in people], dtype=torch.float32)


def _drift_weights(people: list[Resolved]) -> torch.Tensor:
    return torch.tensor([p.weights for p in people], dtype=torch.float32)


def pad_rule_of(g: Guidance, guide, people: list[Resolved]):
    from decoding.processors import pad_rule

    return pad_rule(guide, _strengths(people), g.pad_top_k)


def genarm_rule_of(g: Guidance, guide, people: list[Resolved]):
    from decoding.processors import genarm_rule

    return genarm_rule(guide, _strengths(people))


def args_rule_of(g: Guidance, reward, people: list[Resolved]):
    from decoding.processors import args_rule

    return args_rule(reward, _strengths(people), g.args_top_k)


def drift_rule_of(g: Guidance, guide, people: list[Resolved]):
    """Drift over B + nnz(weights) guide rows (only the attributes a user weighs get a row)."""
    from decoding.processors import drift_rule

    weights = _drift_weights(people)
    return drift_rule(guide, weights, 1.0 / _strengths(people), weights != 0)  # strength 0: beta inf, no drift


RULES = {"pad": pad_rule_of, "genarm": genarm_rule_of, "args": args_rule_of, "drift": drift_rule_of}


def guide_state(g: Guidance, method: str, rows: list[tuple[Resolved, RowTokens]], chunk: int | None):
    """The guide a method's rows read (its KV cache over their guide prompts), and its guide rows per user."""
    from decoding.guides import CachedSequenceReward, Guide
    from decoding.processors import drift_rows

    if method == "drift":
        active = _drift_weights([p for p, _ in rows]) != 0
        contexts = [rows[b][1].contexts[i] for b, i in drift_rows(active)]
        model = g.drift_model()
        return Guide(model, *_padded(g, contexts, model), chunk), (1 + active.sum(1)).tolist()
    model = g.guide_model(method)
    state = CachedSequenceReward if method == "args" else Guide
    return state(model, *_padded(g, [t.contexts[0] for _, t in rows], model), chunk), [1] * len(rows)


def build_rule(guidance: Guidance, rows: list[tuple[Resolved, RowTokens]],
               chunk: int | None = None) -> RowGroupsRule | None:
    """One rule for a batch of rows (None when no row is guided): one group, one guide forward per method. With a
    `chunk` the guides' prompts are prefilled by `rule.fill()` calls, about `chunk` tokens each."""
    groups = []
    for method in RULES:
        idx = [b for b, (p, _) in enumerate(rows) if p.method == method]
        if idx:
            state, guide_rows = guide_state(guidance, method, [rows[b] for b in idx], chunk)
            groups.append(Group(method, torch.tensor(idx), [rows[b][0] for b in idx], guide_rows, state))
    return RowGroupsRule(guidance, groups) if groups else None


# --- Drift weights from a user's labelled pairs ---------------------------------------------------------------------
def drift_pair_rows(guidance: Guidance, pairs: list[dict]) -> tuple[list[dict], list[str]]:
    """Labelled pairs [{prompt: str | messages, chosen, rejected}] as attribute_rewards rows, and the Drift prompts
    (neutral first); a server that cannot fit is refused in one line."""
    why = guidance.missing("drift")
    if why:
        raise PersonalizationError(f"cannot fit weights from pairs: {why}", "pairs", code="guide_not_configured")
    if guidance.tokenizer.chat_template is None:
        raise PersonalizationError("cannot fit weights from pairs: the tokenizer has no chat template", "pairs")
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}] if isinstance(p["prompt"], str) else p["prompt"],
             "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    return rows, [guidance.drift_prompts["neutral"], *guidance.drift_prompts["attributes"].values()]


def fit_profile_weights(guidance: Guidance, pairs: list[dict], method: str = "closed_form",
                        sparsity: float = 0.25) -> dict[str, float]:
    """Drift weights {attribute: p_i} from labelled pairs [{prompt: str | messages, chosen, rejected}]:
    Delta_j = r(x_j, chosen_j) - r(x_j, rejected_j) over the attribute prompts (decoding/drift.py
    `attribute_rewards`, on the Drift guide), then `fit_weights` (closed form: p = mean Delta / ||mean Delta||)."""
    from decoding.drift import attribute_rewards, fit_weights

    rows, texts = drift_pair_rows(guidance, pairs)
    first, second = attribute_rewards(guidance.drift_model(), guidance.tokenizer, rows, texts)
    p = fit_weights(np.asarray(first - second), method, sparsity)
    return dict(zip(guidance.attributes, (float(x) for x in p), strict=True))