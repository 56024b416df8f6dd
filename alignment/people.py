"""The people of the persona world: role-play characters and users with known preferences.

Characters (the APC facet) carry 8-60 persona statements over typed slots; the world's oracle knows which
statement is relevant to a query and whether a response entails or contradicts it.

Users (the preference facet) weigh the K attributes of `language.ATTRIBUTES` plus a shared quality factor,
"answering what was asked". The true reward of a response y to prompt x for user u is

    r_u(x, y) = w_u . a(y) + quality * q(x, y)                                  (a in [-1, 1]^K, q in {-1, 0, 1})

with w_u drawn from a population prior in the style of PersonalLLM / PAL (research/reward_models.md §6.2):

    w_u = shared * m + personal * (mu_c(u) + cluster_spread * eps_u),   m, mu_c, eps_u ~ N(0, I_K)

`shared` sets how much users agree (a consensus direction m), `personal` the size of individual taste, `clusters`
the number of prototypes mu_c. Labels are Bradley-Terry with a per-user rationality beta_u ~ LogNormal:
P(y_a > y_b) = sigmoid(beta_u (r_u(y_a) - r_u(y_b))), so the Bayes ceiling is below 100% and known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignment import language as lang

# Text of a stated preference, (positive weight, negative weight), per attribute.
PREFERENCE_TEXT = {
    "length": ("the user likes long answers .", "the user likes short answers ."),
    "formality": ("the user likes formal talk .", "the user likes casual talk ."),
    "enthusiasm": ("the user likes excited answers .", "the user likes quiet answers ."),
    "humour": ("the user likes jokes .", "the user dislikes jokes ."),
    "empathy": ("the user likes kind words .", "the user dislikes kind words ."),
    "technical": ("the user likes technical details .", "the user dislikes technical details ."),
    "structure": ("the user likes numbered points .", "the user dislikes numbered points ."),
}
INVALID_REWARD = -10.0  # true reward of text that is not a valid world sentence: below any valid response (|r| < 8)


@dataclass
class PopulationConfig:
    shared: float = 0.0  # scale of the consensus direction all users share
    personal: float = 1.0  # scale of individual taste
    clusters: int = 4  # number of user prototypes
    cluster_spread: float = 0.5  # within-cluster noise, relative to the prototype scale
    quality: float = 1.0  # weight of "answering what was asked", shared by every user
    temperature: float = 4.0  # median Bradley-Terry rationality beta_u
    temperature_spread: float = 0.3  # log-normal sigma of beta_u across users
    fidelity: float = 1.0  # probability that each salient preference appears in the user's persona text
    salient: float = 0.5  # |w_k| above this is a preference the user would state


# --- characters -------------------------------------------------------------------------------------------------
def make_character(rng: np.random.Generator, n_statements: int) -> list[tuple[str, str]]:
    """(slot, value) facts of one character: `n_statements` distinct slots, the name always among them."""
    singles = [s for s in lang.SLOTS if s != "name"]
    n_single = min(n_statements - 1, len(singles))
    slots = ["name", *rng.choice(singles, size=n_single, replace=False).tolist()]
    items = rng.choice(len(lang.OPINION_ITEMS), size=n_statements - len(slots), replace=False)
    slots += [f"opinion:{lang.OPINION_ITEMS[i]}" for i in sorted(items)]
    return [(s, str(rng.choice(lang.slot_values(s)))) for s in slots]


# --- responses --------------------------------------------------------------------------------------------------
def sample_style(rng: np.random.Generator, p: np.ndarray | float = 0.35) -> lang.Style:
    """A random style; `p` is the probability of each attribute being present, scalar or (K,) in ATTRIBUTES order.

    For formality, p is the probability of a formal (vs casual) register when greeting or closing appear.
    """
    p = np.broadcast_to(np.asarray(p, dtype=float), (lang.K,))
    greeting, closing = bool(rng.random() < 0.4), bool(rng.random() < 0.3)
    register = (1 if rng.random() < p[1] else -1) if (greeting or closing) else 0  # one register per response
    elaborations = int(rng.binomial(len(lang.ELABORATIONS), p[0]))
    return lang.Style(greeting=register * greeting, closing=register * closing, empathy=bool(rng.random() < p[4]),
                      elaborations=elaborations, technical=bool(rng.random() < p[5]), joke=bool(rng.random() < p[3]),
                      structure=bool(rng.random() < p[6]), exclaim=bool(rng.random() < p[2]))


CONTENT_KINDS = ("answer", "contradict", "other", "neutral")


def sample_content(rng: np.random.Generator, facts: list[tuple[str, str]], query_slot: str | None,
                   mix: tuple[float, float, float, float]) -> tuple[tuple[str, str] | None, int]:
    """The content clause of a response to a query about `query_slot` by a character with `facts`.

    `mix` = probabilities of (answer correctly, contradict the asked slot, assert another of the character's facts,
    neutral chit-chat). Off-topic queries (slot None) have nothing to answer or contradict: those kinds fall back to
    neutral. Returns (fact or None, neutral clause index).
    """
    kind = CONTENT_KINDS[rng.choice(4, p=np.asarray(mix) / sum(mix))]
    truth = dict(facts)
    neutral = int(rng.integers(len(lang.NEUTRAL_CLAUSES)))
    if query_slot is None and kind in ("answer", "contradict"):
        kind = "neutral"
    if kind == "answer":
        return (query_slot, truth[query_slot]), neutral
    if kind == "contradict":
        wrong = [v for v in lang.slot_values(query_slot) if v != truth[query_slot]]
        return (query_slot, str(rng.choice(wrong))), neutral
    if kind == "other":
        others = [f for f in facts if f[0] != query_slot]
        return others[int(rng.integers(len(others)))], neutral
    return None, neutral


def quality(facts: list[tuple[str, str]], query_slot: str | None, fact: tuple[str, str] | None) -> float:
    """q(x, y): +1 for answering what was asked truthfully (neutral chit-chat answers an off-topic query),
    -1 for contradicting any of the character's facts, 0 otherwise (true but off the asked slot, or evasive)."""
    truth = dict(facts)
    if fact is not None and fact[0] in truth and truth[fact[0]] != fact[1]:
        return -1.0
    if query_slot is None:
        return 1.0 if fact is None else 0.0
    return 1.0 if fact == (query_slot, truth.get(query_slot)) else 0.0


# --- users ------------------------------------------------------------------------------------------------------
def make_population(rng: np.random.Generator, cfg: PopulationConfig) -> tuple[np.ndarray, np.ndarray]:
    """The population's shared direction m (K,) and cluster prototypes mu (C, K)."""
    return rng.standard_normal(lang.K), rng.standard_normal((cfg.clusters, lang.K))


def make_user(rng: np.random.Generator, cfg: PopulationConfig, m: np.ndarray, mu: np.ndarray):
    """One user: (weights (K,), cluster, beta, persona text)."""
    cluster = int(rng.integers(len(mu)))
    w = cfg.shared * m + cfg.personal * (mu[cluster] + cfg.cluster_spread * rng.standard_normal(lang.K))
    beta = float(cfg.temperature * np.exp(cfg.temperature_spread * rng.standard_normal()))
    return w, cluster, beta, persona_text(rng, w, cfg)


def persona_text(rng: np.random.Generator, w: np.ndarray, cfg: PopulationConfig) -> str:
    """The preferences a user would state: salient weights, strongest first, each kept with prob `fidelity`."""
    lines = []
    for k in np.argsort(-np.abs(w)):
        if abs(w[k]) > cfg.salient and rng.random() < cfg.fidelity:
            lines.append(PREFERENCE_TEXT[lang.ATTRIBUTES[k]][0 if w[k] > 0 else 1])
    return " ".join(lines) if lines else "the user has no stated preferences ."


def stated_preferences(text: str) -> np.ndarray:
    """(K,) in {-1, 0, 1}: the preferences a persona text states (inverse of `persona_text`)."""
    signs = np.zeros(lang.K)
    for k, attr in enumerate(lang.ATTRIBUTES):
        pos, neg = PREFERENCE_TEXT[attr]
        signs[k] = 1.0 if pos in text else (-1.0 if neg in text else 0.0)
    return signs


def true_reward(w: np.ndarray, quality_weight: float, facts: list[tuple[str, str]], query_slot: str | None,
                text: str) -> float:
    """r_u(x, y) of any text; INVALID_REWARD for text the parser rejects."""
    parse = lang.parse_response(text)
    if parse is None:
        return INVALID_REWARD
    a = lang.attribute_vector(parse.style)
    return float(w @ a + quality_weight * quality(facts, query_slot, parse.fact))


def bt_probability(beta: float | np.ndarray, r_a, r_b):
    """P(a preferred to b) under Bradley-Terry with rationality beta."""
    return 1.0 / (1.0 + np.exp(-np.asarray(beta) * (np.asarray(r_a) - np.asarray(r_b))))
