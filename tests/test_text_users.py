"""alignment.text_users: features on real-looking replies, the population prior in both regimes, persona text,
Bradley-Terry labels, splits, records and the cached builder (sampling itself: one slow test on SmolLM2)."""

import numpy as np
import pytest

from alignment import text_users as tu
from alignment.records import PreferencePair, Query, User, read_jsonl, write_jsonl
from alignment.text_attributes import words

# Replies in the shapes SmolLM2-135M-Instruct writes (docs/experiments/text_users.md).
LIST_REPLY = """Here are some tips for brewing coffee:

1. **Use fresh beans**: grind them just before brewing.
2. **Mind the water**: about 93 degrees is ideal.
3. Don't rush the bloom.

Hope this helps!"""
PLAIN_REPLY = ("Brewing coffee is a simple process that involves extracting flavor from ground coffee beans with "
               "hot water. The quality of the beans, the grind size and the water temperature all matter.")
CHATTY_REPLY = "Hi! You'll love this! For example, try a French press. It's easy. Want to know more?"
OFF_TOPIC = "!!!!!!!!"
TEXTS = [LIST_REPLY, PLAIN_REPLY, CHATTY_REPLY, OFF_TOPIC, "Sure. Use good beans.", "Coffee: grind, brew, enjoy."]
PROMPT = "Give me tips for brewing coffee."


def test_features_of_a_markdown_list_reply():
    f = dict(zip(tu.FEATURE_NAMES, tu.features(LIST_REPLY), strict=True))
    assert f["length"] == pytest.approx(30 / 80)  # 7 + 8 + 8 + 4 + 3 words ("93" is one)
    assert f["list"] == 1.0 and f["formatting"] == 1.0  # 3 items of a cap of 3; two bold spans of 2
    assert f["exclamations"] == 0.5 and f["contractions"] == pytest.approx(1 / 3)  # one "!" of 2; "Don't" of 3
    assert f["summary_first"] == 1.0  # a short first line, then the list
    assert f["question_back"] == 0.0 and f["example"] == 0.0 and f["second_person"] == 0.0


def test_features_of_a_chatty_reply_and_the_caps():
    f = dict(zip(tu.FEATURE_NAMES, tu.features(CHATTY_REPLY), strict=True))
    assert f["question_back"] == 1.0 and f["example"] == 1.0 and f["exclamations"] == 1.0  # 2 "!" reach the cap
    assert f["second_person"] == pytest.approx(0.625)  # "You'll" is 1 word in 16, of a cap of 0.1
    assert f["contractions"] == pytest.approx(2 / 3)  # You'll, It's
    assert f["list"] == 0.0 and f["sentence_length"] == pytest.approx(16 / 5 / 30)  # 1 + 3 + 6 + 2 + 4 words
    assert tu.features("!" * 50)[tu.FEATURE_NAMES.index("exclamations")] == 1.0
    assert tu.features("").tolist() == [0.0] * tu.K
    for text in TEXTS:
        assert ((tu.features(text) >= 0) & (tu.features(text) <= 1)).all()


def test_on_topic_reads_the_prompts_content_words():
    assert tu.content_words(PROMPT) == {"brew", "coff"}  # "Give me tips for" is template
    assert tu.on_topic(PROMPT, PLAIN_REPLY) == 1.0
    assert tu.on_topic(PROMPT, "Coffee is nice.") == 0.5
    assert tu.on_topic(PROMPT, OFF_TOPIC) == 0.0
    assert tu.on_topic("Why?", OFF_TOPIC) == 1.0  # nothing asked, nothing to miss


def test_prompts_are_topics_times_tasks_split_prompt_disjoint_and_seeded():
    prompts = tu.make_prompts(0, [0.6, 0.2, 0.2])
    assert len(prompts) == len({q.text for q in prompts}) == 360
    counts = {s: sum(q.split == s for q in prompts) for s in tu.SPLITS}
    assert counts == {"train": 216, "val": 72, "test": 72}
    assert prompts == tu.make_prompts(0, [0.6, 0.2, 0.2])
    assert [q.split for q in prompts] != [q.split for q in tu.make_prompts(1, [0.6, 0.2, 0.2])]


def draw(shared, personal, n=60, seed=0, **kw):
    cfg = tu.TextPopulationConfig(shared=shared, personal=personal, **kw)
    return tu.make_users(np.random.default_rng(seed), cfg, [n, 0, 0])


def agreement(users) -> float:
    """Share of (user pair, text pair) where two users order two of TEXTS alike."""
    r = np.array([tu.rewards(u, [PROMPT] * len(TEXTS), TEXTS) for u in users])  # (U, T)
    d = np.sign(r[:, :, None] - r[:, None, :])[:, np.triu_indices(len(TEXTS), 1)[0], np.triu_indices(len(TEXTS), 1)[1]]
    same = (d[:, None, :] == d[None, :, :]).mean(-1)
    return float(same[np.triu_indices(len(users), 1)].mean())


def test_users_are_reproducible_and_the_knob_moves_agreement():
    assert draw(0.0, 1.0, seed=3) == draw(0.0, 1.0, seed=3)
    assert draw(0.0, 1.0, seed=3) != draw(0.0, 1.0, seed=4)
    consensus, controversial = agreement(draw(3.0, 0.3)), agreement(draw(0.0, 1.0))
    assert consensus > 0.9 and controversial < 0.75, (consensus, controversial)  # measured 0.94 and 0.65
    w = np.array([u.weights for u in draw(0.0, 1.0)])[:, :tu.K]
    assert ((w > 0).mean(0) > 0.1).all() and ((w < 0).mean(0) > 0.1).all()  # every sign occurs on every feature


def test_consensus_users_share_the_signs_of_the_consensus_direction():
    w = np.array([u.weights for u in draw(3.0, 0.3)])[:, :tu.K]
    m = tu.consensus_direction()
    assert (np.sign(w[:, m != 0]) == np.sign(m[m != 0])).all()


def test_persona_states_exactly_the_features_past_the_threshold():
    for threshold in (0.3, 0.8, 1.5):
        for u in draw(0.0, 1.0, n=30, persona_threshold=threshold):
            w = np.asarray(u.weights[:tu.K])
            assert tu.stated_preferences(u.persona).tolist() == (np.sign(w) * (np.abs(w) > threshold)).tolist()
    assert tu.persona_text(np.full(tu.K, 0.1), 0.5) == tu.NO_PREFERENCES
    texts = [t for pair in tu.PREFERENCE_TEXT.values() for t in pair]
    assert not any(a != b and a in b for a in texts for b in texts)  # no statement reads as another


def test_persona_lists_the_strongest_preference_first():
    w = np.zeros(tu.K)
    w[tu.FEATURE_NAMES.index("list")], w[tu.FEATURE_NAMES.index("exclamations")] = 0.9, -2.0
    assert tu.persona_text(w, 0.5) == "No exclamation marks, please. I like answers in bullet points."


def test_reward_worked_example_and_batched_version():
    w = [0.0] * tu.K + [2.0]
    w[tu.FEATURE_NAMES.index("list")], w[tu.FEATURE_NAMES.index("exclamations")] = 1.5, -1.0
    user = User(user_id="t0", persona="", weights=w, temperature=1.0)
    assert tu.reward(user, PROMPT, LIST_REPLY) == pytest.approx(1.5 * 1.0 - 1.0 * 0.5 + 2.0 * 1.0)
    assert tu.reward(user, [{"role": "user", "content": PROMPT}], OFF_TOPIC) == pytest.approx(-1.0)
    batch = tu.rewards([user, user], [PROMPT, PROMPT], [LIST_REPLY, OFF_TOPIC])
    assert batch.tolist() == pytest.approx([3.0, -1.0])
    with pytest.raises(ValueError, match="2 users, 1 prompts"):
        tu.rewards([user, user], [PROMPT], [LIST_REPLY])


def tiny_spec(temperature=4.0, **population):
    return tu.TextUsersSpec(users=[6, 3, 3], train_pairs=8, context_pairs=4, target_pairs=5,
                            population=tu.TextPopulationConfig(temperature=temperature, **population))


def stub_responses(prompts):
    """Four replies per prompt drawn from TEXTS; every tenth prompt has one text four times (no preference)."""
    rng = np.random.default_rng(0)
    return {q.query_id: [TEXTS[0]] * 4 if i % 10 == 0 else [TEXTS[j] for j in rng.choice(len(TEXTS), 4)]
            for i, q in enumerate(prompts)}


def tiny_build(spec):
    prompts = tu.make_prompts(0, [0.6, 0.2, 0.2])
    responses = stub_responses(prompts)
    users = tu.make_users(np.random.default_rng(spec.seed), spec.population, spec.users)
    return prompts, users, tu.make_pairs(np.random.default_rng(1), spec, users, prompts, responses)


def test_bt_labels_follow_the_true_reward_at_high_rationality():
    _, _, sharp = tiny_build(tiny_spec(temperature=1e4, temperature_spread=0.0))
    assert all(p.chosen_reward >= p.rejected_reward for p in sharp)
    assert all(p.chosen != p.rejected for p in sharp)
    _, _, noisy = tiny_build(tiny_spec(temperature=0.1, temperature_spread=0.0))
    assert 0.2 < np.mean([p.chosen_reward < p.rejected_reward for p in noisy]) < 0.8


def test_pairs_use_user_disjoint_users_and_prompt_disjoint_prompts():
    prompts, users, pairs = tiny_build(tiny_spec())
    split_of = {q.query_id: q.split for q in prompts}
    user_split = {u.user_id: u.split for u in users}
    assert [sum(u.split == s for u in users) for s in tu.SPLITS] == [6, 3, 3]
    for p in pairs:
        part = p.split.split("_")[1]
        assert p.split.startswith(user_split[p.user_id])
        expected = "train" if part == "context" else ("val" if user_split[p.user_id] == "val" else "test")
        assert split_of[p.prompt_id] == expected
        assert p.prompt_id != "p000"  # its four replies are one text
    counts = {s: sum(p.split == s for p in pairs) for s in {p.split for p in pairs}}
    assert counts == {"train_context": 48, "train_target": 30, "val_context": 12, "val_target": 15,
                      "test_context": 12, "test_target": 15}


def test_records_round_trip_through_jsonl(tmp_path):
    prompts, users, pairs = tiny_build(tiny_spec())
    for name, records, kind in (("p", prompts, Query), ("u", users, User), ("x", pairs, PreferencePair)):
        assert read_jsonl(write_jsonl(tmp_path / f"{name}.jsonl", records), kind) == records


def test_cached_builder_samples_once_and_writes_every_file(tmp_path):
    calls = []

    def sample(spec, prompts):
        calls.append(len(prompts))
        return stub_responses(prompts)

    spec = tiny_spec()
    path = tu.text_users_artifact(spec, str(tmp_path), sample=sample)
    assert path.name.startswith("text-users-") and calls == [360]
    world = tu.load_text_users(path)
    assert len(world["users"]) == 12 and len(world["pairs"]) == 132 and len(world["prompts"]) == 360
    assert world["stats"]["test_target"]["bayes_ceiling"] > 0.5
    other = tu.text_users_artifact(tiny_spec(shared=2.0), str(tmp_path), sample=sample)
    assert other != path and calls == [360]  # a new population, the same cached samples
    assert tu.text_users_artifact(spec, str(tmp_path), sample=sample) == path


def test_sampling_chats_style_a_seeded_share_and_keep_the_prompt():
    prompts = tu.make_prompts(0, [0.6, 0.2, 0.2])[:50]
    rows = tu.sampling_chats(tu.SampleSpec(samples=4, styled=0.5), prompts)
    assert [pid for pid, _, _ in rows] == [q.query_id for q in prompts for _ in range(4)]
    styled = [instruction for _, _, instruction in rows if instruction]
    assert 0.4 < len(styled) / len(rows) < 0.6 and set(styled) <= set(tu.STYLE_INSTRUCTIONS)
    for (_, chat, instruction), q in zip(rows, [q for q in prompts for _ in range(4)], strict=True):
        assert chat == [{"role": "user", "content": f"{q.text} {instruction}".strip()}]
    assert rows == tu.sampling_chats(tu.SampleSpec(samples=4, styled=0.5), prompts)
    assert all(not i for _, _, i in tu.sampling_chats(tu.SampleSpec(samples=4, styled=0.0), prompts))


@pytest.mark.slow
def test_sample_replies_of_the_real_model(real_lm):
    model, tokenizer = real_lm
    spec = tu.SampleSpec(samples=2, max_new_tokens=8, temperature=0.8)
    prompts = tu.make_prompts(0, [0.6, 0.2, 0.2])[:2]
    out = tu.sample_replies(model, tokenizer, spec, prompts)
    assert list(out) == ["p000", "p001"] and all(len(t) == 2 for t in out.values())
    assert all(isinstance(t, str) and 0 < len(words(t)) <= 8 for texts in out.values() for t in texts)
    assert out == tu.sample_replies(model, tokenizer, spec, prompts)  # seeded
