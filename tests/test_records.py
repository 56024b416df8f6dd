"""Record types: round trips through JSONL and `datasets`, and one-line errors that name the record."""

import json
import re

import pytest

from alignment.records import (
    Character,
    Episode,
    PreferencePair,
    Query,
    RecordError,
    Statement,
    User,
    from_dataset,
    read_jsonl,
    to_dataset,
    write_jsonl,
)


def _pair(user="u1", prompt="where do you live ?", chosen="i live in lyon .", rejected="hello .", **kw):
    return PreferencePair(user_id=user, prompt=[{"role": "user", "content": prompt}], chosen=chosen,
                          rejected=rejected, **kw)


EXAMPLES = {
    Statement: [Statement("home", "lyon", "i live in lyon ."), Statement("job", "baker", "i am a baker .")],
    Character: [
        Character("c0", "anna", [Statement("home", "lyon", "i live in lyon ."),
                                 Statement("pet", "cat", "i have a cat .")]),
        Character("c1", "boris", [], split="holdout"),
    ],
    Query: [Query("q0", "c0", "home", "where do you live ?", "test"), Query("q1", None, None, "nice weather ?")],
    User: [User("u1", "likes short answers .", [0.25, 0.75], 1, 0.5, "train"), User("u2", "")],
    PreferencePair: [
        _pair(prompt_id="p0", chosen_reward=1.5, rejected_reward=-0.5, split="train"),
        PreferencePair("u2", [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hi"}],
                       "hi !", "good day to you .", None, None, None, None),
    ],
    Episode: [
        Episode("u1", [_pair(prompt="a ?"), _pair(prompt="b ?", chosen_reward=2.0)],
                _pair(prompt="c ?", split="test")),
        Episode("u1", [], _pair()),  # k = 0 shots is a valid episode
    ],
}


@pytest.mark.parametrize("record_type", list(EXAMPLES), ids=lambda t: t.__name__)
def test_jsonl_round_trip(tmp_path, record_type):
    records = EXAMPLES[record_type]
    path = write_jsonl(tmp_path / "runs" / "x" / "records.jsonl", records)  # parent dirs are created
    assert len(path.read_text().splitlines()) == len(records)
    assert read_jsonl(path, record_type) == records


@pytest.mark.parametrize("record_type", list(EXAMPLES), ids=lambda t: t.__name__)
def test_dataset_round_trip(record_type):
    records = EXAMPLES[record_type]
    ds = to_dataset(records)
    assert ds.num_rows == len(records)
    assert from_dataset(ds, record_type, "x") == records


def test_nested_records_are_structs_in_datasets():
    ds = to_dataset(EXAMPLES[Episode])
    # shots -> list of structs, each with its own prompt list of {role, content} structs
    assert ds[0]["shots"][1]["prompt"] == [{"role": "user", "content": "b ?"}]
    assert ds[0]["target"]["split"] == "test"
    statement = to_dataset(EXAMPLES[Character])[0]["statements"][1]
    assert statement == {"slot": "pet", "value": "cat", "text": "i have a cat ."}


def test_read_jsonl_names_the_line_that_is_not_json(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(_pair().to_dict())
    path.write_text(f"{good}\n{good[:40]}\n{good}\n")
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: not valid JSON \(") as e:
        read_jsonl(path, PreferencePair)
    assert "\n" not in str(e.value)


def test_read_jsonl_names_line_and_field_of_a_wrong_type(tmp_path):
    path = tmp_path / "pairs.jsonl"
    bad = _pair().to_dict() | {"chosen": 3}
    # line 2 is blank: skipped, but still counted, so the error points at the real line 3
    path.write_text(f"{json.dumps(_pair().to_dict())}\n\n{json.dumps(bad)}\n")
    with pytest.raises(RecordError) as e:
        read_jsonl(path, PreferencePair)
    assert str(e.value) == f"{path}:3: field 'chosen' must be str, got int"


def test_read_jsonl_rejects_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "users.jsonl"
    path.write_text('["u1", "persona"]\n')
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:1: a record must be an object, got list$"):
        read_jsonl(path, User)


def test_from_dataset_names_dataset_and_row():
    import datasets

    with pytest.raises(RecordError, match=r"^dataset 'train' row 0: missing field 'user_id'$"):
        from_dataset(datasets.Dataset.from_list([{"persona": "p"}]), User, "train")
    rows = [{"user_id": "a", "persona": "p"}, {"user_id": None, "persona": "q"}]
    with pytest.raises(RecordError, match=r"^dataset 'users' row 1: field 'user_id' must be str, got None$"):
        from_dataset(datasets.Dataset.from_list(rows), User, "users")


def test_nested_errors_carry_the_path_to_the_bad_value():
    d = EXAMPLES[Episode][0].to_dict()
    d["shots"][1]["prompt"][0]["role"] = "bot"
    with pytest.raises(RecordError) as e:
        Episode.from_dict(d, "runs/x/episodes.jsonl:7")
    assert str(e.value) == ("runs/x/episodes.jsonl:7: field 'shots[1].prompt[0].role' "
                            "must be one of 'system', 'user', 'assistant', got 'bot'")
    d = EXAMPLES[Character][0].to_dict()
    del d["statements"][0]["value"]
    with pytest.raises(RecordError, match=r"^w: missing field 'statements\[0\]\.value'$"):
        Character.from_dict(d, "w")


def test_messages_must_be_exactly_role_and_content():
    d = _pair().to_dict()
    d["prompt"][0]["name"] = "anna"
    with pytest.raises(RecordError, match=r"^w: field 'prompt\[0\]' has unknown key 'name'"):
        PreferencePair.from_dict(d, "w")


def test_unknown_field_suggests_the_close_name():
    d = _pair().to_dict() | {"chosen_rewrd": 1.0}
    with pytest.raises(RecordError) as e:
        PreferencePair.from_dict(d, "w")
    assert str(e.value) == "w: unknown field 'chosen_rewrd' for PreferencePair (did you mean 'chosen_reward'?)"


def test_rewards_widen_ints_and_reject_bools_and_nan():
    assert PreferencePair.from_dict(_pair().to_dict() | {"chosen_reward": 2}, "w").chosen_reward == 2.0
    assert isinstance(PreferencePair.from_dict(_pair().to_dict() | {"chosen_reward": 2}, "w").chosen_reward, float)
    with pytest.raises(RecordError, match=r"field 'chosen_reward' must be float, got bool"):
        PreferencePair.from_dict(_pair().to_dict() | {"chosen_reward": True}, "w")
    with pytest.raises(RecordError, match=r"field 'rejected_reward' must be finite, got nan"):
        PreferencePair.from_dict(_pair().to_dict() | {"rejected_reward": float("nan")}, "w")
    with pytest.raises(RecordError, match=r"field 'cluster' must be int, got float"):
        User.from_dict({"user_id": "u", "persona": "", "cluster": 1.0}, "w")


def test_episode_rejects_another_users_pair_and_a_leaked_target():
    with pytest.raises(RecordError, match=r"field 'shots\[1\]\.user_id' is 'u2', not the episode's 'u1'"):
        Episode("u1", [_pair(), _pair(user="u2")], _pair(prompt="c ?"))
    with pytest.raises(RecordError, match=r"field 'target\.user_id' is 'u2'"):
        Episode("u1", [_pair()], _pair(user="u2"))
    with pytest.raises(RecordError, match=r"^w:3: field 'target' is also one of the shots"):
        Episode.from_dict({"user_id": "u1", "shots": [_pair().to_dict()], "target": _pair().to_dict()}, "w:3")


def test_write_jsonl_validates_and_leaves_the_old_file_untouched(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", EXAMPLES[PreferencePair])
    before = path.read_bytes()
    # Constructors do not type-check (records are plain dataclasses); the writer does.
    broken = [*EXAMPLES[PreferencePair], PreferencePair("u3", [], 3, "x")]
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))} record 2: field 'chosen' must be str, got int$"):
        write_jsonl(path, broken)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no temp file left behind
