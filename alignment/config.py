"""One config loader for every entry point, plus the small dataclasses they share.

Every entry point is a dataclass schema and a `main(cfg)`:

    @dataclass
    class SFTConfig:
        output_dir: str = MISSING       # required: `???` in `help`, an error if never set
        seed: int = 0                   # random seed for python, numpy and torch
        model: ModelConfig = field(default_factory=ModelConfig)

    if __name__ == "__main__":
        run_cli(SFTConfig, main)

    $ python -m alignment.sft config=sft.yaml seed=3 model.hidden_size=64 'model.lora.target_modules=[q_proj,v_proj]'

Precedence: dataclass defaults < the YAML file named by `config=` < `key=value` arguments (last wins).
`config=x.yaml` is looked up in the working directory first, then in `configs/` at the repository root;
`config=configs/x.yaml` and absolute paths work too. `python -m <entry> help` prints every field.

Field docs convention: a `#` comment at the end of the field's line (as above) is its one-line doc in
`help`. Nothing else is needed; a field without a comment shows no doc.

Every bad input raises `ConfigError` with ONE line naming the key, e.g.
`sede: unknown key for SFTConfig; did you mean 'seed'?`, so `run_cli` can print it and exit 2
before anything (a run directory, a model) exists. The validation itself is omegaconf's
(`OmegaConf.structured` + `merge` + `to_object`); this module only finds the files and rewrites
omegaconf's multi-line exceptions into that one line.

This module imports no torch, so `help` and typos answer in ~0.3 s instead of ~4 s.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from alignment.files import atomic_write_text

T = TypeVar("T")

# `configs/` beside pyproject.toml. When the package is installed without its repository the
# directory does not exist and lookups simply skip it. Tests monkeypatch this constant.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

HELP_FLAGS = ("help", "--help", "-h")


class ConfigError(ValueError):
    """A bad config value, key or file; the message is one line that names the key or file."""


class RunExistsError(FileExistsError):
    """`Run.start(name=...)` on a run directory that exists, without `resume=True`."""


@dataclass
class LoraConfig:
    """LoRA adapter (Hu et al., arXiv:2106.09685); mapped onto `peft.LoraConfig` by `models.attach_lora`."""

    r: int = 8  # rank of the low-rank update
    alpha: int = 16  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # linear layers to adapt


@dataclass
class AdapterData:
    """Real preference data read through `alignment.adapters` instead of the persona world; users are split
    user-disjoint by seeded shares (`adapters.split_users`)."""

    adapter: str = "???"  # prism | personal_llm | fspo_roleplay | fspo_elix | fspo_review (adapters.ADAPTERS)
    source: str = "???"  # local directory/file or hub dataset id
    users: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test shares of users


@dataclass
class ModelConfig:
    """A Hugging Face model by `name_or_path`, or a tiny `preset` built from config (exactly one)."""

    name_or_path: str | None = None  # local directory or hub id of any Hugging Face model
    preset: str | None = None  # llama (tiny, from config, for the world tokenizer) or smollm2-135m-instruct
    hidden_size: int = 64  # preset only
    num_layers: int = 2  # preset only
    num_heads: int = 4  # preset only
    intermediate_size: int = 256  # preset only: MLP width
    max_positions: int = 512  # preset only: longest sequence the position embedding supports
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a bf16 GPU, else fp32
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:1
    lora: LoraConfig | None = None  # attach a LoRA adapter (set any lora.* key to enable)


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(schema: type[T], argv: list[str] | None = None) -> T:
    """Build a `schema` instance from defaults < `config=<yaml>` < `key=value` items (`sys.argv[1:]` if None)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    items = [_split_item(arg) for arg in argv]
    config_paths = [value for key, value in items if key == "config"]
    if len(config_paths) > 1:
        raise ConfigError(f"config: given {len(config_paths)} times; pass one YAML file")

    cfg = OmegaConf.structured(schema)
    if config_paths:
        path = find_config_file(config_paths[0])
        shown = _shown_path(path)
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(path, shown))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{shown}: {_explain(exc, schema)}") from None
    for key, value in items:
        if key == "config":
            continue
        try:
            # One merge per item, so an error omegaconf cannot place (`model=3`) still names its key.
            cfg = OmegaConf.merge(cfg, _override(schema, key, value))
        except OmegaConfBaseException as exc:
            raise ConfigError(_explain(exc, schema, key, value)) from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc, schema)) from None


def find_config_file(name: str) -> Path:
    """Resolve `config=<name>`: absolute, else ./name, else configs/name (or `configs/x.yaml` from the root)."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, CONFIG_DIR / path, CONFIG_DIR.parent / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = "." if path.is_absolute() else f"., {_shown_path(CONFIG_DIR)}/"
    raise ConfigError(f"config: file not found: {name} (looked in {where})")


def _split_item(arg: str) -> tuple[str, str]:
    key, sep, value = arg.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(f"{arg}: expected key=value (e.g. seed=1 or config=file.yaml)")
    return key, value


def _override(schema: type, key: str, value: str) -> DictConfig:
    """One `key=value` item as a nested config; values are YAML (`1e-4` float, `[a,b]` list, `null`)."""
    node = OmegaConf.from_dotlist([f"{key}={value}"])
    # YAML would read `name=007` as 7 and `persona=no` as False; a str field keeps what was typed.
    # Quoted values ('"007"') and null still go through YAML.
    if _is_str(_field_type(schema, key)) and value not in ("null", "~") and value[:1] not in "'\"":
        OmegaConf.update(node, key, value, merge=False)
    return node


def _read_yaml(path: Path, shown: str) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config: {shown}: {where}{problem}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config: {shown}: expected a mapping of keys at the top level")
    return loaded


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# One-line errors


def _explain(exc: OmegaConfBaseException, schema: type, key: str | None = None, value: Any = None) -> str:
    """Rewrite an omegaconf exception as `<dotted key>: <what is wrong>`."""
    full_key = exc.full_key or key
    if isinstance(exc, ConfigKeyError) and full_key:
        return _unknown_key_message(schema, str(full_key))
    if isinstance(exc, MissingMandatoryValue) and full_key:
        return f"{full_key}: missing required value"
    if isinstance(exc, ValidationError) and full_key:
        got = exc.value if exc.full_key else value
        return _type_message(str(full_key), _field_type(schema, str(full_key)), got)
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{full_key}: {first_line}" if full_key else first_line


def _unknown_key_message(schema: type, full_key: str) -> str:
    parent, _, name = full_key.rpartition(".")
    owner = _unwrap_optional(_field_type(schema, parent)) if parent else schema
    valid = [f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner) else []
    where = owner.__name__ if isinstance(owner, type) else parent
    removed = getattr(owner, "REMOVED", {})  # a schema's ClassVar: option -> what replaces it
    if name in removed:
        return f"{full_key}: no longer a key of {where}; {removed[name]}"
    close = difflib.get_close_matches(name, valid, n=1)
    if not close and dataclasses.is_dataclass(owner):
        # `seed=1` where the field is `world.seed`: look for the name in the sections below.
        nested = [path for path in _dotted_fields(owner) if "." in path]
        by_leaf = {path.rsplit(".", 1)[1]: path for path in reversed(nested)}  # shallowest path wins
        close = [by_leaf[leaf] for leaf in difflib.get_close_matches(name, list(by_leaf), n=1)]
    if close:  # suggest the full dotted key, ready to paste
        hint = f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
    else:
        hint = f"valid keys: {', '.join(valid)}"
    return f"{full_key}: unknown key for {where}; {hint}"


def _dotted_fields(cls: type) -> list[str]:
    """Every field of a dataclass schema as a dotted path, sections included, shallowest first."""
    paths, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        paths.append(f.name)
        inner = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            paths += [f"{f.name}.{sub}" for sub in _dotted_fields(inner)]
    return sorted(paths, key=lambda p: p.count("."))


def _type_message(full_key: str, tp: Any, got: Any) -> str:
    shown = "null" if got is None else repr(got)
    choices = _literal_choices(tp)
    if choices:
        message = f"{full_key}: expected one of {', '.join(map(repr, choices))}, got {shown}"
        close = difflib.get_close_matches(str(got), [str(c) for c in choices], n=1)
        return message + (f"; did you mean '{close[0]}'?" if close else "")
    return f"{full_key}: expected {_type_name(tp) if tp is not None else 'another type'}, got {shown}"


# --------------------------------------------------------------------------------------------------
# Schema introspection (annotations of the dataclasses, followed along a dotted key)


def _field_type(schema: type, dotted: str) -> Any:
    """The annotation at `dotted` (`model.lora.r`, `xs[1]`, `weights.a`) in `schema`; None when unknown."""
    tp: Any = schema
    for part in re.findall(r"[^.\[\]]+", dotted):
        tp = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
        if tp is None:
            return None
    return tp


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else tp


def _is_str(tp: Any) -> bool:
    return _unwrap_optional(tp) is str


def _literal_choices(tp: Any) -> tuple:
    tp = _unwrap_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _type_name(tp: Any) -> str:
    """`list[str]`, `str | None`, `{a,b}` (a Literal), `LoraConfig | None`: short, without module paths."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"  # argparse's choice notation: {dpo,ipo}
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------------
# help


def config_help(schema: type, prog: str | None = None) -> str:
    """Every field of `schema` (dotted for nested dataclasses) with type, default (`???` = required) and doc."""
    rows = list(_help_rows(schema, OmegaConf.structured(schema), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)] if rows else [0, 0, 0]
    lines = [f"usage: {prog or _prog_name()} [config=FILE.yaml] [key=value ...]"]
    if schema.__doc__ and not schema.__doc__.startswith(f"{schema.__name__}("):
        lines += ["", schema.__doc__.strip().split("\n\n")[0]]
    lines += ["", f"{schema.__name__} fields (defaults < config file < key=value; ??? = required):"]
    for name, type_name, default, doc in rows:
        cells = f"  {name:<{widths[0]}}  {type_name:<{widths[1]}}  {default:<{widths[2]}}"
        lines.append(f"{cells}  {doc}".rstrip())
    return "\n".join(lines)


def _help_rows(cls: type, node: DictConfig, prefix: str):
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], prefix + f.name
        inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner) and inner is not tp:
            # An optional section: its own row (null = off), then its fields with the defaults it gets when set.
            yield name, _type_name(tp), _show(node[f.name]), docs.get(f.name, "")
            child = node[f.name] if node[f.name] is not None else OmegaConf.structured(inner)
            yield from _help_rows(inner, child, name + ".")
        elif dataclasses.is_dataclass(inner):
            yield from _help_rows(inner, node[f.name], name + ".")
        else:
            default = "???" if OmegaConf.is_missing(node, f.name) else _show(node[f.name])
            yield name, _type_name(tp), default, docs.get(f.name, "")


def _show(value: Any) -> str:
    """A default as it would be typed on the command line (YAML flow style)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value) if value == "" else str(value)


def _field_docs(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each field's line in the class source (empty if the source is unavailable)."""
    import ast
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # classes from `python -c` or a REPL have no source
        return {}
    source = textwrap.dedent(source)  # a class defined inside a function is indented
    lines = source.splitlines(keepends=True)
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(iter(lines).__next__)
        if tok.type == tokenize.COMMENT
    }
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            if found:
                docs[node.target.id] = found[0]
    return docs


def _prog_name() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else f"python {os.path.basename(sys.argv[0])}"


def run_cli(schema: type[T], main: Callable[[T], Any], argv: list[str] | None = None) -> Any:
    """What every entry point's `__main__` calls: help, or load the config (exit 2 on error), then `main(cfg)`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in HELP_FLAGS for arg in argv):
        print(config_help(schema))
        raise SystemExit(0)
    try:
        cfg = load_config(schema, argv)
    except ConfigError as exc:
        # One line, no traceback, and nothing written yet: main() has not run.
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return main(cfg)
    # `name=` of a finished run without resume=true, or a check of values main makes before writing anything
    except (RunExistsError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------------------
# Entry points with several kinds (rewards.train, alignment.evaluate)


def read_kind(argv: list[str]) -> str | None:
    """The `kind` of an invocation: the last `kind=` argument, else the `kind` key of the `config=` YAML."""
    given = [arg.partition("=")[2] for arg in argv if arg.startswith("kind=")]
    if given:
        return given[-1]
    configs = [arg.partition("=")[2] for arg in argv if arg.startswith("config=")]
    if not configs:
        return None
    path = find_config_file(configs[-1])
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path}: {str(exc).splitlines()[0]}") from None
    return loaded.get("kind") if isinstance(loaded, dict) else None


def kind_error(kind: str | None, kinds: dict[str, str]) -> str:
    """One line: what is wrong with `kind`, the valid kinds and the closest one."""
    valid = ", ".join(kinds)
    if kind is None:
        return f"kind: missing; set it in the YAML or pass kind=<one of {valid}>"
    close = difflib.get_close_matches(str(kind), list(kinds), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"kind: unknown kind {kind!r} (valid kinds: {valid}){hint}"


def run_kind(kinds: dict[str, str], argv: list[str] | None, usage: str, default: str | None = None) -> Any:
    """Dispatch an entry point on `kind`: import the module `kinds[kind]` names and run its `Config` and `main`
    through `run_cli` with the whole command line. `default` is the kind when none is given."""
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        kind = read_kind(argv) or default
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if kind is None and any(arg in HELP_FLAGS for arg in argv):
        print(f"usage: {usage}\n\nkinds (the config's `kind` key; add it to `help` for that kind's fields):\n"
              + "\n".join(f"  {k:<20} {m}" for k, m in kinds.items()))
        raise SystemExit(0)
    if kind not in kinds:
        print(f"error: {kind_error(kind, kinds)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(kinds[kind])
    return run_cli(module.Config, module.main, argv)


# --------------------------------------------------------------------------------------------------
# Saving and hashing


def _as_config(cfg: Any) -> DictConfig:
    """A dataclass instance or a plain dict as a typed omegaconf node (floats stay floats: 1 -> 1.0)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.structured(cfg)
    if isinstance(cfg, dict):
        return OmegaConf.create(cfg)
    raise TypeError(f"expected a config dataclass instance or a dict, got {type(cfg).__name__}")


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML; `load_config(type(cfg), ["config=<file>"])` gives it back equal."""
    return OmegaConf.to_yaml(_as_config(cfg))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write `to_yaml(cfg)` to `path` atomically."""
    atomic_write_text(path, to_yaml(cfg))


def config_hash(cfg: Any) -> str:
    """First 12 hex digits of sha256 over the canonical JSON (sorted keys, no spaces) of the resolved config.

    Stable across processes and Python hash seeds; typed through the schema, so `Cfg(beta=1)` and a
    loaded `beta: 1.0` hash alike. 12 hex digits = 48 bits: a collision among 10^4 cached artifacts
    has probability ~2e-7.
    """
    container = OmegaConf.to_container(_as_config(cfg), resolve=True)
    canonical = json.dumps(container, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


__all__ = [
    "MISSING",
    "AdapterData",
    "ConfigError",
    "LoraConfig",
    "ModelConfig",
    "config_hash",
    "config_help",
    "find_config_file",
    "load_config",
    "run_cli",
    "save_config",
    "to_yaml",
]
