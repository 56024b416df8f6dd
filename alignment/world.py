"""Generate the persona world: characters, queries, users, preference pairs, SFT dialogues and a tokenizer.

    python -m alignment.world config=world.yaml world.seed=1         # writes runs/world-<timestamp>/
    python -m alignment.world describe=runs/world-<timestamp>        # prints the statistics of an existing world

The world is the offline ground truth every method is measured against (DESIGN.md, "The persona world"): its
language and oracle are in `alignment/language.py`, its people in `alignment/people.py`. Output (each table a
Hugging Face dataset saved with `save_to_disk`, records as documented in `alignment/records.py`):

    characters/  character_id, name, statements [{slot, value, text}], split (reward | evaluator | holdout)
    queries/     query_id, character_id, slot (None = off-topic), text, split (train | test: prompt-disjoint)
    users/       user_id, persona, weights (K), cluster, temperature, split (train | val | test: user-disjoint)
    pairs/       PreferencePair rows; split = <user split>_<context|target>; context pairs use train queries,
                 target pairs test queries, so seen-user/unseen-prompt and unseen-user splits are both there
    dialogues/   SFT corpus: prompt (system: RAG statements [+ user preferences], user: query), response, ...
    tokenizer/   word-level tokenizer trained on the corpus, with a chat template
    world.json   the statistics `describe` prints

Identical seed and config give byte-identical output.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from alignment import language as lang
from alignment import people
from alignment.config import ConfigError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Each message renders as "<|role|> content <|end|>"; the assistant turn ends in <|end|>, which is also EOS, so
# generation stops at the end of a turn. Spaces around specials keep the word-level split exact.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHARACTER_SPLITS = ("reward", "evaluator", "holdout")
# Bumped whenever the grammar or the generator changes what a spec produces: cached worlds are keyed by it too.
WORLD_FORMAT = 3


@dataclass
class WorldSpec:
    """Everything that defines a world: equal specs give byte-identical worlds (and one cache entry)."""

    seed: int = 0
    characters: int = 36  # split evenly into reward / evaluator / holdout (APC discriminators and policy)
    min_statements: int = 8
    max_statements: int = 60
    test_fraction: float = 0.2  # share of queries held out (prompt-disjoint)
    rag_k: int = 4  # statements in the system prompt of a dialogue
    users: list[int] = field(default_factory=lambda: [200, 50, 100])  # train / val / test users
    train_pairs: int = 48  # per train user on train queries
    context_pairs: int = 16  # per val/test user on train queries (few-shot context)
    target_pairs: int = 32  # per user on test queries
    dialogues: int = 20000
    persona_dialogues: float = 0.3  # share of dialogues whose system turn also states a user's preferences
    # shares of dialogues whose system turn holds the RAG top-k statements, none (the APC table's Vanilla prompt)
    # or all of the character's statements in persona order (its LCM prompt)
    prompt_mix: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # probabilities of a response that answers / contradicts / asserts another fact / is neutral chit-chat
    content_mix: list[float] = field(default_factory=lambda: [0.8, 0.08, 0.04, 0.08])
    style_p: float = 0.35  # probability of each attribute in an unconditioned response
    population: people.PopulationConfig = field(default_factory=people.PopulationConfig)


@dataclass
class WorldConfig:
    name: str | None = None  # run name; default world-<timestamp>
    runs_dir: str = "runs"
    describe: str | None = None  # path of an existing world: print its statistics and exit
    world: WorldSpec = field(default_factory=WorldSpec)


# --- generation -------------------------------------------------------------------------------------------------
def make_characters(rng: np.random.Generator, cfg: WorldSpec) -> list[dict]:
    rows = []
    for i in range(cfg.characters):
        facts = people.make_character(rng, int(rng.integers(cfg.min_statements, cfg.max_statements + 1)))
        rows.append({"character_id": f"c{i:03d}", "name": dict(facts)["name"],
                     "statements": [{"slot": s, "value": v, "text": lang.statement_text(s, v)} for s, v in facts],
                     "split": CHARACTER_SPLITS[i % len(CHARACTER_SPLITS)]})
    return rows


def make_queries(rng: np.random.Generator, characters: list[dict], test_fraction: float) -> list[dict]:
    """Every paraphrase of every slot a character has, plus the off-topic queries; split per query string."""
    rows = []
    for c in characters:
        slots = [st["slot"] for st in c["statements"]] + [None]
        for slot in slots:
            for text in lang.query_paraphrases(slot):
                rows.append({"query_id": f"{c['character_id']}-q{len(rows):05d}", "character_id": c["character_id"],
                             "slot": slot, "text": text,
                             "split": "test" if rng.random() < test_fraction else "train"})
    return rows


def rag_statements(rng: np.random.Generator, statements: list[dict], slot: str | None, k: int) -> str:
    """The oracle's top-k in relevance order, as a retriever ranks them: the relevant statement (if any) first, then
    random others (all equally irrelevant). A tiny policy learns to read the top statement within its 5-minute
    SFT budget; copying from a random position did not appear by 1,500 steps (28% answered, measured)."""
    relevant = [s for s in statements if s["slot"] == slot]
    others = [s for s in statements if s["slot"] != slot]
    picked = relevant + [others[i] for i in rng.choice(len(others), size=k - len(relevant), replace=False)]
    return " ".join(s["text"] for s in picked)


def make_users(rng: np.random.Generator, cfg: WorldSpec) -> list[dict]:
    m, mu = people.make_population(rng, cfg.population)
    rows = []
    for split, n in zip(("train", "val", "test"), cfg.users, strict=True):
        for _ in range(n):
            w, cluster, beta, persona = people.make_user(rng, cfg.population, m, mu)
            rows.append({"user_id": f"u{len(rows):04d}", "persona": persona, "weights": w.tolist(),
                         "cluster": cluster, "temperature": beta, "split": split})
    return rows


def sample_response(rng, facts, slot, cfg: WorldSpec, style_p=None) -> str:
    fact, neutral = people.sample_content(rng, facts, slot, tuple(cfg.content_mix))
    return lang.render_response(fact, neutral, people.sample_style(rng, cfg.style_p if style_p is None else style_p))


def make_pairs(rng, cfg: WorldSpec, users, queries, characters) -> list[dict]:
    """Bradley-Terry labelled pairs of two world responses per prompt, for every user and split."""
    facts = {c["character_id"]: [(s["slot"], s["value"]) for s in c["statements"]] for c in characters}
    statements = {c["character_id"]: c["statements"] for c in characters}
    pool = {s: [q for q in queries if q["split"] == s] for s in ("train", "test")}
    plan = {"train": [("context", "train", cfg.train_pairs), ("target", "test", cfg.target_pairs)],
            "val": [("context", "train", cfg.context_pairs), ("target", "test", cfg.target_pairs)],
            "test": [("context", "train", cfg.context_pairs), ("target", "test", cfg.target_pairs)]}
    rows = []
    for u in users:
        w = np.asarray(u["weights"])
        for part, query_split, n in plan[u["split"]]:
            for j in rng.choice(len(pool[query_split]), size=n, replace=False):
                q = pool[query_split][j]
                f = facts[q["character_id"]]
                a = b = sample_response(rng, f, q["slot"], cfg, style_p=0.5)
                while b == a:  # a pair of identical texts carries no preference
                    b = sample_response(rng, f, q["slot"], cfg, style_p=0.5)
                ra, rb = (people.true_reward(w, cfg.population.quality, f, q["slot"], t) for t in (a, b))
                a_wins = rng.random() < people.bt_probability(u["temperature"], ra, rb)
                system = rag_statements(rng, statements[q["character_id"]], q["slot"], cfg.rag_k)
                rows.append({"user_id": u["user_id"], "prompt_id": q["query_id"],
                             "prompt": [{"role": "system", "content": system}, {"role": "user", "content": q["text"]}],
                             "chosen": a if a_wins else b, "rejected": b if a_wins else a,
                             "chosen_reward": ra if a_wins else rb, "rejected_reward": rb if a_wins else ra,
                             "split": f"{u['split']}_{part}"})
    return rows


def make_dialogues(rng, cfg: WorldSpec, characters, queries, users) -> list[dict]:
    """SFT corpus on train queries: a mix of styles and of the APC table's prompt shapes (`prompt_mix`: RAG, none,
    all statements); some system turns also state a user's preferences, and then the response leans toward them
    (so preference prompting has something to work with)."""
    by_id = {c["character_id"]: c for c in characters}
    train_q = [q for q in queries if q["split"] == "train"]
    train_users = [u for u in users if u["split"] == "train"]
    rows = []
    shapes = rng.choice(3, size=cfg.dialogues, p=np.asarray(cfg.prompt_mix) / sum(cfg.prompt_mix))
    for j, shape in zip(rng.choice(len(train_q), size=cfg.dialogues, replace=True), shapes, strict=True):
        q, c = train_q[j], by_id[train_q[j]["character_id"]]
        system = (rag_statements(rng, c["statements"], q["slot"], cfg.rag_k), "",
                  " ".join(s["text"] for s in c["statements"]))[shape]
        style_p, persona = cfg.style_p, ""
        if rng.random() < cfg.persona_dialogues:
            persona = train_users[int(rng.integers(len(train_users)))]["persona"]
            stated = people.stated_preferences(persona)
            style_p = np.where(stated > 0, 0.85, np.where(stated < 0, 0.05, cfg.style_p))
            system = f"{system} {persona}".strip()
        facts = [(s["slot"], s["value"]) for s in c["statements"]]
        rows.append({"prompt": [{"role": "system", "content": system}, {"role": "user", "content": q["text"]}],
                     "response": sample_response(rng, facts, q["slot"], cfg, style_p), "query_id": q["query_id"],
                     "character_id": c["character_id"], "persona": persona})
    return rows


# --- tokenizer --------------------------------------------------------------------------------------------------
def build_tokenizer(corpus: list[str]):
    """A word-level tokenizer trained on the world corpus, wrapped for transformers, with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def corpus(characters, queries, users, dialogues) -> list[str]:
    # The full grammar vocabulary goes in too, so words the samples never drew still get an id.
    texts = [" ".join(lang.vocabulary())]
    texts += [s["text"] for c in characters for s in c["statements"]] + [q["text"] for q in queries]
    texts += [u["persona"] for u in users] + [t for pair in people.PREFERENCE_TEXT.values() for t in pair]
    texts += [d["response"] for d in dialogues]
    return texts


# --- statistics -------------------------------------------------------------------------------------------------
def pair_features(pairs: list[dict], queries: dict, facts: dict) -> np.ndarray:
    """(N, K+1) feature differences [a(chosen) - a(rejected), q(chosen) - q(rejected)] read off by the parser."""
    def feats(text, q):
        parse = lang.parse_response(text)
        return np.append(lang.attribute_vector(parse.style), people.quality(facts[q["character_id"]], q["slot"],
                                                                             parse.fact))
    return np.array([feats(p["chosen"], queries[p["prompt_id"]]) - feats(p["rejected"], queries[p["prompt_id"]])
                     for p in pairs])


def fit_logistic(x: np.ndarray, steps: int = 500, lr: float = 0.5, l2: float = 1e-3) -> np.ndarray:
    """Population Bradley-Terry on features: maximize mean log sigmoid(theta . x) (all rows are chosen - rejected)."""
    theta = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ theta))
        theta += lr * (x.T @ (1.0 - p) / len(x) - l2 * theta)
    return theta


def statistics(characters, queries, users, pairs, dialogues, cfg: WorldSpec) -> dict:
    """Agreement between users, population-BT and Bayes ceilings (expected accuracies against the true BT labels),
    character and corpus statistics."""
    qidx = {q["query_id"]: q for q in queries}
    facts = {c["character_id"]: [(s["slot"], s["value"]) for s in c["statements"]] for c in characters}
    beta = {u["user_id"]: u["temperature"] for u in users}
    weights = np.array([u["weights"] for u in users])
    train = [p for p in pairs if p["split"] == "train_context"]
    theta = fit_logistic(pair_features(train, qidx, facts))
    stats = {}
    for split in ("train_target", "test_target"):
        rows = [p for p in pairs if p["split"] == split]
        x = pair_features(rows, qidx, facts)
        p_true = people.bt_probability(np.array([beta[p["user_id"]] for p in rows]),
                                       [p["chosen_reward"] for p in rows], [p["rejected_reward"] for p in rows])
        # P(the observed "chosen" is the true-preferred one) -> expected accuracy of a predictor that agrees with it
        agree_pop = (x @ theta) > 0
        stats[split] = {"bayes_ceiling": float(np.mean(np.maximum(p_true, 1 - p_true))),
                        "population_bt": float(np.mean(np.where(agree_pop, p_true, 1 - p_true))),
                        "label_matches_true_reward": float(np.mean(p_true > 0.5)), "pairs": len(rows)}
    rng = np.random.default_rng(0)
    da = rng.uniform(-1, 1, (2000, lang.K))  # random attribute differences
    i, j = rng.integers(len(users), size=(2, 2000))
    sign_i, sign_j = np.sign((weights[i] * da).sum(1)), np.sign((weights[j] * da).sum(1))
    profiles = [lang.profile(lang.parse_response(d["response"]).style) for d in dialogues]
    _, counts = np.unique(profiles, return_counts=True)
    n_st = [len(c["statements"]) for c in characters]
    stats.update({
        "user_agreement": float(np.mean(sign_i == sign_j)),
        "characters": len(characters), "statements_min": min(n_st), "statements_max": max(n_st),
        "statements_mean": float(np.mean(n_st)),
        "slot_types": len({s["slot"].split(":")[0] for c in characters for s in c["statements"]}),
        "queries": {s: sum(q["split"] == s for q in queries) for s in ("train", "test")},
        "off_topic_queries": sum(q["slot"] is None for q in queries),
        "users": {s: sum(u["split"] == s for u in users) for s in ("train", "val", "test")},
        "dialogues": len(dialogues), "response_profiles": len(counts),
        "top_profile_share": float(counts.max() / counts.sum()),
        "population_bt_weights": theta.round(3).tolist(), "population": asdict(cfg.population),
    })
    return stats


def format_statistics(stats: dict) -> str:
    t = stats["test_target"]
    return "\n".join([
        f"characters {stats['characters']} (statements {stats['statements_min']}-{stats['statements_max']}, "
        f"mean {stats['statements_mean']:.1f}, {stats['slot_types']} slot types); queries {stats['queries']} "
        f"({stats['off_topic_queries']} off-topic)",
        f"users {stats['users']}; agreement between users on random pairs {stats['user_agreement']:.3f}",
        f"unseen users ({t['pairs']} target pairs): population-BT ceiling {t['population_bt']:.3f}, "
        f"Bayes ceiling {t['bayes_ceiling']:.3f}",
        f"seen users, unseen prompts: population-BT ceiling {stats['train_target']['population_bt']:.3f}, "
        f"Bayes ceiling {stats['train_target']['bayes_ceiling']:.3f}",
        f"dialogues {stats['dialogues']}: {stats['response_profiles']} attribute profiles, "
        f"largest {stats['top_profile_share']:.1%}",
    ])


# --- build and entry point --------------------------------------------------------------------------------------
TABLES = ("characters", "queries", "users", "pairs", "dialogues")


def save_table(rows: list[dict], path: Path) -> None:
    """Save rows as a dataset with a fingerprint derived from the content, so equal worlds are byte-identical."""
    import hashlib

    from datasets import Dataset

    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    table = Dataset.from_list(rows)
    Dataset(table.data, info=table.info, fingerprint=digest).save_to_disk(str(path))


def build_world(cfg: WorldSpec, out: Path) -> dict:
    """Generate every table, the tokenizer and the statistics into `out`; returns the statistics."""
    import datasets
    from tqdm.auto import tqdm

    mix = cfg.prompt_mix
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise ConfigError(f"world.prompt_mix: need three shares >= 0 (RAG, none, all statements), got {list(mix)}")
    datasets.disable_progress_bars()  # one bar for the whole build, below
    rng = np.random.default_rng(cfg.seed)
    steps = tqdm(total=6, desc="world", unit="step")
    characters = make_characters(rng, cfg)
    queries = make_queries(rng, characters, cfg.test_fraction)
    users = make_users(rng, cfg)
    steps.update(1)
    pairs = make_pairs(rng, cfg, users, queries, characters)
    steps.update(1)
    dialogues = make_dialogues(rng, cfg, characters, queries, users)
    steps.update(1)
    tables = dict(zip(TABLES, (characters, queries, users, pairs, dialogues), strict=True))
    for name, rows in tables.items():
        save_table(rows, out / name)
    steps.update(1)
    build_tokenizer(corpus(characters, queries, users, dialogues)).save_pretrained(str(out / "tokenizer"))
    steps.update(1)
    stats = statistics(characters, queries, users, pairs, dialogues, cfg)
    (out / "world.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    steps.update(1)
    steps.close()
    return stats


def load_world(path: str | Path) -> dict:
    """Every table of a world directory as a list of dicts, plus 'path' and 'stats'."""
    from datasets import load_from_disk

    path = Path(path)
    if not (path / "world.json").exists():
        raise FileNotFoundError(f"{path}: not a persona world (no world.json); build one: python -m alignment.world")
    world = {name: load_from_disk(str(path / name)).to_list() for name in TABLES}
    world.update(path=path, stats=json.loads((path / "world.json").read_text()))
    return world


def world_artifact(spec: WorldSpec, runs_dir: str = "runs") -> Path:
    """The cached world for a spec (built once under runs/cache/, reused while the spec is unchanged)."""
    from alignment.cache import cached_artifact

    return cached_artifact(f"world-v{WORLD_FORMAT}", spec, lambda out: build_world(spec, out), runs_dir=runs_dir)


def main(cfg: WorldConfig) -> Path:
    if cfg.describe:
        print(format_statistics(load_world(cfg.describe)["stats"]))
        return Path(cfg.describe)
    from alignment.runs import Run

    run = Run.start(cfg, "world", runs_dir=cfg.runs_dir, name=cfg.name)
    tmp = run.dir / "tmp-build"
    shutil.rmtree(tmp, ignore_errors=True)
    stats = build_world(cfg.world, tmp)
    for child in tmp.iterdir():
        child.rename(run.dir / child.name)
    tmp.rmdir()
    print(format_statistics(stats))
    run.finish(stats)
    return run.dir


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(WorldConfig, main)
