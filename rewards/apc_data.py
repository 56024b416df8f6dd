"""Training and evaluation data of the APC discriminators, labelled exactly by the persona world's oracle.

Relevance examples (query, statement) -> relevant / irrelevant and NLI examples (statement, response) ->
contradicted / neutral / entailed, drawn from a world split's characters and queries in minimal pairs and triples
(`relevance_pair`, `nli_triple`), plus the natural NLI distribution of real world responses
(`natural_nli_examples`), on which the classifiers are measured. `rewards.discriminators` trains on them.
"""

from __future__ import annotations

import numpy as np

from alignment import language as lang
from alignment import people
from alignment.language import NLI_LABELS, relevant
from alignment.world import WorldSpec

# Examples come in minimal pairs (relevance) and triples (NLI) that differ in one part only, so the only thing that
# tells their labels apart is the comparison the classifier has to learn, not a style or query shortcut.
ON_TOPIC = 0.6  # share of NLI queries about the statement's slot; the label does not depend on the query
OFF_TOPIC_NEGATIVES = 0.25  # share of relevance negatives with an off-topic query; the rest ask about another slot
# The neutral response of a triple: another slot of the statement's family (the hard case, and the common one in
# APC, where most of a character's statements are opinions and a response asserts one fact), another family, or
# chit-chat. With (0.6, 0.4) of the character's facts plus chit-chat, 83% of the held-out "maps ... like" against
# "rain ... like" cases were misread after 1500 steps (they were 10% of the neutral examples).
NEUTRAL_SAME_FAMILY = 0.6
NEUTRAL_OTHER_FAMILY = 0.2
# Share of NLI statements whose value is drawn from all of the slot's values instead of the character's own. With
# only the characters' facts, every value appears contradicted but only a few appear entailed, and the classifier
# memorized which (statement, response) value pairs agree: training loss 0.03 after 1200 steps while holdout
# characters' entailments were read at 0.81 recall (0.75 on the natural distribution).
OTHER_VALUE = 0.5
VARY_STATEMENT = 0.5  # share of NLI triples that fix the response and vary the statement (see `nli_triple`)


# --- data from the world's oracle ---------------------------------------------------------------------------------
# An example is (format arguments, label index): ((character, statement, query[, response]), label).

def queries_by_slot(world: dict) -> dict[str, dict[str | None, list[str]]]:
    """character_id -> slot (None = off-topic) -> query texts."""
    out: dict[str, dict[str | None, list[str]]] = {}
    for q in world["queries"]:
        out.setdefault(q["character_id"], {}).setdefault(q["slot"], []).append(q["text"])
    return out


def relevance_pair(character: dict, queries: dict, rng) -> list[tuple[tuple, int]]:
    """One statement with a query about its slot and a query about another slot (or off-topic), labelled by the
    oracle. Both queries use the same paraphrase when they can ("do you like rain ?" / "do you like maps ?")."""

    asked = queries[character["character_id"]]
    s = character["statements"][rng.integers(len(character["statements"]))]
    others = [slot for slot in asked if slot not in (s["slot"], None)]
    other = None if rng.random() < OFF_TOPIC_NEGATIVES or not others else others[rng.integers(len(others))]
    i = int(rng.integers(len(asked[s["slot"]])))
    return [((character["name"], s["text"], asked[slot][i % len(asked[slot])]), int(relevant(s["slot"], slot)))
            for slot in (s["slot"], other)]


def neutral_fact(statement_slot: str, facts: dict[str, str], rng) -> tuple[str, str] | None:
    """The content of a response that is neutral to a statement about `statement_slot`: another slot of the same
    family (an opinion about another item for an opinion, another single slot for a single one) with probability
    NEUTRAL_SAME_FAMILY, another slot of the other family with NEUTRAL_OTHER_FAMILY, else chit-chat (None). The
    value is the character's own when it has the slot and a coin says so, else any value of the slot: a response
    may assert anything about the slots the statement is not about."""

    u = rng.random()
    if u >= NEUTRAL_SAME_FAMILY + NEUTRAL_OTHER_FAMILY:
        return None
    opinion = statement_slot.startswith("opinion:")
    same_family = u < NEUTRAL_SAME_FAMILY
    slots = [slot for slot in lang.all_slots() if slot != statement_slot
             and slot.startswith("opinion:") == (opinion if same_family else not opinion)]
    slot = slots[rng.integers(len(slots))]
    values = lang.slot_values(slot)
    value = facts[slot] if slot in facts and rng.random() < 0.5 else values[rng.integers(len(values))]
    return slot, value


def nli_triple(character: dict, queries: dict, rng) -> list[tuple[tuple, int]]:
    """Three examples, one per label, that differ in one part only. Half the draws fix the statement and vary the
    response's content clause (one sampled style): the statement's value (entailed), another value of its slot
    (contradicted), a fact about another slot or chit-chat (neutral, `neutral_fact`: mostly the hard case "maps is
    something i like ." against "rain is something i like ."). The other half fix the response and vary the
    statement the same way, so that neither part alone predicts the label. Labelled by the oracle from the parsed
    text. The query (not in the world's NLI input, see `world_nli_text`) is another of the character's queries 40%
    of the time."""

    facts = {st["slot"]: st["value"] for st in character["statements"]}
    asked = queries[character["character_id"]]
    s = character["statements"][rng.integers(len(character["statements"]))]
    fact = (s["slot"], s["value"])
    if rng.random() < OTHER_VALUE:  # as if the character held another value of the slot
        values = lang.slot_values(s["slot"])
        fact = (s["slot"], values[rng.integers(len(values))])
    slot = s["slot"] if rng.random() < ON_TOPIC else list(asked)[rng.integers(len(asked))]
    query = asked[slot][rng.integers(len(asked[slot]))]
    style, chat = people.sample_style(rng), int(rng.integers(len(lang.NEUTRAL_CLAUSES)))
    wrong = [v for v in lang.slot_values(fact[0]) if v != fact[1]]
    neutral = neutral_fact(fact[0], facts, rng)
    contradicting = (fact[0], wrong[rng.integers(len(wrong))])
    vary_statement = rng.random() < VARY_STATEMENT
    while vary_statement and neutral is None:  # a statement is always a fact
        neutral = neutral_fact(fact[0], facts, rng)
    varied = [fact, contradicting, neutral]  # entailed, contradicted, neutral
    if vary_statement:
        response = lang.render_response(fact, chat, style)
        pairs = [(statement, response) for statement in varied]
    else:
        pairs = [(fact, lang.render_response(content, chat, style)) for content in varied]
    return [((character["name"], lang.statement_text(*statement), query, response),
             NLI_LABELS.index(lang.nli_label(statement, lang.parse_response(response).fact)))
            for statement, response in pairs]


def natural_nli_examples(world: dict, split: str, responses: int, seed: int) -> list[list[tuple[tuple, int]]]:
    """The NLI inputs APC actually scores: for each of `responses` world responses to a character's query (content
    drawn with the world's SFT content mix, so mostly answers), one example per statement of the character, labelled
    by the oracle. Grouped by response; nearly all are neutral, which is the case ΔAPC's passive penalty sums."""

    characters = [c for c in world["characters"] if c["split"] == split]
    rng, queries = np.random.default_rng(seed), queries_by_slot(world)
    mix = tuple(WorldSpec().content_mix)  # the default world's (the world directory does not record its own)
    groups = []
    for _ in range(responses):
        c = characters[rng.integers(len(characters))]
        asked = queries[c["character_id"]]
        slot = list(asked)[rng.integers(len(asked))]
        query = asked[slot][rng.integers(len(asked[slot]))]
        fact, neutral = people.sample_content(rng, [(s["slot"], s["value"]) for s in c["statements"]], slot, mix)
        response = lang.render_response(fact, neutral, people.sample_style(rng))
        groups.append([((c["name"], s["text"], query, response),
                        NLI_LABELS.index(lang.nli_label((s["slot"], s["value"]), fact))) for s in c["statements"]])
    return groups


EXAMPLES = {"relevance": relevance_pair, "nli": nli_triple}  # each draw holds one example of every label


def make_examples(world: dict, split: str, what: str, n: int, seed: int) -> list[tuple[tuple, int]]:
    """`n` examples per label of classifier `what` (n pairs or triples) from the characters of one split."""
    characters = [c for c in world["characters"] if c["split"] == split]
    if not characters:
        raise ValueError(f"{world['path']}: no characters with split == {split!r}")
    rng, queries = np.random.default_rng(seed), queries_by_slot(world)
    return [e for _ in range(n) for e in EXAMPLES[what](characters[rng.integers(len(characters))], queries, rng)]
