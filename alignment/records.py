"""Record types: the one place that documents and validates what stages write under runs/.

Stages talk through files (DESIGN.md, "every arrow is a file under runs/"): the persona world and the
dataset adapters write these records, training and evaluation read them back. Each type is a frozen
dataclass with `to_dict()` and `from_dict(d, where)`; `from_dict` checks required fields, types and
the few invariants a type has, and raises `RecordError` with ONE line that says where the bad record
is and what is wrong, e.g.

    runs/world-x/pairs.jsonl:17: field 'chosen' must be str, got int
    dataset 'train' row 42: missing field 'user_id'

Types (nested ones round-trip through JSONL and `datasets` alike):

    Statement       one persona statement about a typed slot ("i live in lyon .")
    Character       a role-play character: id, name, statements             (APC facet)
    Query           a question to a character, about one slot or off-topic  (APC facet)
    User            a person with preferences: persona text (+ ground truth in the world)
    PreferencePair  one labelled comparison of one user: prompt messages, chosen, rejected
    Episode         FSPO: k labelled pairs of one user + a held-out pair of the same user

Files: `write_jsonl(path, records)` writes atomically (temp file, fsync, rename), so a crashed stage
never leaves half a file behind; `read_jsonl(path, type)` validates every line and names `path:line`.
`to_dataset` / `from_dataset` convert to and from a `datasets.Dataset` (errors name dataset and row).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, TypedDict, TypeVar, Union, get_args, get_origin, get_type_hints, is_typeddict


class RecordError(ValueError):
    """A record (or a source row) is malformed. The message is one line: where, then what."""


class Message(TypedDict):
    """One chat message, the format of `tokenizer.apply_chat_template` and TRL's conversational data."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclasses.dataclass(frozen=True)
class Statement:
    """One persona statement, typed by the slot it is about.

    slot:  what the statement is about ("home", "job", ...). Real APC data has no slot types; its
           adapter gives each statement its own slot id (see adapters.apc_characters).
    value: the slot's value the statement asserts ("lyon"); the world's NLI oracle compares values.
    text:  the statement as it appears in prompts ("i live in lyon .").
    """

    slot: str
    value: str
    text: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Statement:
        return _from_dict(cls, d, where)


@dataclasses.dataclass(frozen=True)
class Character:
    """A role-play character (the APC facet, arXiv:2405.07726).

    character_id: unique id, used by Query.character_id.
    name:         the name the character is addressed by.
    statements:   everything the character's persona asserts (the world has 8 to 60).
    split:        which use the character is reserved for when the source assigns one (world:
                  "reward" / "evaluator" / "holdout", so the APC scorer and its evaluator never share
                  characters), else None.
    """

    character_id: str
    name: str
    statements: list[Statement]
    split: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Character:
        return _from_dict(cls, d, where)


@dataclasses.dataclass(frozen=True)
class Query:
    """A question put to a character.

    query_id:     unique id.
    character_id: the character it is asked of; None when it is asked of no one in particular.
    slot:         the slot it asks about; None for an off-topic query (APC's "irrelevant" case).
    text:         the question.
    split:        "train" / "test" when the source assigns one (world: prompt-disjoint), else None.
    """

    query_id: str
    character_id: str | None
    slot: str | None
    text: str
    split: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Query:
        return _from_dict(cls, d, where)


@dataclasses.dataclass(frozen=True)
class User:
    """A person whose preferences we model.

    user_id:     unique id; every PreferencePair.user_id refers to one.
    persona:     free text describing the user, shown to persona-conditioned models ("" when none).
    weights:     ground truth, one weight per attribute (world) or per reward model (PersonalLLM);
                 None for real users.
    cluster:     ground-truth population cluster (world only), else None.
    temperature: ground-truth Bradley-Terry temperature of the user's labels (world only), else None.
    split:       "train" / "val" / "test" when the source assigns one (world: user-disjoint), else None.
    """

    user_id: str
    persona: str
    weights: list[float] | None = None
    cluster: int | None = None
    temperature: float | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> User:
        return _from_dict(cls, d, where)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: `user_id` preferred `chosen` over `rejected` as a reply to `prompt`.

    user_id:         who labelled it.
    prompt:          the conversation so far, a list of {"role", "content"} messages (roles
                     system/user/assistant), ready for `apply_chat_template`.
    chosen:          the preferred reply (text only, no template tokens).
    rejected:        the dispreferred reply.
    prompt_id:       groups pairs that share a prompt (prompt-disjoint splits); None when unknown.
    chosen_reward:   the label's source score of `chosen` when there is one (world: true reward;
                     PRISM: the 1-100 rating; APC pairs: the APC score), else None.
    rejected_reward: the same for `rejected`.
    split:           the source's split when it assigns one ("train" / "test" for FSPO data; the world
                     writes "<user split>_<context|target>"), else None.
    votes:           [w_cr, w_rc]: evidence for chosen over rejected and for rejected over chosen, when
                     the label is soft (APC-DPO: the relevance-weighted statement votes of APC eq. 9,
                     see alignment/losses.py), else None.
    """

    user_id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    prompt_id: str | None = None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    split: str | None = None
    votes: list[float] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PreferencePair:
        return _from_dict(cls, d, where)


@dataclasses.dataclass(frozen=True)
class Episode:
    """One FSPO training example (arXiv:2502.19312, eq. 5): k labelled pairs of one user in context,
    and a held-out pair of the same user to optimize on.

    user_id: the user; every shot and the target belong to them.
    shots:   the k in-context pairs (k may be 0).
    target:  the pair the loss is computed on; it is not one of the shots.
    """

    user_id: str
    shots: list[PreferencePair]
    target: PreferencePair

    def __post_init__(self):
        # Checked here, not only when reading, so no stage can build an episode that leaks the
        # target into the context or mixes two users.
        for i, pair in enumerate([*self.shots, self.target]):
            if pair.user_id != self.user_id:
                name = f"shots[{i}]" if i < len(self.shots) else "target"
                raise RecordError(f"field '{name}.user_id' is {pair.user_id!r}, not the episode's {self.user_id!r}")
        if self.target in self.shots:
            raise RecordError("field 'target' is also one of the shots; the target must be held out")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Episode:
        return _from_dict(cls, d, where)


R = TypeVar("R")


def write_jsonl(path: str | os.PathLike, records: Iterable) -> Path:
    """Write records as JSON lines, atomically: readers see the old file or the whole new one.

    Every record is re-validated on the way out, so a writer's bug is caught here, naming the record,
    instead of in a later stage. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name beside the target (same filesystem, so os.replace is atomic). Opened with "x",
    # not mkstemp, so the file gets the usual umask permissions instead of mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for i, record in enumerate(records):
                d = record.to_dict()
                type(record).from_dict(d, f"{path} record {i}")
                f.write(json.dumps(d, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # fsync the directory too, or the rename itself can be lost on a crash (POSIX).
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read_jsonl(path: str | os.PathLike, record_type: type[R]) -> list[R]:
    """Read and validate a JSONL file of `record_type`; errors name `path:line`. Blank lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(record_type.from_dict(d, where))
    return records


def to_dataset(records: Iterable):
    """Records -> `datasets.Dataset`, one row per record, nested records as structs."""
    import datasets  # ~1.3 s to import; only the stages that need it pay for it

    return datasets.Dataset.from_list([r.to_dict() for r in records])


def from_dataset(ds, record_type: type[R], name: str) -> list[R]:
    """`datasets.Dataset` -> validated records; errors name the dataset and the (0-based) row."""
    return [record_type.from_dict(row, f"dataset {name!r} row {i}") for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------------------------
# Validation: one generic walk over the dataclass annotations, so a new field is validated by
# declaring it. Messages carry a dotted path to the bad value ("shots[2].prompt[0].role").


# Resolving string annotations costs ~20 us; a 100k-line pairs.jsonl would pay it per record.
_hints = functools.cache(get_type_hints)


def _from_dict(cls, d: Any, where: str):
    try:
        return _parse(cls, d, "")
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None


def _parse(cls, d: Any, prefix: str):
    """Build `cls` from the dict `d`, checking every field against its annotation."""
    if not isinstance(d, dict):
        what = f"field '{prefix[:-1]}'" if prefix else "a record"
        raise RecordError(f"{what} must be an object, got {_type_name(d)}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise RecordError(f"unknown field '{prefix}{key}' for {cls.__name__}{hint}")
    hints = _hints(cls)
    kwargs = {}
    for f in fields:
        if f.name in d:
            kwargs[f.name] = _check(d[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING:
            raise RecordError(f"missing field '{prefix}{f.name}'")
    return cls(**kwargs)  # __post_init__ invariants raise RecordError too


def _check(value: Any, tp: Any, name: str) -> Any:
    """Return `value` (ints widened to float where a float is declared) or raise RecordError."""
    origin = get_origin(tp)
    if origin in (Union, UnionType):  # only `X | None` is used
        if value is None:
            return None
        (inner,) = [a for a in get_args(tp) if a is not NoneType]
        return _check(value, inner, name)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(name, tp, value)
        (item,) = get_args(tp)
        return [_check(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise RecordError(f"field '{name}' must be one of {allowed}, got {_short(value)}")
        return value
    if is_typeddict(tp):
        return _check_typeddict(value, tp, name)
    if dataclasses.is_dataclass(tp):
        return _parse(tp, value, name + ".")
    if tp is float:
        # bool is an int subclass; True as a reward is a bug, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(name, tp, value)
        if not math.isfinite(value):
            raise RecordError(f"field '{name}' must be finite, got {value}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise _type_error(name, tp, value)
    if tp in (str, int):
        if not isinstance(value, tp):
            raise _type_error(name, tp, value)
        return value
    raise TypeError(f"records: unsupported annotation {tp!r} on field '{name}'")  # a bug in this file


def _check_typeddict(value: Any, tp: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise _type_error(name, tp, value)
    hints = _hints(tp)
    extra = sorted(set(value) - set(hints))
    if extra:
        raise RecordError(f"field '{name}' has unknown key {extra[0]!r} (allowed: {', '.join(hints)})")
    for key in hints:
        if key not in value:
            raise RecordError(f"missing field '{name}.{key}'")
    return {key: _check(value[key], hints[key], f"{name}.{key}") for key in hints}


def _type_error(name: str, tp: Any, value: Any) -> RecordError:
    return RecordError(f"field '{name}' must be {_type_label(tp)}, got {_type_name(value)}")


def _type_label(tp: Any) -> str:
    if get_origin(tp) is list:
        return "a list"
    if is_typeddict(tp):
        return f"an object with keys {', '.join(_hints(tp))}"
    return tp.__name__


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
