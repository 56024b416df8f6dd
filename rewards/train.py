"""Train a reward model of any kind: one entry point, one module per kind, picked by the config's `kind` key.

    python -m rewards.train config=apc_discriminators.yaml            # kind read from the YAML
    python -m rewards.train kind=apc_discriminators nli_steps=100     # or given on the command line
    python -m rewards.train config=apc_discriminators.yaml help       # the fields of that kind's config

This file only dispatches (`alignment.config.run_kind`): it reads `kind` (the command line wins over the YAML),
imports the module that `KINDS` names and hands it the whole command line through `run_cli(module.Config,
module.main)`.
Each module is readable on its own, with its config dataclass (which has the `kind` field) and `main(cfg)`.
"""

from __future__ import annotations

KINDS = {
    "apc_discriminators": "rewards.discriminators",  # APC relevance + NLI classifiers (apc_discriminators.yaml)
    "persona_rm": "rewards.persona_rm",  # persona-conditioned Bradley-Terry reward models (persona_rm_*.yaml)
    "guides": "rewards.guides",  # guides of decoding-time personalization (guides.yaml)
}


def main(argv: list[str] | None = None):
    from alignment.config import run_kind

    return run_kind(KINDS, argv, "python -m rewards.train config=FILE.yaml [key=value ...]")


if __name__ == "__main__":
    main()
