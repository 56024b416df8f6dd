"""Dataset adapters on hand-written fixtures in each dataset's published schema (tests/fixtures/<dataset>/).

Expected numbers are counted by hand from the fixture files; the comments say how.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from alignment.adapters import (
    ADAPTERS,
    PERSONAL_LLM_RMS,
    apc_characters,
    fspo_elix,
    fspo_review,
    fspo_roleplay,
    make_episodes,
    personal_llm,
    prism,
)
from alignment.records import PreferencePair, RecordError

FIXTURES = Path(__file__).parent / "fixtures"


def test_adapters_table_names_every_dataset():
    assert sorted(ADAPTERS) == ["apc_characters", "fspo_elix", "fspo_review", "fspo_roleplay", "personal_llm", "prism"]


def test_prism_worked_numbers():
    data = prism(str(FIXTURES / "prism"))
    # c0 turn 0: chosen 80 vs 80 (tie), 40, 10 -> 2 pairs; turn 1: 90 vs 60 -> 1.
    # c1 turn 0: 70 vs 50, 20 -> 2; turn 1: 55 vs 55 (tie). c2 (user2, no survey row): 90 vs 30 -> 1.
    assert data.counts["rows"] == 3
    assert data.counts["pairs"] == 6
    assert data.counts["ties_dropped"] == 2
    assert data.counts["users"] == 3
    assert data.counts["users_without_survey"] == 1  # user2; user3 answered the survey but never chatted
    assert [u.user_id for u in data.users] == ["user0", "user1", "user2"]
    assert data.users[0].persona == ("I value kindness and honesty, and I cook for my family every day.\n\n"
                                     "Keep answers short and practical; I am vegetarian.")
    assert data.users[2].persona == ""
    # The second turn's prompt carries the first turn along the chosen branch.
    assert data.pairs[2] == PreferencePair(
        user_id="user0",
        prompt=[{"role": "user", "content": "What should I cook tonight?"},
                {"role": "assistant", "content": "Try a mushroom risotto."},
                {"role": "user", "content": "Something vegetarian, please."}],
        chosen="A lentil curry works well.", rejected="Maybe a green salad.", prompt_id="c0:1",
        chosen_reward=90.0, rejected_reward=60.0)
    # PRISM writes an empty reply as the literal "EMPTY STRING".
    assert (data.pairs[1].rejected, data.pairs[1].rejected_reward) == ("", 10.0)


def test_personal_llm_worked_numbers():
    data = personal_llm(str(FIXTURES / "personal_llm"), n_users=3, pairs_per_user=5, seed=0)
    # train: prompt 101 (usable; reply 8 lacks one score), 102 (all replies tie), 103 (null prompt);
    # test: 201 (usable), 202 (all tie). Each user gets every usable prompt once per split (5 > 2).
    assert data.counts["rows"] == 5
    assert data.counts["rows_dropped"] == 1
    assert data.counts["responses_missing"] == 1
    assert data.counts["ties_dropped"] == 3 * 2
    assert data.counts["pairs"] == 3 * 2
    assert sorted(p.prompt_id for p in data.pairs) == ["101"] * 3 + ["201"] * 3
    for pair in data.pairs:
        # On prompts 101/201 every reward model scores reply k at k sd above its mean, and weights sum
        # to 1, so r_u(reply k) = k for any user: the chosen reply is the one with the larger k.
        k_chosen, k_rejected = (int(re.match(r"Reply (\d):", t).group(1)) for t in (pair.chosen, pair.rejected))
        assert pair.chosen_reward == pytest.approx(k_chosen) and pair.rejected_reward == pytest.approx(k_rejected)
        assert k_chosen > k_rejected
        assert pair.split == ("train" if pair.prompt_id == "101" else "test")
        assert "Reply 8" not in pair.chosen + pair.rejected or pair.split == "test"
    for user in data.users:
        assert len(user.weights) == 10 and sum(user.weights) == pytest.approx(1.0) and min(user.weights) >= 0
    assert personal_llm(str(FIXTURES / "personal_llm"), n_users=3, pairs_per_user=5, seed=0) == data
    assert personal_llm(str(FIXTURES / "personal_llm"), n_users=3, seed=1).users != data.users


def test_personal_llm_reward_is_the_weighted_standardized_score(tmp_path):
    """r_u = sum_k w_uk (R_k - mean_k) / sd_k (arXiv:2409.20296), recomputed from the raw file."""
    import datasets

    rng = np.random.default_rng(3)
    row = {"prompt": "Tell me a joke.", "prompt_id": 7}
    for k in range(1, 9):
        row[f"response_{k}"] = f"joke {k}"
        row.update({f"response_{k}_{rm}": float(rng.normal(3, 2)) for rm in PERSONAL_LLM_RMS})
    datasets.Dataset.from_list([row]).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    data = personal_llm(str(tmp_path), n_users=20, pairs_per_user=1, alpha=1.0, seed=0)
    assert data.counts["pairs"] == 20  # random real scores: no ties
    weights = {u.user_id: np.array(u.weights) for u in data.users}
    mean, sd = np.array(list(PERSONAL_LLM_RMS.values())).T
    for pair in data.pairs:
        for text, reward in [(pair.chosen, pair.chosen_reward), (pair.rejected, pair.rejected_reward)]:
            k = int(text.split()[1])
            raw = np.array([row[f"response_{k}_{rm}"] for rm in PERSONAL_LLM_RMS])
            assert reward == pytest.approx(float(weights[pair.user_id] @ ((raw - mean) / sd)))
        assert pair.chosen_reward > pair.rejected_reward


def test_apc_characters_worked_numbers():
    data = apc_characters(str(FIXTURES / "apc_characters"))
    # Mira.json: 3 statements; Tomas.json: 1 + 1 null. Mira.nli.json is another table, not read.
    assert [(c.character_id, len(c.statements)) for c in data.characters] == [("Mira", 3), ("Tomas", 1)]
    assert data.counts["statements_missing"] == 1
    # The query file has 2 + 2 queries on Mira's statements 0 and 2, and 1 on a statement Mira lacks.
    assert data.counts["queries"] == 4 and data.counts["queries_unmatched"] == 1
    mira = data.characters[0]
    assert mira.statements[2].slot == "s2"
    assert mira.statements[2].text == "Mira is patient and dry-humoured but wary of strangers."
    assert mira.statements[2].value == mira.statements[2].text
    assert [(q.slot, q.text) for q in data.queries[2:]] == [
        ("s2", "How do you feel about visitors, Mira?"), ("s2", "Are you easy to get along with?")]
    assert {q.character_id for q in data.queries} == {"Mira"}
    assert len({q.query_id for q in data.queries}) == 4
    one = apc_characters(str(FIXTURES / "apc_characters" / "Mira.json"))  # one file works too
    assert one.characters == [mira] and one.queries == data.queries


def test_fspo_roleplay_worked_numbers():
    data = fspo_roleplay(str(FIXTURES / "fspo_roleplay"), shots=1)
    # train: level 0 has 4 rows (one tie after stripping), level 1 has 3 (one null yl); test: level 0, 2.
    assert data.counts["rows"] == 9
    assert data.counts["ties_dropped"] == 1 and data.counts["missing_dropped"] == 1
    assert data.counts["pairs"] == 7
    # shots=1 -> chunks of 2 per user and split: train/0 has 3 (1 episode, 1 left), train/1 2, test/0 2.
    assert data.counts["episodes"] == 3 and data.counts["pairs_not_in_episodes"] == 1
    assert [(u.user_id, u.persona) for u in data.users] == [
        ("0", "The user is a retired sailor who likes short, salty answers."),
        ("1", "The user is a nurse who wants careful, step-by-step explanations.")]
    assert data.pairs[2] == PreferencePair(
        user_id="0", prompt=[{"role": "user", "content": "Any advice for a long trip?"}],
        chosen="Pack light, mind the tide.", rejected="Make a detailed checklist.", split="train")
    for episode in data.episodes:
        assert {p.split for p in [*episode.shots, episode.target]} == {episode.target.split}


def test_fspo_elix_worked_numbers():
    data = fspo_elix(str(FIXTURES / "fspo_elix"), shots=1)
    # 8 rows: label 0.5 -> tie, label null -> missing, 6 pairs left.
    assert data.counts["rows"] == 8 and data.counts["pairs"] == 6
    assert data.counts["ties_dropped"] == 1 and data.counts["missing_dropped"] == 1
    assert {u.user_id: u.persona for u in data.users} == {
        "a high school student": "The user is a high school student.", "an expert": "The user is an expert."}
    # label 1: response_y is preferred.
    hole = next(p for p in data.pairs if p.prompt[0]["content"] == "What is a black hole?")
    assert (hole.user_id, hole.chosen, hole.rejected) == (
        "an expert", "A spacetime region bounded by an event horizon.", "A region where gravity traps even light.")
    assert data.counts["episodes"] == 2  # train: 2 pairs per user -> 1 episode each; test: 1 per user -> 0


def test_fspo_review_worked_numbers():
    data = fspo_review(str(FIXTURES / "fspo_review"), shots=1)
    assert data.counts["rows"] == 5 and data.counts["duplicates_dropped"] == 1 and data.counts["pairs"] == 4
    assert {u.user_id: u.persona for u in data.users} == {
        "positive+concise": "This user prefers positive and concise reviews.",
        "negative": "This user prefers negative reviews."}
    up = next(p for p in data.pairs if "Up" in p.prompt[0]["content"])
    assert (up.chosen, up.rejected) == ("Charming and moving.", "Dull.")


def test_make_episodes_strides_k_plus_1_and_is_seeded():
    pairs = [PreferencePair("u", [{"role": "user", "content": f"q{i}"}], "a", "b", split="train") for i in range(7)]
    episodes = make_episodes(pairs, shots=2, seed=0)
    assert len(episodes) == 2  # 7 // 3; the reference's stride of shots + 2 would give 1
    used = [p for e in episodes for p in [*e.shots, e.target]]
    assert len(used) == 6 and len({p.prompt[0]["content"] for p in used}) == 6
    assert make_episodes(pairs, shots=2, seed=0) == episodes
    assert make_episodes(pairs, shots=2, seed=1) != episodes
    assert [len(e.shots) for e in make_episodes(pairs, shots=0, seed=0)] == [0] * 7


def _elix_tables():
    import datasets

    return datasets.DatasetDict({split: datasets.load_dataset("json", data_files=str(FIXTURES / "fspo_elix" /
                                 f"{split}.jsonl"), split="train") for split in ("train", "test")})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "save_to_disk"])
def test_every_file_format_gives_the_same_records(tmp_path, fmt):
    tables = _elix_tables()
    if fmt == "save_to_disk":
        tables.save_to_disk(str(tmp_path / "elix"))
        source = tmp_path / "elix"
    else:
        source = tmp_path / "elix"
        source.mkdir()
        for split, ds in tables.items():
            getattr(ds, f"to_{fmt}")(str(source / f"{split}.{fmt}"))
    assert fspo_elix(str(source), shots=1) == fspo_elix(str(FIXTURES / "fspo_elix"), shots=1)


def test_a_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    tables, calls = _elix_tables(), []  # built before the patch

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return tables

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = fspo_elix("Asap7772/elix_generations_gpt4omini_pref", shots=1)
    assert calls == [("Asap7772/elix_generations_gpt4omini_pref", None)]
    monkeypatch.undo()
    assert data == fspo_elix(str(FIXTURES / "fspo_elix"), shots=1)


def test_an_unreachable_hub_id_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RecordError) as e:
        fspo_roleplay("x/y")
    assert str(e.value) == ("x/y: not a local path, and the hub could not load it "
                            "(ConnectionError: Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled))")


def _rewrite_jsonl(path: Path, row: int, change) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows[row])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rewrite_json(path: Path, row: int, change) -> None:
    rows = json.loads(path.read_text())
    change(rows[row])
    path.write_text(json.dumps(rows))


def _set(key, value):
    return lambda row: row.__setitem__(key, value)


def _set_score(row):
    row["conversation_history"][2]["score"] = "high"


BAD_ROWS = [  # adapter, fixture dir, file, row, change, expected message after "<file> row <row>: "
    (prism, "prism", "conversations.jsonl", 1, _set_score, "conversation_history[2].score must be a number, got str"),
    (prism, "prism", "survey.jsonl", 2, _set("user_id", 3), "column 'user_id' must be a string, got int"),
    (personal_llm, "personal_llm", "data/test-00000-of-00001.jsonl", 1, _set("prompt", ["x"]),
     "column 'prompt' must be a string, got list"),
    (apc_characters, "apc_characters", "Tomas.json", 0, _set("statement", 7),
     "column 'statement' must be a string, got int"),
    (fspo_roleplay, "fspo_roleplay", "train.jsonl", 3, _set("yw", 3), "column 'yw' must be a string, got int"),
    (fspo_elix, "fspo_elix", "train.jsonl", 2, _set("label", "x"), "column 'label' must be a number, got str"),
    (fspo_review, "fspo_review", "train.jsonl", 4, _set("label", True), "column 'label' must be a number, got bool"),
]


@pytest.mark.parametrize(("adapter", "dataset", "file", "row", "change", "message"), BAD_ROWS,
                         ids=[f"{b[1]}-{b[2]}" for b in BAD_ROWS])
def test_a_bad_row_raises_one_line_naming_file_and_row(tmp_path, adapter, dataset, file, row, change, message):
    root = shutil.copytree(FIXTURES / dataset, tmp_path / dataset)
    path = root / file
    (_rewrite_json if path.suffix == ".json" else _rewrite_jsonl)(path, row, change)
    with pytest.raises(RecordError) as e:
        adapter(str(root))
    assert str(e.value) == f"{path} row {row}: {message}"


def test_a_missing_column_names_the_file(tmp_path):
    root = shutil.copytree(FIXTURES / "fspo_review", tmp_path / "review")
    path = root / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "scorer_level"}) + "\n" for r in rows))
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}: missing column 'scorer_level' \(has: "):
        fspo_review(str(root))


def test_prism_needs_both_tables(tmp_path):
    root = shutil.copytree(FIXTURES / "prism", tmp_path / "prism")
    (root / "survey.jsonl").unlink()
    with pytest.raises(RecordError, match=rf"^{re.escape(str(root))}: no 'survey' data files"):
        prism(str(root))
