"""Real datasets -> the record types of `alignment.records`: one small function per dataset.

    from alignment.adapters import ADAPTERS
    data = ADAPTERS["prism"]("/data/prism-alignment")               # a local copy, as published
    data = ADAPTERS["fspo_elix"]("Asap7772/elix_generations_gpt4omini_pref")   # a hub id
    write_jsonl("runs/world-prism/pairs.jsonl", data.pairs)

`source` is a local directory or file (JSONL / JSON / parquet / CSV, or a `save_to_disk` directory) or
a hub dataset id. Both are loaded through `datasets`; after loading, the code path is the same.
Every adapter returns an `Adapted`: users, pairs, characters, queries, episodes (whichever the
dataset has) and `counts` of what was read, kept and dropped, and why. Column names and nesting follow
each dataset's published schema (research/reward_models.md §2, §3, §5; research/apc_fspo.md §1.5,
§2.2-2.3); where the notes leave a detail open, the choice is a named constant below with its reason.

Errors: a missing column, or a value of the wrong type, raises `RecordError`, one line naming the
file (or `hub-id[split]`) and the 0-based row, e.g.
`data/elix/train.jsonl row 3: column 'label' must be a number, got str`. A missing *value* (null,
NaN) is not an error: that row or response is dropped and counted in `counts`.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignment.data_files import Part, load_parts, read_column, read_file, require_columns
from alignment.records import Character, Episode, PreferencePair, Query, RecordError, Statement, User


@dataclass(frozen=True)
class Adapted:
    """What an adapter returns. `counts` keys are documented in each adapter's docstring."""

    users: list[User] = field(default_factory=list)
    pairs: list[PreferencePair] = field(default_factory=list)
    characters: list[Character] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def _user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# PRISM

# A PRISM participant's persona: the survey self-description (their values and beliefs) and the
# system prompt they wrote for an assistant, both free text by the user. SynthesizeMe
# (arXiv:2506.05598) found user-written text beats demographics. Chosen here; the notes leave it open.
PRISM_PERSONA_FIELDS = ("self_description", "system_string")
# PRISM stores an empty model reply as this literal string (PRISM codebook, `model_response`).
PRISM_EMPTY_REPLY = "EMPTY STRING"


def prism(source: str) -> Adapted:
    """PRISM (Kirk et al. 2024, arXiv:2404.16019; hub HannahRoseKirk/prism-alignment) -> users + pairs.

    Reads two tables, as published: a directory with `survey.jsonl` and `conversations.jsonl`, or the
    hub id (configs "survey" and "conversations").
      survey:        user_id, and PRISM_PERSONA_FIELDS (self_description, system_string).
      conversations: user_id, conversation_id, conversation_history = list of {turn, role ("user" or
                     "model"), content, and for model replies score (1-100) and if_chosen}.
    Users: one per PRISM user_id with at least one pair. persona = the PRISM_PERSONA_FIELDS texts
      joined by a blank line; "" when the user has no survey row (counted `users_without_survey`).
    Pairs: at every turn, the chosen reply (if_chosen, the user's highest rating) against each other
      reply of that turn. prompt = the conversation up to the turn: earlier user messages and the
      chosen replies (role "assistant"), then this turn's user message. chosen_reward /
      rejected_reward = the ratings; prompt_id = "{conversation_id}:{turn}"; split None (PRISM has
      none; split by user downstream). A reply of PRISM_EMPTY_REPLY becomes "".
    Dropped, counted: `ties_dropped` (rated the same as the chosen reply; PRISM broke those ties at
      random), `identical_dropped` (same text as the chosen reply), `conflicts_dropped` (rated above
      the chosen reply), `missing_dropped` (a reply with null score or content), `turns_skipped` (no
      single user message or chosen reply; the turns after it lose their history, so they go too).
    """
    counts: Counter = Counter()
    personas = _prism_personas(load_parts(source, "survey"))
    pairs: list[PreferencePair] = []
    for part in load_parts(source, "conversations"):
        require_columns(part, ["user_id", "conversation_id", "conversation_history"])
        counts["rows"] += len(part.rows)
        for i, row in enumerate(part.rows):
            pairs += _prism_conversation(row, f"{part.where} row {i}", counts)
    users = []
    for user_id in dict.fromkeys(p.user_id for p in pairs):  # first-appearance order
        counts["users_without_survey"] += user_id not in personas
        users.append(User(user_id=user_id, persona=personas.get(user_id, "")))
    counts.update(pairs=len(pairs), users=len(users))
    return Adapted(users=users, pairs=pairs, counts=counts)


def _prism_personas(parts: list[Part]) -> dict[str, str]:
    personas = {}
    for part in parts:
        require_columns(part, ["user_id", *PRISM_PERSONA_FIELDS])
        for i, row in enumerate(part.rows):
            where = f"{part.where} row {i}"
            user_id = read_column(row, "user_id", "string", where, required=True)
            texts = [read_column(row, name, "string", where) for name in PRISM_PERSONA_FIELDS]
            personas[user_id] = "\n\n".join(t.strip() for t in texts if t and t.strip())
    return personas


def _prism_conversation(row: dict, where: str, counts: Counter) -> list[PreferencePair]:
    """One conversation tree -> its pairs, turn by turn, carrying the chosen path as history."""
    user_id = read_column(row, "user_id", "string", where, required=True)
    conversation_id = read_column(row, "conversation_id", "string", where, required=True)
    turns = _prism_turns(read_column(row, "conversation_history", "list", where, required=True), where, counts)
    history: list[dict] = []
    pairs = []
    for n, turn in enumerate(sorted(turns)):
        user_texts, replies = turns[turn]
        chosen = [r for r in replies if r["if_chosen"]]
        # Several chosen entries happen (duplicates of one reply); different texts would be ambiguous.
        if len(user_texts) != 1 or None in user_texts or len({r["content"] for r in chosen}) != 1:
            counts["turns_skipped"] += len(turns) - n
            break
        best = chosen[0]
        prompt = [*history, *_user_prompt(user_texts[0])]
        for reply in replies:
            if reply["if_chosen"]:
                continue
            reason = _prism_drop_reason(best, reply)
            if reason:
                counts[reason] += 1
                continue
            pairs.append(PreferencePair(
                user_id=user_id, prompt=prompt, chosen=best["content"], rejected=reply["content"],
                prompt_id=f"{conversation_id}:{turn}", chosen_reward=best["score"], rejected_reward=reply["score"]))
        history = [*prompt, {"role": "assistant", "content": best["content"]}]
    return pairs


def _prism_drop_reason(best: dict, reply: dict) -> str | None:
    if reply["content"] == best["content"]:
        return "identical_dropped"
    if reply["score"] == best["score"]:
        return "ties_dropped"
    if reply["score"] > best["score"]:
        return "conflicts_dropped"
    return None


def _prism_turns(history: list, where: str, counts: Counter) -> dict[int, tuple[list, list]]:
    """conversation_history -> {turn: ([user texts], [model replies as {content, score, if_chosen}])}."""
    turns: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for j, entry in enumerate(history):
        label = f"conversation_history[{j}]"
        if not isinstance(entry, dict):
            raise RecordError(f"{where}: {label} must be an object, got {type(entry).__name__}")
        turn = read_column(entry, "turn", "integer", where, required=True, label=f"{label}.turn")
        role = read_column(entry, "role", "string", where, required=True, label=f"{label}.role")
        content = read_column(entry, "content", "string", where, label=f"{label}.content")
        if role == "user":
            turns[turn][0].append(content)
            continue
        if role != "model":
            raise RecordError(f"{where}: {label}.role must be 'user' or 'model', got {role!r}")
        score = read_column(entry, "score", "number", where, label=f"{label}.score")
        chosen = read_column(entry, "if_chosen", "boolean", where, required=True, label=f"{label}.if_chosen")
        if content is None or score is None:
            counts["missing_dropped"] += 1
            continue
        content = "" if content == PRISM_EMPTY_REPLY else content
        turns[turn][1].append({"content": content, "score": float(score), "if_chosen": chosen})
    return turns


# ---------------------------------------------------------------------------------------------
# PersonalLLM

# (mean, sd) of each of the 10 reward models' raw scores, as published with PersonalLLM
# (namkoong-lab/PersonalLLM, eval/constants.py); a user's reward standardizes with them:
# r_u(x, y) = sum_k w_uk (R_k(x, y) - mean_k) / sd_k. Sorted by alias, as the reference code sorts
# them, so User.weights[k] is the weight of the k-th alias here. (beaver_7b is a *cost* model; the
# reference uses it as-is, and so do we.)
PERSONAL_LLM_RMS = {
    "beaver_7b": (6.233516894340515, 3.012641148973965),
    "gemma_2b": (4.3304170169830325, 2.038611338958803),
    "gemma_7b": (1.6259730467796325, 2.6096741570264976),
    "llama3_sfairx": (1.0637639780044557, 2.953017385451928),
    "mistral_raft": (8.309211883544922, 3.0728436748484533),
    "mistral_ray": (3.0136284782886507, 1.6902981149232585),
    "mistral_weqweasdas": (7.071075622558594, 2.578636650248985),
    "oasst_deberta_v3": (2.8976835689097644, 1.7207868789061331),
    "oasst_pythia_1b": (4.293944010734558, 2.3018268820938133),
    "oasst_pythia_7b": (4.706351243972779, 1.3659142113789966),
}
PERSONAL_LLM_RESPONSES = 8  # response_1 .. response_8 per prompt


def personal_llm(source: str, n_users: int = 1000, alpha: float = 0.1, pairs_per_user: int = 50,
                 seed: int = 0) -> Adapted:
    """PersonalLLM (Zollo et al., ICLR 2025, arXiv:2409.20296; hub namkoong-lab/PersonalLLM) -> users + pairs.

    Reads per row: prompt, response_1..8, the 80 scores response_{i}_{alias} for the aliases of
    PERSONAL_LLM_RMS, and prompt_id when present (else prompt_id = "{split}-{row}").
    Users: simulated, one per weight vector w_u ~ Dirichlet(alpha * 1_10), drawn with `seed`
      (alpha = 0.1 and 1000 users as in LoRe, arXiv:2504.14439; PersonalLLM's own default is 0.01,
      near one-hot users). User.weights = w_u (order of PERSONAL_LLM_RMS); persona "" (the dataset
      has no user text: users are known by their labels).
    Pairs: per split and user, `pairs_per_user` distinct prompts (all of them if fewer), and on each
      two distinct responses drawn from all 8 (the reference draws from 1..7, a quirk,
      reward_models.md §3.2). Label deterministic as in the paper: chosen = higher r_u (no BT noise);
      chosen_reward / rejected_reward = r_u.
    Dropped, counted: `responses_missing` (a response with null text or any null score: not drawn),
      `rows_dropped` (null prompt, or fewer than 2 usable responses), `ties_dropped` (equal r_u or
      identical texts).
    """
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(len(PERSONAL_LLM_RMS), alpha), size=n_users)  # (U, 10)
    users = [User(user_id=f"personal_llm-{u}", persona="", weights=w.tolist()) for u, w in enumerate(weights)]
    counts: Counter = Counter()
    pairs = []
    for part in load_parts(source):
        table = _personal_llm_table(part, counts)
        for user, w in zip(users, weights, strict=True):
            for t in rng.choice(len(table), size=min(pairs_per_user, len(table)), replace=False):
                prompt_id, prompt, texts, z = table[t]
                a, b = rng.choice(len(texts), size=2, replace=False)
                r = z @ w  # (n_responses,) this user's reward of each usable response
                if r[a] == r[b] or texts[a] == texts[b]:
                    counts["ties_dropped"] += 1
                    continue
                hi, lo = (a, b) if r[a] > r[b] else (b, a)
                pairs.append(PreferencePair(
                    user_id=user.user_id, prompt=_user_prompt(prompt), chosen=texts[hi], rejected=texts[lo],
                    prompt_id=prompt_id, chosen_reward=float(r[hi]), rejected_reward=float(r[lo]), split=part.split))
    counts.update(pairs=len(pairs), users=len(users))
    return Adapted(users=users, pairs=pairs, counts=counts)


def _personal_llm_table(part: Part, counts: Counter) -> list[tuple[str, str, list[str], np.ndarray]]:
    """Rows -> [(prompt_id, prompt, usable response texts, standardized scores (n_usable, 10))]."""
    ks = range(1, PERSONAL_LLM_RESPONSES + 1)
    scores = [f"response_{k}_{rm}" for k in ks for rm in PERSONAL_LLM_RMS]
    require_columns(part, ["prompt", *[f"response_{k}" for k in ks], *scores])
    has_id = "prompt_id" in part.rows.column_names
    mean, sd = np.array(list(PERSONAL_LLM_RMS.values())).T  # (10,), (10,)
    counts["rows"] += len(part.rows)
    table = []
    for i, row in enumerate(part.rows):
        where = f"{part.where} row {i}"
        prompt = read_column(row, "prompt", "string", where)
        prompt_id = str(read_column(row, "prompt_id", "id", where, required=True)) if has_id else f"{part.split}-{i}"
        texts, raw = [], []
        for k in ks:
            text = read_column(row, f"response_{k}", "string", where)
            scores = [read_column(row, f"response_{k}_{rm}", "number", where) for rm in PERSONAL_LLM_RMS]
            if text is None or None in scores:
                counts["responses_missing"] += 1
                continue
            texts.append(text)
            raw.append(scores)
        if prompt is None or len(texts) < 2:
            counts["rows_dropped"] += 1
            continue
        table.append((prompt_id, prompt, texts, (np.array(raw) - mean) / sd))
    return table


# ---------------------------------------------------------------------------------------------
# APC characters

# Real APC statements are untyped sentences, so each statement is its own slot "s{index}" (its index
# among the character's statements) and its value is the statement text. The relevant-query file
# names the statement each query was written for, which links queries to these slots.
APC_QUERY_FILE = "{stem}.query_relevant_to_statement.json"


def apc_characters(source: str) -> Adapted:
    """APC persona statements (Peng & Shang, NeurIPS 2024, arXiv:2405.07726) -> characters + queries.

    source: the official repo's `statement/` folder (KomeijiForce/Active_Passive_Constraint_Koishiday_2024)
    or one `{name}.json` from it; a hub id is read the same way (statement rows, no queries).
      {name}.json: a JSON list of {character, passage, statement}; `character` names the character
        (character_id = name = that field), `statement` is one persona statement (`passage`, the
        source text, is not read). Files with more dots ({name}.nli.json, ...) are other tables.
      {name}.query_relevant_to_statement.json (beside it, optional): a JSON list of
        {statement, queries: [str]}; each query becomes a Query on that statement's slot.
    Dropped, counted: `statements_missing` (null statement), `queries_unmatched` (a query whose
      statement is not among the character's statements).
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if "." not in p.stem)
        if not files:
            raise RecordError(f"{source}: no statement files ({{name}}.json)")
        parts = [Part("train", str(f), read_file(f)) for f in files]
    else:
        parts = load_parts(source)
    counts: Counter = Counter()
    characters, queries = [], []
    for part in parts:
        found = _apc_statements(part, counts)
        if {c.character_id for c in found} & {c.character_id for c in characters}:
            raise RecordError(f"{part.where}: a character here also appears in an earlier statement file")
        characters += found
        query_file = Path(part.where).with_name(APC_QUERY_FILE.format(stem=Path(part.where).stem))
        if query_file.is_file():
            queries += _apc_queries(query_file, found, counts)
    counts.update(characters=len(characters), queries=len(queries))
    return Adapted(characters=characters, queries=queries, counts=counts)


def _apc_statements(part: Part, counts: Counter) -> list[Character]:
    require_columns(part, ["character", "statement"])
    by_name: dict[str, list[str]] = {}
    for i, row in enumerate(part.rows):
        where = f"{part.where} row {i}"
        name = read_column(row, "character", "string", where, required=True)
        text = read_column(row, "statement", "string", where)
        if text is None:
            counts["statements_missing"] += 1
            continue
        by_name.setdefault(name, []).append(text.strip())
        counts["statements"] += 1
    return [Character(character_id=name, name=name,
                      statements=[Statement(slot=f"s{j}", value=t, text=t) for j, t in enumerate(texts)])
            for name, texts in by_name.items()]


def _apc_queries(path: Path, characters: list[Character], counts: Counter) -> list[Query]:
    part = Part("train", str(path), read_file(path))
    require_columns(part, ["statement", "queries"])
    slot_of = {s.text: (c.character_id, s.slot) for c in characters for s in c.statements}
    queries = []
    for i, row in enumerate(part.rows):
        where = f"{part.where} row {i}"
        statement = read_column(row, "statement", "string", where, required=True)
        texts = read_column(row, "queries", "list", where) or []
        if statement.strip() not in slot_of:
            counts["queries_unmatched"] += len(texts)
            continue
        character_id, slot = slot_of[statement.strip()]
        for text in texts:
            if not isinstance(text, str):
                raise RecordError(f"{where}: column 'queries' must hold strings, got {type(text).__name__}")
            # numbered within the file, so two rows on one statement cannot collide
            queries.append(Query(query_id=f"{character_id}/q{len(queries)}", character_id=character_id, slot=slot,
                                 text=text.strip()))
    return queries


# ---------------------------------------------------------------------------------------------
# FSPO: Roleplay, ELIX, Review (Singh et al., arXiv:2502.19312; code Asap7772/fewshot-preference-optimization)


def fspo_roleplay(source: str, shots: int = 8, seed: int = 0) -> Adapted:
    """FSPO Roleplay (hub sher222/persona-iterative-responses) -> users + pairs + episodes.

    Reads: x (question), yw (preferred), yl (dispreferred), level (which synthetic user; paper: 1,500),
    score_persona (that user's description). Users: one per `level`, persona = its score_persona (the
    first non-null one). shots = 8 as in the reference. Counts: see `_fspo_pair` and `_fspo_result`.
    """
    counts: Counter = Counter()
    pairs, personas = [], {}
    for part in load_parts(source):
        require_columns(part, ["x", "yw", "yl", "level", "score_persona"])
        counts["rows"] += len(part.rows)
        for i, row in enumerate(part.rows):
            where = f"{part.where} row {i}"
            user_id = str(read_column(row, "level", "id", where, required=True))
            persona = read_column(row, "score_persona", "string", where)
            if persona and not personas.get(user_id):
                personas[user_id] = persona.strip()
            x, yw, yl = (read_column(row, c, "string", where) for c in ("x", "yw", "yl"))
            pairs.append(_fspo_pair(user_id, x, yw, yl, part.split, counts))
    return _fspo_result(pairs, personas, shots, seed, counts)


def fspo_elix(source: str, shots: int = 4, seed: int = 0) -> Adapted:
    """FSPO ELIX, "explain like I'm X" (hub Asap7772/elix_generations_gpt4omini_pref) -> users + pairs + episodes.

    Users: one per `scorer_level` (an education level), persona "The user is {level}." as in the
    reference prompts. shots = 4 as in the reference. Columns and counts: `_fspo_labelled`.
    """
    return _fspo_labelled(source, lambda level: f"The user is {level}.", shots, seed)


def fspo_review(source: str, shots: int = 8, seed: int = 0) -> Adapted:
    """FSPO Review (hub Asap7772/steered_reviews_full_autolabel_gpt4o_pref) -> users + pairs + episodes.

    Users: one per `scorer_level` (positive, concise, positive+concise, ...), persona "This user
    prefers positive and concise reviews." (the reference's sentence for each level). shots = 8: both
    reference configs use 8 (apc_fspo.md §2.3). Columns and counts: `_fspo_labelled`.
    """
    return _fspo_labelled(source, lambda level: f"This user prefers {' and '.join(level.split('+'))} reviews.",
                          shots, seed)


def _fspo_labelled(source: str, persona_of: Callable[[str], str], shots: int, seed: int) -> Adapted:
    """ELIX / Review rows -> Adapted. Reads prompt, response_x, response_y, scorer_level (the user) and
    label: 0 = response_x preferred, 1 = response_y. Any other label (some AI-feedback releases mark a
    tie or an order-inconsistent verdict that way) is counted `ties_dropped`; a null label
    `missing_dropped`. level_x / level_y (the generation levels) are not needed and not read.
    """
    counts: Counter = Counter()
    pairs, personas = [], {}
    for part in load_parts(source):
        require_columns(part, ["prompt", "response_x", "response_y", "label", "scorer_level"])
        counts["rows"] += len(part.rows)
        for i, row in enumerate(part.rows):
            where = f"{part.where} row {i}"
            level = read_column(row, "scorer_level", "string", where, required=True)
            personas.setdefault(level, persona_of(level))
            label = read_column(row, "label", "number", where)
            x, a, b = (read_column(row, c, "string", where) for c in ("prompt", "response_x", "response_y"))
            if label is None or label not in (0, 1):
                counts["missing_dropped" if label is None else "ties_dropped"] += 1
                continue
            yw, yl = (a, b) if label == 0 else (b, a)
            pairs.append(_fspo_pair(level, x, yw, yl, part.split, counts))
    return _fspo_result(pairs, personas, shots, seed, counts)


def _fspo_pair(user_id: str, x, yw, yl, split: str, counts: Counter) -> PreferencePair | None:
    """Counts `missing_dropped` (a null text) and `ties_dropped` (same text after stripping)."""
    if x is None or yw is None or yl is None:
        counts["missing_dropped"] += 1
        return None
    # The reference strips every text before rendering (preference_datasets.py); so do we.
    x, yw, yl = x.strip(), yw.strip(), yl.strip()
    if yw == yl:
        counts["ties_dropped"] += 1
        return None
    return PreferencePair(user_id=user_id, prompt=_user_prompt(x), chosen=yw, rejected=yl, split=split)


def _fspo_result(pairs: list, personas: dict[str, str], shots: int, seed: int, counts: Counter) -> Adapted:
    """Dedupe, cut episodes, count: `duplicates_dropped` (a user's exact repeat of a pair, which could
    otherwise land in the context and as the target), `episodes`, `pairs_not_in_episodes` (each
    user-split's remainder after cutting chunks of shots + 1)."""
    seen, kept = set(), []
    for pair in filter(None, pairs):
        key = (pair.user_id, pair.split, json.dumps(pair.prompt), pair.chosen, pair.rejected)
        counts["duplicates_dropped"] += key in seen
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    episodes = make_episodes(kept, shots, seed)
    users = [User(user_id=u, persona=personas.get(u, "")) for u in dict.fromkeys(p.user_id for p in kept)]
    counts.update(pairs=len(kept), users=len(users), episodes=len(episodes),
                  pairs_not_in_episodes=len(kept) - len(episodes) * (shots + 1))
    return Adapted(users=users, pairs=kept, episodes=episodes, counts=counts)


def make_episodes(pairs: list[PreferencePair], shots: int, seed: int) -> list[Episode]:
    """Cut each user's pairs (within one split) into episodes of `shots` context pairs + 1 target.

    As FSPO's reference: group by user, shuffle, take consecutive chunks. Unlike it: the stride is
    shots + 1 (the reference strides shots + 2 and silently wastes a row, apc_fspo.md §2.8), the
    shuffle is seeded, and there is one pass (re-sampling episodes, e.g. with variable k, is the
    trainer's job). Users and splits are visited in sorted order, so the result depends only on seed.
    """
    groups: dict[tuple[str, str], list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        groups[(pair.split or "", pair.user_id)].append(pair)
    rng = random.Random(seed)
    episodes = []
    for key in sorted(groups):
        group = list(groups[key])
        rng.shuffle(group)
        for start in range(0, len(group) - shots, shots + 1):
            chunk = group[start : start + shots + 1]
            episodes.append(Episode(user_id=key[1], shots=chunk[:shots], target=chunk[shots]))
    return episodes


ADAPTERS: dict[str, Callable[..., Adapted]] = {
    "prism": prism,
    "personal_llm": personal_llm,
    "apc_characters": apc_characters,
    "fspo_roleplay": fspo_roleplay,
    "fspo_elix": fspo_elix,
    "fspo_review": fspo_review,
}


# ---------------------------------------------------------------------------------------------
# Splits of adapter data, shared by every recipe that trains on it (sft, dpo, fspo).


def read_adapter(data: Any) -> Adapted:
    """`ADAPTERS[data.adapter](data.source)` for an `alignment.config.AdapterData`; an unknown name is one line."""
    from alignment.config import ConfigError

    if data.adapter not in ADAPTERS:
        raise ConfigError(f"data.adapter: unknown adapter {data.adapter!r} (known: {', '.join(ADAPTERS)})")
    return ADAPTERS[data.adapter](data.source)


def split_users(pairs: list[PreferencePair], shares: list[float], seed: int) -> dict[str, dict[str, list]]:
    """{"train" | "val" | "test": {user_id: that user's pairs}}: a seeded permutation of the users (sorted first,
    so the split depends on the seed only) cut by `shares` (`split_counts`); users in permutation order."""
    pools: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        pools.setdefault(pair.user_id, []).append(pair)
    users = sorted(pools)
    names = [users[i] for i in np.random.default_rng(seed).permutation(len(users))]
    bounds = np.cumsum([0, *split_counts(len(names), shares)])
    return {s: {u: pools[u] for u in names[bounds[i]:bounds[i + 1]]}
            for i, s in enumerate(("train", "val", "test"))}


def split_counts(n: int, shares: list[float]) -> list[int]:
    """Users per split: floor(n * share) with the remainder to train, then at least one for every non-zero share
    while some split has two to give (taken from the largest)."""
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"data.users: expected 3 non-negative shares (train, val, test), got {shares}")
    counts = [int(n * s / sum(shares) + 1e-9) for s in shares]
    counts[0] += n - sum(counts)
    for i, share in enumerate(shares):
        if share > 0 and counts[i] == 0 and max(counts) > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    return counts
