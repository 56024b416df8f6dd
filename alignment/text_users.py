"""Text users: simulated people whose true reward is a function of attributes measured on English replies.

    python -m alignment.text_users config=real/text_users.yaml     # runs/cache/text-users-<hash>/ (samples cached)

The persona world's users (alignment/people.py) weigh attributes its parser reads off world sentences; text users
weigh attributes that alignment/text_attributes.py measures exactly on any English reply (length, lists, a question
back, examples, ...), so any arm's sample of a real model (SmolLM2-135M-Instruct) gets its exact true reward
(DESIGN.md, "Wave 2"; issue 22). Everything else follows people.py: a population prior with a consensus direction
and controversial features (PersonalLLM / PAL style, research/reward_models.md §6.2), persona text from the
weights, Bradley-Terry labels with a per-user rationality, user-disjoint users and prompt-disjoint prompts.

    r_u(x, y) = w_u . f(y) + quality * q(x, y)         f = features(y) in [0, 1]^K,  q = on_topic(x, y) in [0, 1]

Files (records of alignment/records.py, written with records.write_jsonl):

    prompts.jsonl    Query: query_id, slot (the topic), text, split (train | val | test, prompt-disjoint)
    users.jsonl      User: persona, weights (WEIGHT_NAMES order), cluster, temperature, split (user-disjoint)
    pairs.jsonl      PreferencePair: prompt [user turn], chosen, rejected, true rewards, split <user split>_<part>
    responses.jsonl  {"prompt_id", "texts"}: the policy's sampled replies the pairs are made of (a share
                     `SampleSpec.styled` sampled under a random STYLE_INSTRUCTIONS line, so pairs vary on all features)
    text_users.json  statistics: feature rates of the samples, user agreement, Bayes and population-BT ceilings

The policy's samples are cached apart (runs/cache/text-samples-<hash>/, keyed by policy, prompts and sampling),
so users drawn under another population reuse them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from alignment.adapters import split_counts
from alignment.records import Message, PreferencePair, Query, User, read_jsonl, write_jsonl
from alignment.text_attributes import MEASURES, words

SPLITS = ("train", "val", "test")

# --- prompts ----------------------------------------------------------------------------------------------------
# 30 everyday topics x 12 task templates = 360 instructions; every topic reads as the object of every template.
TOPICS = (
    "sleeping well", "baking bread", "saving money", "learning a new language", "running", "caring for houseplants",
    "public speaking", "job interviews", "composting", "time management", "brewing coffee", "budget travel",
    "photography", "meditation", "vegetable gardening", "recycling", "cooking rice", "studying for exams",
    "writing emails", "bike maintenance", "camping", "writing a resume", "training a dog", "home workouts",
    "managing stress", "cleaning the kitchen", "playing chess", "solar panels", "password security",
    "making friends in a new city",
)
TASKS = (
    "Explain the basics of {}.", "Give me tips for {}.", "What should I know about {}?",
    "What are common mistakes with {}?", "How do I get started with {}?", "Why does {} matter?",
    "Summarize the key ideas of {}.", "What is the best way to approach {}?", "Describe a simple routine for {}.",
    "What are the pros and cons of {}?", "Teach me one useful thing about {}.", "How can I get better at {}?",
)
# Words of the templates (and a few stop words) say nothing about the topic; on_topic ignores them.
FUNCTION_WORDS = {w.lower() for task in TASKS for w in words(task)} | {"that", "this", "from", "your", "well", "into"}


def prompt_texts() -> list[tuple[str, str]]:
    """(topic, instruction) for every topic x task, topic-major: 360 rows."""
    return [(topic, task.format(topic)) for topic in TOPICS for task in TASKS]


def make_prompts(seed: int, shares: list[float]) -> list[Query]:
    """Every composed instruction as a `records.Query` (slot = its topic), split train / val / test by a seeded
    permutation cut at `shares`: prompt-disjoint, so no instruction text is in two splits."""
    rows = prompt_texts()
    order = np.random.default_rng([seed, 1]).permutation(len(rows))
    bounds = np.cumsum([0, *split_counts(len(rows), shares)])
    split = {int(j): s for i, s in enumerate(SPLITS) for j in order[bounds[i]:bounds[i + 1]]}
    return [Query(query_id=f"p{i:03d}", character_id=None, slot=topic, text=text, split=split[i])
            for i, (topic, text) in enumerate(rows)]


def chat(query: Query) -> list[Message]:
    """The prompt a policy reads: the instruction as the one user turn (the template adds its default system)."""
    return [{"role": "user", "content": query.text}]


# --- features -------------------------------------------------------------------------------------------------
# Each feature maps one measure of text_attributes onto [0, 1] with a cap, so every weight acts on the same scale
# and a reply cannot win without bound by repetition (a guided decoder that spams "!!!!" gains no more than "!!").
# Kept: the measures some arm moved or that varied across the base's samples on SmolLM2-135M-Instruct
# (docs/experiments/text_users.md). Left out: greeting_or_sign_off, the weakest (0 of 96 base samples, 2 of 24 under
# its own instruction), so that ten features remain.
FEATURES: dict[str, tuple[str, float]] = {  # name -> (measure, value at which the feature saturates to 1)
    "length": ("words", 80.0),  # ~100 tokens of English, the builder's reply budget
    "list": ("list_items", 3.0),
    "formatting": ("formatting", 2.0),
    "question_back": ("question_back", 1.0),
    "example": ("example", 1.0),
    "exclamations": ("exclamations", 2.0),
    "contractions": ("contractions", 3.0),
    "second_person": ("second_person", 0.1),  # one word in ten addressing the reader is already a lot
    "sentence_length": ("sentence_length", 30.0),  # mean words per sentence
    "summary_first": ("summary_first", 1.0),
}
FEATURE_NAMES = tuple(FEATURES)
K = len(FEATURE_NAMES)
WEIGHT_NAMES = (*FEATURE_NAMES, "on_topic")  # order of records.User.weights


def features(text: str) -> np.ndarray:
    """(K,) in [0, 1], in FEATURE_NAMES order: min(measure / cap, 1) for each feature."""
    return np.array([min(MEASURES[m](text) / cap, 1.0) for m, cap in FEATURES.values()])


def content_words(text: str) -> set[str]:
    """4-letter prefixes of the words of `text` that carry its topic: 4+ letters, not a template or stop word."""
    return {w.lower()[:4] for w in words(text) if len(w) >= 4 and w.lower() not in FUNCTION_WORDS}


def on_topic(prompt: str, text: str) -> float:
    """The shared term q(x, y) in [0, 1]: share of the prompt's content words whose 4-letter prefix some reply word
    shares ("brewing coffee" -> brew, coff). It keeps a degenerate reply (empty, all "!!!", another subject) below a
    real answer for every user; 1 when the prompt has no content word."""
    asked = content_words(prompt)
    if not asked:
        return 1.0
    said = {w.lower()[:4] for w in words(text)}
    return len(asked & said) / len(asked)


# --- users ----------------------------------------------------------------------------------------------------
# The consensus direction m: what every user agrees on in proportion to `shared`, quality-ish preferences
# (a worked example and a summary line help; shouting does not). The other seven features have no shared part:
# their signs differ across users, the controversial attributes.
CONSENSUS = {"example": 1.0, "summary_first": 1.0, "exclamations": -1.0}

# What a user writes about a feature, (positive weight, negative weight).
PREFERENCE_TEXT = {
    "length": ("I like long, detailed answers.", "I like short answers."),
    "list": ("I like answers in bullet points.", "I don't want bullet points or lists."),
    "formatting": ("I like headings and bold text.", "I prefer plain text without markdown."),
    "question_back": ("I like it when you end by asking me a question.", "Don't end by asking me questions."),
    "example": ("I like concrete examples.", "Skip the examples."),
    "exclamations": ("I like enthusiastic answers with exclamation marks.", "No exclamation marks, please."),
    "contractions": ("I like a casual tone with contractions.", "I prefer a formal tone without contractions."),
    "second_person": ("I like being addressed directly.", "I prefer an impersonal tone that doesn't address me."),
    "sentence_length": ("I like long, flowing sentences.", "I like short, simple sentences."),
    "summary_first": ("I like a one-line summary first.", "Don't open with a summary line."),
}
NO_PREFERENCES = "I have no particular preferences."


@dataclass
class TextPopulationConfig:
    shared: float = 0.0  # scale of the consensus direction CONSENSUS (every user agrees on it)
    personal: float = 1.0  # scale of individual taste, on every feature
    clusters: int = 4  # number of user prototypes
    cluster_spread: float = 0.5  # within-cluster noise, relative to the prototype scale
    quality: float = 1.0  # weight of the shared term on_topic, the same for every user
    temperature: float = 4.0  # median Bradley-Terry rationality beta_u
    temperature_spread: float = 0.3  # log-normal sigma of beta_u across users
    persona_threshold: float = 0.75  # the persona states every feature with |w_k| above this, and no other


def consensus_direction() -> np.ndarray:
    """m (K,): CONSENSUS in FEATURE_NAMES order, zero elsewhere."""
    return np.array([CONSENSUS.get(name, 0.0) for name in FEATURE_NAMES])


def make_users(rng: np.random.Generator, cfg: TextPopulationConfig, counts: list[int]) -> list[User]:
    """`counts` = [train, val, test] users, drawn as people.make_user draws the world's (PersonalLLM / PAL style):

        w_u = shared * m + personal * (mu_c(u) + cluster_spread * eps_u),   mu_c, eps_u ~ N(0, I_K)

    then `quality` appended as the on_topic weight; beta_u = temperature * exp(temperature_spread * N(0, 1))."""
    m, mu = consensus_direction(), rng.standard_normal((cfg.clusters, K))
    users = []
    for split, n in zip(SPLITS, counts, strict=True):
        for _ in range(n):
            cluster = int(rng.integers(cfg.clusters))
            w = cfg.shared * m + cfg.personal * (mu[cluster] + cfg.cluster_spread * rng.standard_normal(K))
            beta = float(cfg.temperature * np.exp(cfg.temperature_spread * rng.standard_normal()))
            users.append(User(user_id=f"t{len(users):04d}", persona=persona_text(w, cfg.persona_threshold),
                              weights=[*map(float, w), cfg.quality], cluster=cluster, temperature=beta, split=split))
    return users


def persona_text(w: np.ndarray, threshold: float) -> str:
    """The user's stated preferences: every feature with |w_k| > threshold, strongest first (deterministic)."""
    stated = [PREFERENCE_TEXT[FEATURE_NAMES[k]][0 if w[k] > 0 else 1] for k in np.argsort(-np.abs(w[:K]))
              if abs(w[k]) > threshold]
    return " ".join(stated) if stated else NO_PREFERENCES


def stated_preferences(persona: str) -> np.ndarray:
    """(K,) in {-1, 0, 1}: the signs a persona text states (inverse of `persona_text`)."""
    return np.array([1.0 if pos in persona else -1.0 if neg in persona else 0.0
                     for pos, neg in (PREFERENCE_TEXT[name] for name in FEATURE_NAMES)])


# --- the truth ------------------------------------------------------------------------------------------------
def prompt_text(prompt: str | list[Message]) -> str:
    """The instruction of a prompt: the string itself, or the last user turn of chat messages."""
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def reward(user: User, prompt: str | list[Message], text: str) -> float:
    """r_u(x, y) = w_u . features(y) + quality * on_topic(x, y), the user's true reward of any reply."""
    w = np.asarray(user.weights)
    return float(w[:K] @ features(text) + w[K] * on_topic(prompt_text(prompt), text))


def rewards(users: User | list[User], prompts: list, texts: list[str]) -> np.ndarray:
    """(N,) true rewards of N replies; `users` is one user for every row or one per row (TRL's reward-function
    shape, fn(prompts, completions) -> list of floats, with the user as a column)."""
    rows = [users] * len(texts) if isinstance(users, User) else users
    if not len(rows) == len(prompts) == len(texts):
        raise ValueError(f"rewards: {len(rows)} users, {len(prompts)} prompts, {len(texts)} texts")
    return np.array([reward(u, p, t) for u, p, t in zip(rows, prompts, texts, strict=True)])


def bt_probability(beta, r_a, r_b):
    """P(a preferred to b) = sigmoid(beta (r_a - r_b)) (Bradley-Terry with rationality beta), written with tanh so
    that a near-deterministic user (beta ~ 1e4) does not overflow exp."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(beta) * (np.asarray(r_a) - np.asarray(r_b))))


# --- pairs ----------------------------------------------------------------------------------------------------
# Which prompts each user's pairs use, as the world plans them (alignment/world.py make_pairs): context pairs on
# train prompts; target pairs on prompts no context pair uses (val users on val prompts, the others on test).
def pair_plan(spec: TextUsersSpec) -> dict[str, list[tuple[str, str, int]]]:
    return {"train": [("context", "train", spec.train_pairs), ("target", "test", spec.target_pairs)],
            "val": [("context", "train", spec.context_pairs), ("target", "val", spec.target_pairs)],
            "test": [("context", "train", spec.context_pairs), ("target", "test", spec.target_pairs)]}


def make_pairs(rng: np.random.Generator, spec: TextUsersSpec, users: list[User], prompts: list[Query],
               responses: dict[str, list[str]]) -> list[PreferencePair]:
    """Bradley-Terry labelled pairs of two distinct sampled replies to one prompt, for every user and part.

    `responses`: prompt_id -> the policy's replies. A prompt whose replies are all the same text carries no
    preference and is left out; a pool smaller than the pairs asked for is drawn with replacement."""
    distinct = {pid: sorted(set(texts)) for pid, texts in responses.items()}
    pools = {s: [q for q in prompts if q.split == s and len(distinct.get(q.query_id, ())) >= 2] for s in SPLITS}
    pairs = []
    for u in users:
        for part, prompt_split, n in pair_plan(spec)[u.split]:
            pool = pools[prompt_split]
            if n and not pool:
                raise ValueError(f"no {prompt_split} prompt has two distinct replies; sample more")
            for j in rng.choice(len(pool), size=n, replace=n > len(pool)):
                q = pool[j]
                a, b = (distinct[q.query_id][i] for i in rng.choice(len(distinct[q.query_id]), 2, replace=False))
                ra, rb = reward(u, q.text, a), reward(u, q.text, b)
                a_wins = bool(rng.random() < bt_probability(u.temperature, ra, rb))
                pairs.append(PreferencePair(
                    user_id=u.user_id, prompt=chat(q), chosen=a if a_wins else b, rejected=b if a_wins else a,
                    prompt_id=q.query_id, chosen_reward=ra if a_wins else rb, rejected_reward=rb if a_wins else ra,
                    split=f"{u.split}_{part}"))
    return pairs


# --- the artifact ---------------------------------------------------------------------------------------------
@dataclass
class SampleSpec:
    """The policy's replies the pairs are made of: everything that changes them (and their cache key)."""

    policy: str = "smollm2-135m-instruct"  # any HF causal LM: a packaged name, local directory or hub id
    prompt_seed: int = 0  # seed of the prompt split
    prompt_splits: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # train/val/test shares of prompts
    samples: int = 4  # replies per prompt; C(samples, 2) distinct pairs each
    styled: float = 0.5  # share of replies sampled with a random STYLE_INSTRUCTIONS line added to the user turn
    temperature: float = 0.8  # plain ancestral sampling (alignment.sampling.sample_responses)
    max_new_tokens: int = 96
    seed: int = 0  # sampling seed


@dataclass
class TextUsersSpec:
    """Everything that defines a text-user set: equal specs give identical files (and one cache entry)."""

    seed: int = 0  # users and labels
    users: list[int] = field(default_factory=lambda: [200, 50, 100])  # train / val / test users
    train_pairs: int = 48  # per train user on train prompts
    context_pairs: int = 16  # per val/test user on train prompts (few-shot context)
    target_pairs: int = 32  # per user on held-out prompts
    sampling: SampleSpec = field(default_factory=SampleSpec)
    population: TextPopulationConfig = field(default_factory=TextPopulationConfig)


@dataclass
class TextUsersConfig:
    runs_dir: str = "runs"
    text_users: TextUsersSpec = field(default_factory=TextUsersSpec)


Sampler = Callable[[SampleSpec, list[Query]], dict[str, list[str]]]


def sample_policy(spec: SampleSpec, prompts: list[Query]) -> dict[str, list[str]]:
    """prompt_id -> `spec.samples` replies of `spec.policy` (fp32; a GPU when there is one)."""
    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(spec.policy)
    return sample_replies(load_causal_lm(ModelConfig(name_or_path=spec.policy, dtype="float32"), tok), tok, spec,
                          prompts)


# Instructions that move the features when they end the user's message (system-turn ones barely do; measured in
# docs/experiments/text_users.md). Replies sampled under them make pairs that differ on features the plain policy
# seldom shows (a question back: 0 of 96 plain samples), as PersonalLLM draws responses from several sources.
STYLE_INSTRUCTIONS = (
    "Answer with a bulleted list.", "Use markdown headings and bold text.", "End by asking me a question.",
    "Give a concrete example.", "Answer with great enthusiasm and exclamation marks!",
    "Write casually, with contractions like don't and it's.", "Address me directly as you.",
    "Answer in one short sentence.", "Give a long, detailed answer.",
    "Start with a one-line summary, then the details.",
)


def sampling_chats(spec: SampleSpec, prompts: list[Query]) -> list[tuple[str, list[Message], str]]:
    """(prompt_id, chat, instruction) for every reply to sample, `spec.samples` per prompt in prompt order: a share
    `spec.styled` of them (seeded) end the user turn with a random STYLE_INSTRUCTIONS line ("" for none). The pairs
    keep the plain prompt: the instruction is how the reply was made, not what the user asked."""
    rng = np.random.default_rng([spec.seed, 3])
    rows = []
    for q in prompts:
        for _ in range(spec.samples):
            styled = rng.random() < spec.styled
            instruction = STYLE_INSTRUCTIONS[int(rng.integers(len(STYLE_INSTRUCTIONS)))] if styled else ""
            rows.append((q.query_id, [{"role": "user", "content": f"{q.text} {instruction}".strip()}], instruction))
    return rows


def sample_replies(model, tokenizer, spec: SampleSpec, prompts: list[Query]) -> dict[str, list[str]]:
    """prompt_id -> `spec.samples` replies of a loaded policy to the chats of `sampling_chats`, seeded."""
    from alignment.sampling import sample_responses

    rows = sampling_chats(spec, prompts)
    texts = sample_responses(model, tokenizer, [c for _, c, _ in rows], n=1, temperature=spec.temperature,
                             max_new_tokens=spec.max_new_tokens,
                             batch_size=16 if model.device.type == "cpu" else 64, seed=spec.seed)
    out: dict[str, list[str]] = {q.query_id: [] for q in prompts}
    for (pid, _, _), (text,) in zip(rows, texts, strict=True):
        out[pid].append(text)
    return out


def samples_artifact(spec: SampleSpec, runs_dir: str = "runs", sample: Sampler = sample_policy) -> Path:
    """runs/cache/text-samples-<hash>/: prompts.jsonl and responses.jsonl, sampled once per spec."""
    from alignment.cache import cached_artifact

    def build(out: Path) -> None:
        prompts = make_prompts(spec.prompt_seed, spec.prompt_splits)
        responses = sample(spec, prompts)
        write_jsonl(out / "prompts.jsonl", prompts)
        rows = [json.dumps({"prompt_id": q.query_id, "texts": responses[q.query_id]}, ensure_ascii=False)
                for q in prompts]
        (out / "responses.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")

    return cached_artifact("text-samples", spec, build, runs_dir=runs_dir)


def read_responses(path: Path) -> dict[str, list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["prompt_id"]: r["texts"] for r in rows}


def pair_features(pairs: list[PreferencePair]) -> np.ndarray:
    """(N, K+1) [f(chosen) - f(rejected), q(chosen) - q(rejected)], the differences every user's reward is linear
    in (rows are chosen - rejected, as alignment.world.fit_logistic reads them)."""
    def f(pair, text):
        return np.append(features(text), on_topic(prompt_text(pair.prompt), text))
    return np.array([f(p, p.chosen) - f(p, p.rejected) for p in pairs]).reshape(len(pairs), K + 1)


def statistics(users: list[User], pairs: list[PreferencePair], responses: dict[str, list[str]]) -> dict:
    """Feature rates of the samples; how often two users order a sampled pair alike; the Bayes ceiling and the
    ceiling of one population-wide Bradley-Terry on the features (fit on train_context), per target split."""
    from alignment.world import fit_logistic

    f = np.array([features(t) for texts in responses.values() for t in texts])
    stats = {"features": {name: {"fires": float((f[:, k] > 0).mean()), "mean": float(f[:, k].mean())}
                          for k, name in enumerate(FEATURE_NAMES)},
             "users": {s: sum(u.split == s for u in users) for s in SPLITS},
             "pairs": {s: sum(p.split == s for p in pairs) for s in sorted({p.split for p in pairs})}}
    x = pair_features(pairs[:2000])
    w = np.array([u.weights for u in users])
    i, j = np.random.default_rng(0).integers(len(users), size=(2, len(x)))
    stats["user_agreement"] = float(np.mean(np.sign((w[i] * x).sum(1)) == np.sign((w[j] * x).sum(1))))
    beta = {u.user_id: u.temperature for u in users}
    train = [p for p in pairs if p.split == "train_context"]
    theta = fit_logistic(pair_features(train)) if train else np.zeros(K + 1)
    for split in ("train_target", "val_target", "test_target"):
        rows = [p for p in pairs if p.split == split]
        if not rows:
            continue
        p_true = bt_probability(np.array([beta[p.user_id] for p in rows]), [p.chosen_reward for p in rows],
                                [p.rejected_reward for p in rows])
        agree = pair_features(rows) @ theta > 0
        stats[split] = {"bayes_ceiling": float(np.mean(np.maximum(p_true, 1 - p_true))),
                        "population_bt": float(np.mean(np.where(agree, p_true, 1 - p_true))), "pairs": len(rows)}
    return stats


def build_text_users(spec: TextUsersSpec, out: Path, prompts: list[Query], responses: dict[str, list[str]]) -> dict:
    """Draw users and label pairs of `responses` into `out`; returns the statistics."""
    users = make_users(np.random.default_rng(spec.seed), spec.population, spec.users)
    pairs = make_pairs(np.random.default_rng([spec.seed, 2]), spec, users, prompts, responses)
    write_jsonl(out / "prompts.jsonl", prompts)
    write_jsonl(out / "users.jsonl", users)
    write_jsonl(out / "pairs.jsonl", pairs)
    rows = [json.dumps({"prompt_id": q.query_id, "texts": responses[q.query_id]}, ensure_ascii=False)
            for q in prompts]
    (out / "responses.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    stats = statistics(users, pairs, responses) | {"population": asdict(spec.population)}
    (out / "text_users.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    return stats


def text_users_artifact(spec: TextUsersSpec, runs_dir: str = "runs", sample: Sampler = sample_policy) -> Path:
    """runs/cache/text-users-<hash>/ for a spec (samples from `samples_artifact`, built once per sampling spec)."""
    from alignment.cache import cached_artifact

    samples = samples_artifact(spec.sampling, runs_dir, sample)
    prompts = read_jsonl(samples / "prompts.jsonl", Query)
    responses = read_responses(samples / "responses.jsonl")
    return cached_artifact("text-users", spec, lambda out: build_text_users(spec, out, prompts, responses),
                           runs_dir=runs_dir)


def load_text_users(path: str | Path) -> dict:
    """prompts, users, pairs (records), responses and stats of a text-user directory."""
    path = Path(path)
    return {"prompts": read_jsonl(path / "prompts.jsonl", Query), "users": read_jsonl(path / "users.jsonl", User),
            "pairs": read_jsonl(path / "pairs.jsonl", PreferencePair),
            "responses": read_responses(path / "responses.jsonl"),
            "stats": json.loads((path / "text_users.json").read_text()), "path": path}


def main(cfg: TextUsersConfig) -> Path:
    path = text_users_artifact(cfg.text_users, cfg.runs_dir)
    stats = json.loads((path / "text_users.json").read_text())
    print(f"{path}: users {stats['users']}, agreement {stats['user_agreement']:.3f}, "
          + ", ".join(f"{s} Bayes {stats[s]['bayes_ceiling']:.3f} population-BT {stats[s]['population_bt']:.3f}"
                      for s in ("train_target", "test_target") if s in stats))
    return path


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(TextUsersConfig, main)
