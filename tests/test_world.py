"""The persona world: grammar round trip, parser rejects non-sentences, oracle labels, users, splits, determinism."""

import dataclasses
import filecmp

import numpy as np
import pytest

from alignment import language as lang
from alignment import people
from alignment.world import WorldSpec, build_world, load_world, rag_statements

SMALL = WorldSpec(seed=3, characters=24, users=[20, 5, 10], train_pairs=8, context_pairs=4, target_pairs=6,
                  dialogues=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    build_world(SMALL, path)
    return load_world(path)


def random_responses(n, seed=0):
    rng = np.random.default_rng(seed)
    facts = people.make_character(rng, 30)
    out = []
    for _ in range(n):
        fact, neutral = people.sample_content(rng, facts, facts[1][0], (0.4, 0.2, 0.2, 0.2))
        style = people.sample_style(rng, 0.5)
        out.append((fact, style, lang.render_response(fact, neutral, style)))
    return out


def test_parse_recovers_fact_and_style_of_every_rendered_response():
    for fact, style, text in random_responses(500):
        parse = lang.parse_response(text)
        assert parse is not None, text
        assert parse.fact == fact
        assert parse.style == style


def test_parser_rejects_shuffled_and_corrupted_text():
    rng = np.random.default_rng(1)
    shuffled = corrupted = 0
    for _, _, text in random_responses(300):
        words = text.split()
        perm = rng.permutation(len(words))
        if [words[i] for i in perm] != words:
            shuffled += 1
            assert lang.parse_response(" ".join(words[i] for i in perm)) is None
        j = int(rng.integers(len(words)))
        assert lang.parse_response(" ".join(words[:j] + ["banana"] + words[j + 1:])) is None  # unknown word
        dropped = " ".join(words[:j] + words[j + 1:])
        corrupted += lang.parse_response(dropped) is None
    assert shuffled > 250
    assert corrupted == 300  # every word is load-bearing: dropping any one breaks the sentence


def test_parser_rejects_grammar_violations():
    ok = "good day . i live in lyon . kind regards ."
    assert lang.parse_response(ok) is not None
    mixed = lang.parse_response("good day . i live in lyon . cheers .")  # registers may differ: formality 0
    assert lang.attribute_vector(mixed.style)[1] == 0
    assert lang.parse_response("i live in lyon . i live in rome .") is None  # two content clauses
    assert lang.parse_response("i live in lyon !  good day .") is None  # mixed terminators, greeting last
    assert lang.parse_response("first , i live in lyon . third , i think about it a lot .") is None  # ordinal gap
    assert lang.parse_response("i live in lyon") is None  # no terminator
    assert lang.parse_response("") is None


def test_oracle_labels_worked_examples():
    parse = lang.parse_response("hey ! i live in lyon ! cheers !")
    assert lang.nli_label(("home", "lyon"), parse.fact) == "entailed"
    assert lang.nli_label(("home", "rome"), parse.fact) == "contradicted"
    assert lang.nli_label(("job", "baker"), parse.fact) == "neutral"
    assert lang.nli_label(("opinion:rain", "like"), ("opinion:rain", "dislike")) == "contradicted"
    assert lang.parse_response("rain is something i dislike .").fact == ("opinion:rain", "dislike")
    assert lang.relevant("home", "home") and not lang.relevant("home", "job") and not lang.relevant("home", None)
    # attributes: formality (+1 greeting, +1 closing) / 2 = -1 informal, enthusiasm 1, no other style
    np.testing.assert_array_equal(lang.attribute_vector(parse.style), [0, -1, 1, 0, 0, 0, 0])


def test_statements_and_queries_parse_back_to_their_slot():
    for slot in lang.all_slots():
        for value in lang.slot_values(slot):
            assert lang.parse_statement(lang.statement_text(slot, value)) == (slot, value)
        assert {lang.query_slot(q) for q in lang.query_paraphrases(slot)} == {slot}
    assert {lang.query_slot(q) for q in lang.query_paraphrases(None)} == {None}
    with pytest.raises(ValueError, match="not a world persona statement"):
        lang.parse_statement("i live in atlantis .")
    with pytest.raises(ValueError, match="not a world query"):
        lang.query_slot("where do you live")


def test_oracle_scorer_is_the_oracle_apc_in_the_scorer_interface():
    from rewards.apc_eval import OracleAPCScorer, oracle_apc

    character = {"statements": [{"slot": "home", "value": "lyon"}, {"slot": "opinion:rain", "value": "like"},
                                {"slot": "job", "value": "baker"}]}
    statements = [lang.statement_text(s["slot"], s["value"]) for s in character["statements"]]
    query = lang.query_paraphrases("home")[0]
    responses = ["hey ! i live in lyon ! cheers !", "i live in rome .", "rain is something i dislike .",
                 "that is a good question .", "lyon in live i ."]
    s = OracleAPCScorer().score(statements, query, responses)
    # answered (+1), contradicts the relevant statement (0: no active reward, no passive penalty on a relevant one),
    # contradicts an irrelevant one (-1), neutral (0), not a sentence (0)
    assert s.delta.tolist() == [1.0, 0.0, -1.0, 0.0, 0.0]
    assert s.v_apc.tolist() == [3.0, 2.0, 1.0, 2.0, 2.0]  # + the two irrelevant statements not contradicted
    assert s.p_rel.tolist() == [1.0, 0.0, 0.0]
    for r, text in enumerate(responses):
        v, delta = oracle_apc(character, "home", text)
        assert (s.v_apc[r].item(), s.delta[r].item()) == (v, delta)


def test_true_reward_worked_number_and_invalid_text():
    facts = [("name", "anna"), ("home", "lyon")]
    w = np.array([1.0, 0.0, 0.0, -2.0, 0.5, 0.0, 0.0])
    text = "i understand how you feel . i live in lyon . it is not . "
    assert people.true_reward(w, 1.0, facts, "home", text) == people.INVALID_REWARD
    text = "i understand how you feel . i live in lyon . i think about it a lot . ha that reminds me of a funny joke ."
    # length 1/3 * 1 + humour 1 * -2 + empathy 1 * 0.5 + quality (true answer) 1 * 1.0
    assert people.true_reward(w, 1.0, facts, "home", text) == pytest.approx(1 / 3 - 2 + 0.5 + 1)
    contradicting = "i live in rome ."
    assert people.true_reward(w, 1.0, facts, "home", contradicting) == pytest.approx(-1.0)


def test_persona_text_states_salient_preferences_and_fidelity_drops_them():
    rng = np.random.default_rng(0)
    w = np.array([2.0, -1.5, 0.1, 0.0, 0.8, -0.2, 0.0])
    full = people.persona_text(rng, w, people.PopulationConfig(fidelity=1.0, salient=0.5))
    np.testing.assert_array_equal(people.stated_preferences(full), [1, -1, 0, 0, 1, 0, 0])
    assert full.startswith("the user likes long answers .")  # strongest first
    none = people.persona_text(rng, w, people.PopulationConfig(fidelity=0.0))
    assert none == "the user has no stated preferences ."


def test_world_meets_its_spec(world):
    chars = world["characters"]
    assert len(chars) >= 24
    assert all(8 <= len(c["statements"]) <= 60 for c in chars)
    assert len({s["slot"].split(":")[0] for c in chars for s in c["statements"]}) >= 10
    by_slot = {}
    for q in world["queries"]:
        by_slot.setdefault((q["character_id"], q["slot"]), set()).add(q["text"])
    assert min(len(v) for v in by_slot.values()) >= 3
    assert any(q["slot"] is None for q in world["queries"])
    assert lang.K >= 6


def test_splits_are_user_and_prompt_disjoint(world):
    split_of_user = {u["user_id"]: u["split"] for u in world["users"]}
    split_of_query = {q["query_id"]: q["split"] for q in world["queries"]}
    for p in world["pairs"]:
        user_split, part = p["split"].rsplit("_", 1)
        assert split_of_user[p["user_id"]] == user_split
        assert split_of_query[p["prompt_id"]] == ("train" if part == "context" else "test")
    train_q = {q["text"] + q["character_id"] for q in world["queries"] if q["split"] == "train"}
    test_q = {q["text"] + q["character_id"] for q in world["queries"] if q["split"] == "test"}
    assert not train_q & test_q
    dialogue_queries = {d["query_id"] for d in world["dialogues"]}
    assert all(split_of_query[q] == "train" for q in dialogue_queries)


def test_pairs_labels_follow_bradley_terry_of_the_true_reward(world):
    users = {u["user_id"]: u for u in world["users"]}
    facts = {c["character_id"]: [(s["slot"], s["value"]) for s in c["statements"]] for c in world["characters"]}
    queries = {q["query_id"]: q for q in world["queries"]}
    for p in world["pairs"][:50]:
        u, q = users[p["user_id"]], queries[p["prompt_id"]]
        r = people.true_reward(np.array(u["weights"]), SMALL.population.quality, facts[q["character_id"]], q["slot"],
                               p["chosen"])
        assert r == pytest.approx(p["chosen_reward"])
    # with beta ~ 4 most labels agree with the true reward ordering, not all (labels are noisy by design)
    agree = np.mean([p["chosen_reward"] >= p["rejected_reward"] for p in world["pairs"]])
    assert 0.7 < agree < 1.0


def test_dialogue_responses_are_valid_and_spread_across_profiles(world):
    profiles = [lang.profile(lang.parse_response(d["response"]).style) for d in world["dialogues"]]
    _, counts = np.unique(profiles, return_counts=True)
    assert counts.max() / counts.sum() < 0.5


def test_dialogues_hold_the_three_prompt_shapes_of_the_apc_table(world):
    """RAG top-k, an empty system turn (Vanilla) and every statement in persona order (LCM), at about
    `prompt_mix` (0.8, 0.1, 0.1 of 300 dialogues; a user's stated preferences may follow any of them)."""
    characters = {c["character_id"]: c for c in world["characters"]}
    shapes = []
    for d in world["dialogues"]:
        system = d["prompt"][0]["content"]
        statements = " ".join(s["text"] for s in characters[d["character_id"]]["statements"])
        without_persona = system[:len(system) - len(d["persona"])].strip() if d["persona"] else system
        shapes.append("lcm" if without_persona == statements else "vanilla" if not without_persona else "rag")
    counts = {shape: shapes.count(shape) / len(shapes) for shape in ("rag", "vanilla", "lcm")}
    assert 0.72 < counts["rag"] < 0.88 and 0.05 < counts["vanilla"] < 0.15 and 0.05 < counts["lcm"] < 0.15


def test_a_bad_prompt_mix_fails_in_one_line(tmp_path):
    from alignment.config import ConfigError

    with pytest.raises(ConfigError, match=r"world.prompt_mix: need three shares >= 0"):
        build_world(dataclasses.replace(SMALL, prompt_mix=[1.0, 0.0]), tmp_path)


def test_rag_statements_contain_the_relevant_one():
    rng = np.random.default_rng(0)
    statements = [{"slot": s, "value": v, "text": lang.statement_text(s, v)}
                  for s, v in people.make_character(rng, 20)]
    text = rag_statements(rng, statements, statements[3]["slot"], 4)
    assert text.startswith(statements[3]["text"]) and text.count(" .") == 4


def test_same_seed_gives_byte_identical_world_and_other_seed_differs(tmp_path):
    spec = dataclasses.replace(SMALL, characters=24, dialogues=50, users=[6, 2, 2])
    build_world(spec, tmp_path / "a")
    build_world(spec, tmp_path / "b")
    build_world(dataclasses.replace(spec, seed=4), tmp_path / "c")

    def same(x, y):
        cmp = filecmp.dircmp(x, y)
        return not (cmp.diff_files or cmp.left_only or cmp.right_only or cmp.funny_files) and all(
            same(x / d, y / d) for d in cmp.common_dirs)
    assert same(tmp_path / "a", tmp_path / "b")
    assert not same(tmp_path / "a", tmp_path / "c")


def test_tokenizer_covers_the_grammar_and_renders_the_chat_template(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world["path"] / "tokenizer"))
    unk = tok.unk_token_id
    ids = tok(" ".join(lang.vocabulary()), add_special_tokens=False)["input_ids"]
    assert unk not in ids
    messages = [{"role": "system", "content": "i live in lyon ."}, {"role": "user", "content": "where do you live ?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|> i live in lyon . <|end|> <|user|> where do you live ? <|end|> <|assistant|> "
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text.strip()
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


def test_world_tables_validate_as_records(world):
    from datasets import Dataset

    from alignment.records import Character, PreferencePair, Query, User, from_dataset

    for name, record in (("characters", Character), ("queries", Query), ("users", User), ("pairs", PreferencePair)):
        assert len(from_dataset(Dataset.from_list(world[name]), record, name)) == len(world[name])
    assert all(p["chosen"] != p["rejected"] for p in world["pairs"])
