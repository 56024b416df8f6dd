"""The persona world's judge: ground-truth measurements of model samples.

Everything here reads text through `language.parse_response`, so it applies to any sample of any model. The
world's tables (`world.load_world`) give the truth: each character's facts, each query's slot.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from alignment import language as lang
from alignment import people

# A world-scored evaluation in which no row reaches this share of samples that parse as world text scores a policy
# that does not write the world's language (a pretrained model's English): its 0% valid and 0.5 win rates are void.
VOID_BELOW = 0.05


def void_note(valid: dict[str, float], what: str) -> str | None:
    """One line saying that `what` is void when every row's valid share (row -> share) is below VOID_BELOW."""
    if not valid or max(valid.values()) >= VOID_BELOW:
        return None
    shares = ", ".join(f"{name} {share:.0%}" for name, share in valid.items())
    return (f"{what} is void: the world's truth scores world sentences only, and no row's samples parse as one "
            f"({shares}); the policy does not write the world's language")


def facts_of(character: dict) -> list[tuple[str, str]]:
    return [(s["slot"], s["value"]) for s in character["statements"]]


def eval_prompts(world: dict, n: int, seed: int, *, characters: str | None = None, rag_k: int = 4):
    """`n` held-out (test-split) slot queries with the relevant statement in a k-statement system prompt.

    Returns a list of (query, character, messages). `characters` restricts to one character split.
    """
    from alignment.world import rag_statements

    rng = np.random.default_rng(seed)
    chars = {c["character_id"]: c for c in world["characters"] if characters in (None, c["split"])}
    pool = [q for q in world["queries"] if q["split"] == "test" and q["slot"] and q["character_id"] in chars]
    picked = [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
    out = []
    for q in picked:
        c = chars[q["character_id"]]
        system = rag_statements(rng, c["statements"], q["slot"], rag_k)
        out.append((q, c, [{"role": "system", "content": system}, {"role": "user", "content": q["text"]}]))
    return out


def response_quality(examples, responses: list[str]) -> dict:
    """Oracle summary of one response per (query, character, messages) example.

    valid: parses as a world sentence; answered: asserts the character's true value of the asked slot;
    contradicted: asserts a value that contradicts one of the character's statements; top_profile_share: the share
    of valid samples in the most common attribute profile (low = the samples spread across styles).
    """
    valid = answered = contradicted = 0
    profiles = Counter()
    for (q, c, _), text in zip(examples, responses, strict=True):
        parse = lang.parse_response(text)
        if parse is None:
            continue
        valid += 1
        profiles[lang.profile(parse.style)] += 1
        score = people.quality(facts_of(c), q["slot"], parse.fact)
        answered += score == 1.0
        contradicted += score == -1.0
    n = len(responses)
    return {"samples": n, "valid": valid / n, "answered": answered / n, "contradicted": contradicted / n,
            "profiles": len(profiles), "top_profile_share": max(profiles.values()) / max(valid, 1) if valid else 1.0}


def oracle_probabilities(facts: list[tuple[str, str]], query_slot: str | None, texts: list[str]):
    """The oracle's 0/1 stand-ins for the discriminators' outputs: p_rel (S,) from `language.relevant`, p_ent and
    p_con (R, S) from `language.nli_label` of each parsed text. Text that does not parse asserts nothing: it entails
    and contradicts no statement, like a neutral response."""
    import torch

    asserted = [parse.fact if (parse := lang.parse_response(text)) else None for text in texts]
    labels = [[lang.nli_label(f, fact) for f in facts] for fact in asserted]
    shape = (len(texts), len(facts))  # also for no texts (relevance only, as RAG prompts ask)
    p_rel = torch.tensor([float(lang.relevant(slot, query_slot)) for slot, _ in facts])
    p_ent = torch.tensor([[float(x == "entailed") for x in row] for row in labels]).reshape(shape)
    p_con = torch.tensor([[float(x == "contradicted") for x in row] for row in labels]).reshape(shape)
    return p_rel, p_ent, p_con
