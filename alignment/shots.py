"""Few-shot user episodes for FSPO: which of a user's labelled pairs go into the prompt, and how they are rendered.

FSPO (Singh et al., arXiv:2502.19312, eq. 5) treats each user as a task: an *episode* is k labelled pairs of one
user shown in the prompt (the shots) plus one more pair of the same user that the loss is computed on (the
target). Everything here is a pure function of its inputs (records, a tokenizer, a numpy Generator):

    sample_episodes   per user, never per prompt string; k drawn per episode from [k_min, k_max]; seeded
    FORMATS           how shots become chat messages: `world` (compact, the persona world's own words), `diff`
                      (`world` with each shot cut to the words where its two responses differ) and `fspo` (the
                      paper's markdown, research/apc_fspo.md §2.2); golden-file tested
    fit_episode       meets a token budget by dropping whole shots, never the task line or the final question,
                      and keeps at least one target token, or reports the example as dropped

Differences from the reference code (apc_fspo.md §2.8): its truncation cuts the end of the prompt (the task and
the question) and can leave zero target tokens; its k is fixed per dataset; its episodes are keyed by prompt
string; its data order ignores the seed. Unlike the paper, prompts go through the chat template (the few-shot block
is a user turn), and the completion is the bare response: the assistant turn already marks where it starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from alignment.adapters import read_adapter, split_users
from alignment.config import AdapterData
from alignment.records import Episode, PreferencePair

# --- episodes ---------------------------------------------------------------------------------------------------


def group_by_user(pairs: list[PreferencePair]) -> dict[str, list[PreferencePair]]:
    """user_id -> that user's pairs, in input order; users in sorted order (so results depend on the seed only)."""
    groups: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        groups.setdefault(pair.user_id, []).append(pair)
    return dict(sorted(groups.items()))


def sample_episodes(shot_pools: dict[str, list[PreferencePair]], per_user: int, k_min: int, k_max: int,
                    rng: np.random.Generator, target_pools: dict[str, list[PreferencePair]] | None = None,
                    targets_per_shots: int = 1) -> list[Episode]:
    """`per_user` episodes for every user of `shot_pools`; each drawn set of k ~ U{k_min..k_max} shots serves
    `targets_per_shots` consecutive episodes (which then share their few-shot prompt up to the target's turns).

    Targets come from `target_pools[user]` (held-out prompts) or, when None, from the shot pool itself, in which
    case no target is one of its own shots. Targets cycle through a seeded permutation of the pool, so a user's
    pairs are used evenly. k is capped at the pairs available (a pool of 5 gives at most 4 shots when one target
    comes from it too). Users are visited in sorted order.
    """
    if not 0 <= k_min <= k_max:
        raise ValueError(f"sample_episodes: need 0 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if targets_per_shots < 1:
        raise ValueError(f"sample_episodes: targets_per_shots={targets_per_shots}, need >= 1")
    episodes = []
    for user in sorted(shot_pools):
        pool = shot_pools[user]
        targets = pool if target_pools is None else target_pools.get(user, [])
        if not targets:
            continue
        order = rng.permutation(len(targets))
        for start in range(0, per_user, targets_per_shots):
            chunk = [targets[order[i % len(targets)]] for i in range(start, min(per_user, start + targets_per_shots))]
            candidates = [p for p in pool if p not in chunk]  # by value: an exact duplicate would leak the label
            k = min(int(rng.integers(k_min, k_max + 1)), len(candidates))
            shots = [candidates[j] for j in rng.choice(len(candidates), size=k, replace=False)]
            episodes += [Episode(user_id=user, shots=shots, target=target) for target in chunk]
    return episodes


# --- formats ----------------------------------------------------------------------------------------------------
# A format turns (shots, the target's prompt messages, describe?) into the chat messages of the few-shot prompt,
# joins a user description to a response for the user-description variant (the paper's "RAT"/"COT", §2.2), and
# splits a sampled completion back into (description, response).


class Format(NamedTuple):
    prompt: Callable[[list[PreferencePair], list[dict], bool], list[dict]]
    join: Callable[[str, str], str]  # (description, response) -> completion
    split: Callable[[str], tuple[str, str]]  # completion -> (description, response)


def world_prompt(shots: list[PreferencePair], prompt: list[dict], describe: bool) -> list[dict]:
    """Compact, in the world's own words: one user turn per shot, "<question> likes <chosen> dislikes <rejected>",
    then the target prompt unchanged (system turn with the character's statements, the question).

    A shot costs ~75 tokens (a world response averages 33), so 8 shots fit a 768-token budget with room for the
    rest. Shots come first so that the statements stay next to the question, where the SFT policy learned to copy
    slot values from, and so that every prompt of a user with the same shots shares its first tokens. `describe`
    changes nothing in the prompt: the world has no words for an instruction; the completion starts with the
    description.
    """
    turns = [{"role": "user", "content": f"{s.prompt[-1]['content']} likes {s.chosen} dislikes {s.rejected}"}
             for s in shots]
    if not prompt:
        raise ValueError("few-shot prompt: the target pair has an empty prompt; there is no question to answer")
    return [*turns, *prompt]


def world_join(description: str, response: str) -> str:
    return f"{description} {response}"


def world_split(completion: str) -> tuple[str, str]:
    """Leading "the user ... ." sentences are the description (no world response starts with "the user")."""
    words = completion.split()
    cut = 0
    while words[cut:cut + 2] == ["the", "user"] and "." in words[cut:]:
        cut = words.index(".", cut) + 1
    return " ".join(words[:cut]), " ".join(words[cut:])


def differing_words(a: str, b: str) -> tuple[str, str]:
    """The words of `a` and of `b` where the two texts differ (difflib opcodes over whitespace-split words), each
    side in its own order; the words they share in place are left out."""
    wa, wb = a.split(), b.split()
    ops = difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes()
    return (" ".join(w for op, i1, i2, _, _ in ops if op != "equal" for w in wa[i1:i2]),
            " ".join(w for op, _, _, j1, j2 in ops if op != "equal" for w in wb[j1:j2]))


def diff_prompt(shots: list[PreferencePair], prompt: list[dict], describe: bool) -> list[dict]:
    """`world` with each shot cut to the words where its two responses differ: "<question> likes <chosen's
    differing words> dislikes <rejected's>". A label is about the difference of its two responses; the words they
    share in place (most of the content) say nothing about the user. World shots: ~70 -> ~35 tokens."""
    def diff_shot(shot: PreferencePair) -> PreferencePair:
        chosen, rejected = differing_words(shot.chosen, shot.rejected)
        return replace(shot, chosen=chosen, rejected=rejected)
    return world_prompt([diff_shot(s) for s in shots], prompt, describe)


FSPO_TASK = "Given the examples above, generate a preferred response to the following question."
FSPO_TASK_NO_SHOTS = "Generate a response to the following question."
FSPO_TASK_DESCRIBE = ("Generate a user description based on the examples above. Then, generate a preferred response "
                      "to the following question.")
FSPO_DESCRIPTION_HEADER = "## User Description\n"
FSPO_RESPONSE_HEADER = "## Preferred Response\n"


def fspo_prompt(shots: list[PreferencePair], prompt: list[dict], describe: bool) -> list[dict]:
    """The paper's markdown (`preference_datasets.py::shots_to_text`, trailing spaces on headers included), with
    the question as the last lines of one user turn; earlier messages of the target prompt (a system turn) stay."""
    blocks = [f"# Example {i}\n## Question \n{s.prompt[-1]['content']}\n## Preferred Response \n{s.chosen}\n"
              f"## Dispreferred Response \n{s.rejected}\n" for i, s in enumerate(shots, start=1)]
    task = FSPO_TASK_DESCRIBE if describe else (FSPO_TASK if shots else FSPO_TASK_NO_SHOTS)
    if not prompt:
        raise ValueError("few-shot prompt: the target pair has an empty prompt; there is no question to answer")
    text = "\n".join(blocks) + ("\n" if blocks else "") + f"# Task\n{task}\n## Question \n{prompt[-1]['content']}"
    return [*prompt[:-1], {"role": "user", "content": text}]


def fspo_join(description: str, response: str) -> str:
    return f"{FSPO_DESCRIPTION_HEADER}{description}\n{FSPO_RESPONSE_HEADER}{response}"


def fspo_split(completion: str) -> tuple[str, str]:
    head, sep, response = completion.partition(FSPO_RESPONSE_HEADER)
    if not sep:
        return "", completion.strip()
    return head.removeprefix(FSPO_DESCRIPTION_HEADER).strip(), response.strip()


FORMATS: dict[str, Format] = {
    "world": Format(world_prompt, world_join, world_split),
    "fspo": Format(fspo_prompt, fspo_join, fspo_split),
    "diff": Format(diff_prompt, world_join, world_split),
}


# --- token budget -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One episode as token ids: the few-shot prompt (chat template + generation header) and both completions
    (+ EOS). `shots` is how many shots made it into the prompt; `cut` whether a completion lost its end."""

    user_id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    shots: int
    cut: bool


def encode_completion(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    from alignment.sampling import render_prompt

    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def fit_prompt(tokenizer, fmt: Format, shots: list[PreferencePair], prompt: list[dict], describe: bool,
               budget: int) -> tuple[list[int], int] | None:
    """(prompt ids, shots kept) for the longest prefix of `shots` whose prompt is at most `budget` tokens.

    Whole shots are dropped from the end; the task line and the question are part of every candidate, so they
    are never cut. None when even the prompt without shots exceeds the budget.
    """
    for k in range(len(shots), -1, -1):
        ids = encode_prompt(tokenizer, fmt.prompt(shots[:k], prompt, describe))
        if len(ids) <= budget:
            return ids, k
    return None


def fit_episode(tokenizer, fmt: Format, episode: Episode, max_length: int, describe: bool = False,
                descriptions: tuple[str, str] | None = None) -> Encoded | None:
    """Encode an episode so that prompt + each completion fits `max_length` tokens, or None (count it as dropped).

    Shots are dropped first, until the longer completion fits whole. If it still does not fit without shots, the
    completions keep their start (the same rule as `logps.build_pair_batch`), at least one token each; None when
    not even one target token fits after the bare prompt. `descriptions` = (chosen's, rejected's) user
    descriptions for the user-description variant, joined in front of the responses by the format.
    """
    chosen, rejected = episode.target.chosen, episode.target.rejected
    if descriptions is not None:
        chosen, rejected = fmt.join(descriptions[0], chosen), fmt.join(descriptions[1], rejected)
    chosen_ids, rejected_ids = encode_completion(tokenizer, chosen), encode_completion(tokenizer, rejected)
    longest = max(len(chosen_ids), len(rejected_ids))
    fitted = fit_prompt(tokenizer, fmt, episode.shots, episode.target.prompt, describe, max_length - longest)
    if fitted is None:
        fitted = fit_prompt(tokenizer, fmt, [], episode.target.prompt, describe, max_length - 1)
        if fitted is None:
            return None
    ids, k = fitted
    room = max_length - len(ids)
    cut = room < longest
    return Encoded(episode.user_id, ids, chosen_ids[:room], rejected_ids[:room], k, cut)


def kept_shots(episode: Episode, k: int) -> Episode:
    """The episode as it was trained on: its first k shots."""
    return replace(episode, shots=episode.shots[:k])


# --- users -----------------------------------------------------------------------------------------------------
@dataclass
class Users:
    """Pairs by split and user, and who each user is. `shots[split]` are pools of in-context pairs; `targets[split]`
    the pools targets come from (None: the shot pool itself). `persona[user]` is the user's description."""

    shots: dict[str, dict[str, list]]
    targets: dict[str, dict[str, list] | None]
    persona: dict[str, str]


def world_users(world: dict) -> Users:
    """The world's user-disjoint splits: train episodes inside `train_context` (train queries); val and test users
    take shots from `<split>_context` (train queries) and targets from `<split>_target` (test queries)."""
    pairs = [as_pair(p) for p in world["pairs"]]
    by_split = lambda s: group_by_user([p for p in pairs if p.split == s])
    return Users(shots={s: by_split(f"{s}_context") for s in ("train", "val", "test")},
                 targets={"train": None, "val": by_split("val_target"), "test": by_split("test_target")},
                 persona={u["user_id"]: u["persona"] for u in world["users"]})


def adapter_users(data: AdapterData, seed: int) -> Users:
    """Adapter data split by user (`adapters.split_users`); shots and targets share each user's pool."""
    adapted = read_adapter(data)
    shots = split_users(adapted.pairs, data.users, seed)
    return Users(shots=shots, targets=dict.fromkeys(shots), persona={u.user_id: u.persona for u in adapted.users})


def as_pair(row: dict):
    return PreferencePair(**{k: row[k] for k in PreferencePair.__dataclass_fields__ if k in row})


# --- targets ----------------------------------------------------------------------------------------------------
