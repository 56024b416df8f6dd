"""Few-shot episodes and prompts (alignment/shots.py): golden prompts of both formats, episodes per user with
variable k, the token budget (whole shots dropped, never the question; never zero target tokens), no <unk>."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.records import PreferencePair
from alignment.sampling import render_prompt
from alignment.shots import (
    FORMATS,
    differing_words,
    encode_prompt,
    fit_episode,
    fit_prompt,
    group_by_user,
    sample_episodes,
    world_split,
)

GOLDEN = Path(__file__).parent / "golden"


def pair(user="u1", q="where do you live ?", chosen="i live in lyon .", rejected="hey . i live in paris .",
         system="i live in lyon . i work as a baker .", **kw) -> PreferencePair:
    prompt = [{"role": "system", "content": system}, {"role": "user", "content": q}]
    return PreferencePair(user_id=user, prompt=prompt, chosen=chosen, rejected=rejected, **kw)


def golden_episode():
    """Two shots and a target prompt in world language (the golden files render exactly these)."""
    shots = [pair(q="what is your job ?", chosen="good day . i work as a baker .", rejected="i work as a nurse !"),
             pair(q="do you like rain ?", chosen="i like rain . ha that reminds me of a funny joke .",
                  rejected="i understand how you feel . i dislike rain .")]
    return shots, pair(q="where do you live ?").prompt


# --- golden files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "fmt", "k", "describe"), [
    ("world_k2.txt", "world", 2, False),
    ("diff_k2.txt", "diff", 2, False),
    ("fspo_k2.txt", "fspo", 2, False),
    ("fspo_k0.txt", "fspo", 0, False),
    ("fspo_k2_describe.txt", "fspo", 2, True),
])
def test_rendered_prompt_matches_golden_file(tiny_tokenizer, name, fmt, k, describe):
    shots, prompt = golden_episode()
    text = render_prompt(tiny_tokenizer, FORMATS[fmt].prompt(shots[:k], prompt, describe))
    assert text == (GOLDEN / name).read_text()


def test_golden_world_prompt_puts_shots_first_and_statements_next_to_the_question():
    text = (GOLDEN / "world_k2.txt").read_text()
    assert text.startswith("<|user|> what is your job ? likes good day . i work as a baker . dislikes")
    assert text.endswith("<|system|> i live in lyon . i work as a baker . <|end|> <|user|> where do you live ? "
                         "<|end|> <|assistant|> ")
    assert text.index("what is your job ? likes") < text.index("do you like rain ? likes")


def test_paper_format_has_the_reference_headers_and_task_lines():
    text = (GOLDEN / "fspo_k2.txt").read_text()
    # the reference's headers carry a trailing space (preference_datasets.py::shots_to_text)
    assert "# Example 2\n## Question \ndo you like rain ?\n## Preferred Response \n" in text
    assert "# Task\nGiven the examples above, generate a preferred response to the following question.\n" \
           "## Question \nwhere do you live ? <|end|>" in text
    assert "Generate a response to the following question." in (GOLDEN / "fspo_k0.txt").read_text()
    assert "Generate a user description based on" in (GOLDEN / "fspo_k2_describe.txt").read_text()


def test_diff_format_keeps_only_the_words_where_the_two_responses_differ():
    chosen, rejected = "good day . i work as a baker .", "i work as a nurse !"
    assert differing_words(chosen, rejected) == ("good day . baker .", "nurse !")
    assert differing_words("i live in lyon .", "i live in lyon .") == ("", "")
    text = (GOLDEN / "diff_k2.txt").read_text()
    assert text.startswith("<|user|> what is your job ? likes good day . baker . dislikes nurse ! <|end|>")
    # the target prompt is the world format's, unchanged
    world = (GOLDEN / "world_k2.txt").read_text()
    assert text.endswith(world[world.index("<|system|>"):])


@pytest.mark.parametrize("fmt", ["world", "fspo", "diff"])
def test_description_join_and_split_round_trip(fmt):
    f = FORMATS[fmt]
    description = "the user likes jokes . the user dislikes kind words ."
    response = "hey . i live in lyon . ha that reminds me of a funny joke ."
    assert f.split(f.join(description, response)) == (description, response)


def test_world_split_without_description_returns_the_whole_response():
    assert world_split("hey . i live in lyon .") == ("", "hey . i live in lyon .")
    assert world_split("the user likes jokes") == ("", "the user likes jokes")  # no full stop: not a sentence


# --- episodes ---------------------------------------------------------------------------------------------------
def pools(users=3, per_user=10):
    return group_by_user([pair(user=f"u{u}", chosen="i live in lyon .", rejected=f"r{u}-{i}",
                               prompt_id=f"q{i}") for u in range(users) for i in range(per_user)])


def test_episodes_are_per_user_with_k_in_range_and_target_never_a_shot():
    episodes = sample_episodes(pools(), per_user=20, k_min=1, k_max=4, rng=np.random.default_rng(0))
    assert len(episodes) == 60
    assert [e.user_id for e in episodes] == sorted(e.user_id for e in episodes)  # users in sorted order
    ks = [len(e.shots) for e in episodes]
    assert min(ks) == 1 and max(ks) == 4
    for e in episodes:
        assert {s.user_id for s in e.shots} == {e.user_id} and e.target not in e.shots


def test_targets_cycle_through_the_users_pool_evenly():
    episodes = sample_episodes(pools(users=1, per_user=5), per_user=10, k_min=0, k_max=2,
                               rng=np.random.default_rng(1))
    targets = [e.target.prompt_id for e in episodes]
    assert sorted(targets) == sorted([f"q{i}" for i in range(5)] * 2)


def test_targets_from_a_separate_pool_and_k_capped_by_the_shots_available():
    shots = pools(users=2, per_user=3)
    targets = {u: [pair(user=u, prompt_id="held-out", rejected="x")] for u in shots}
    episodes = sample_episodes(shots, per_user=4, k_min=8, k_max=8, rng=np.random.default_rng(0),
                               target_pools=targets)
    assert all(e.target.prompt_id == "held-out" and len(e.shots) == 3 for e in episodes)


def test_episodes_depend_on_the_seed_only():
    a = sample_episodes(pools(), 5, 0, 4, np.random.default_rng(7))
    b = sample_episodes(dict(reversed(list(pools().items()))), 5, 0, 4, np.random.default_rng(7))
    c = sample_episodes(pools(), 5, 0, 4, np.random.default_rng(8))
    assert a == b and a != c


def test_bad_k_range_is_refused():
    with pytest.raises(ValueError, match="k_min <= k_max"):
        sample_episodes(pools(), 1, 3, 2, np.random.default_rng(0))


# --- token budget -----------------------------------------------------------------------------------------------
def test_budget_drops_whole_shots_from_the_end_and_keeps_the_question(tiny_tokenizer):
    shots, prompt = golden_episode()
    fmt = FORMATS["world"]
    full = len(encode_prompt(tiny_tokenizer, fmt.prompt(shots, prompt, False)))
    one = len(encode_prompt(tiny_tokenizer, fmt.prompt(shots[:1], prompt, False)))
    assert fit_prompt(tiny_tokenizer, fmt, shots, prompt, False, full)[1] == 2
    ids, k = fit_prompt(tiny_tokenizer, fmt, shots, prompt, False, full - 1)
    assert k == 1 and len(ids) == one
    ids, k = fit_prompt(tiny_tokenizer, fmt, shots, prompt, False, one - 1)
    text = tiny_tokenizer.decode(ids)
    assert k == 0 and text.endswith("where do you live ? <|end|> <|assistant|>")  # the question survives
    assert "i work as a baker" in text  # and the system turn


def test_fit_episode_counts_shots_and_cuts_completions_only_without_shots(tiny_tokenizer):
    shots, prompt = golden_episode()
    from alignment.records import Episode

    episode = Episode(user_id="u1", shots=shots, target=pair())
    fmt = FORMATS["world"]
    bare = len(encode_prompt(tiny_tokenizer, fmt.prompt([], prompt, False)))
    roomy = fit_episode(tiny_tokenizer, fmt, episode, 1000)
    assert roomy.shots == 2 and not roomy.cut
    assert roomy.chosen[-1] == tiny_tokenizer.eos_token_id
    tight = fit_episode(tiny_tokenizer, fmt, episode, bare + 2)  # room for 2 completion tokens only
    assert tight.shots == 0 and tight.cut and len(tight.chosen) == len(tight.rejected) == 2
    assert fit_episode(tiny_tokenizer, fmt, episode, bare) is None  # not even one target token: dropped


@settings(max_examples=60, deadline=None)
@given(max_length=st.integers(min_value=1, max_value=200), k=st.integers(min_value=0, max_value=2),
       fmt=st.sampled_from(["world", "fspo"]), describe=st.booleans())
def test_no_example_ever_has_zero_target_tokens_or_exceeds_the_budget(tiny_tokenizer, max_length, k, fmt, describe):
    from alignment.records import Episode

    shots, _ = golden_episode()
    episode = Episode(user_id="u1", shots=shots[:k], target=pair())
    descriptions = ("the user likes jokes .", "the user dislikes jokes .") if describe else None
    enc = fit_episode(tiny_tokenizer, FORMATS[fmt], episode, max_length, describe, descriptions)
    if enc is None:  # dropped only when the prompt without shots leaves no room for a target token
        bare = encode_prompt(tiny_tokenizer, FORMATS[fmt].prompt([], episode.target.prompt, describe))
        assert len(bare) >= max_length
        return
    assert len(enc.chosen) >= 1 and len(enc.rejected) >= 1
    assert len(enc.prompt) + max(len(enc.chosen), len(enc.rejected)) <= max_length
    assert 0 <= enc.shots <= k


# --- the world's tokenizer covers every rendered episode --------------------------------------------------------
@pytest.fixture(scope="module")
def small_world():
    """World tables generated in memory (no disk, no SFT) and the world tokenizer built from them."""
    from alignment import world as W

    spec = W.WorldSpec(seed=5, characters=6, users=[6, 2, 3], train_pairs=6, context_pairs=5, target_pairs=3,
                       dialogues=0)
    rng = np.random.default_rng(spec.seed)
    characters = W.make_characters(rng, spec)
    queries = W.make_queries(rng, characters, spec.test_fraction)
    users = W.make_users(rng, spec)
    pairs = W.make_pairs(rng, spec, users, queries, characters)
    return users, [PreferencePair(**p) for p in pairs], W.build_tokenizer(W.corpus(characters, queries, users, []))


@pytest.mark.parametrize("describe", [False, True])
def test_world_format_never_produces_unk(small_world, describe):
    users, pairs, tokenizer = small_world
    persona = {u["user_id"]: u["persona"] for u in users}
    episodes = sample_episodes(group_by_user(pairs), 3, 0, 6, np.random.default_rng(0))
    fmt = FORMATS["world"]
    for e in episodes:
        descriptions = (persona[e.user_id], persona[e.user_id]) if describe else None
        enc = fit_episode(tokenizer, fmt, e, 4096, describe, descriptions)
        assert enc.shots == len(e.shots)
        for ids in (enc.prompt, enc.chosen, enc.rejected):
            assert tokenizer.unk_token_id not in ids, tokenizer.decode(ids)
