"""Train a reward model of any kind: one entry point, one module per kind, picked by the config's `kind` key.

    python -m rewards.train config=apc_discriminators.yaml            # kind read from the YAML
    python -m rewards.train kind=apc_discriminators nli_steps=100     # or given on the command line
    python -m rewards.train config=apc_discriminators.yaml help       # the fields of that kind's config

This file only dispatches: it reads `kind` (the command line wins over the YAML), imports the module that
`KINDS` names and hands it the whole command line through `alignment.config.run_cli(module.Config, module.main)`.
Each module is readable on its own, with its config dataclass (which has the `kind` field) and `main(cfg)`.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from alignment.config import HELP_FLAGS, ConfigError, find_config_file

KINDS = {"apc_discriminators": "rewards.discriminators"}


def read_kind(argv: list[str]) -> str | None:
    """The `kind` of this invocation: the last `kind=` argument, else the `kind` key of the `config=` YAML."""
    import yaml

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


def kind_error(kind: str | None) -> str:
    """One line: what is wrong with `kind`, the valid kinds and the closest one."""
    valid = ", ".join(KINDS)
    if kind is None:
        return f"kind: missing; set it in the YAML or pass kind=<one of {valid}>"
    close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"kind: unknown kind {kind!r} (valid kinds: {valid}){hint}"


def main(argv: list[str] | None = None):
    from alignment.config import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        kind = read_kind(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if kind is None and any(arg in HELP_FLAGS for arg in argv):
        print(f"usage: python -m rewards.train config=FILE.yaml [key=value ...]\n\nkinds (the config's `kind` key; "
              f"add it to `help` for that kind's fields):\n" + "\n".join(f"  {k:<20} {m}" for k, m in KINDS.items()))
        raise SystemExit(0)
    if kind not in KINDS:
        print(f"error: {kind_error(kind)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(KINDS[kind])
    return run_cli(module.Config, module.main, argv)


if __name__ == "__main__":
    main()
