"""Supervised fine-tuning: the base policy every later stage starts from (alignment/policy.py trains it).

    python -m alignment.sft config=sft_world.yaml                  # tiny Llama from scratch, ~5 min on 2 CPU cores
    python -m alignment.sft model.preset=null model.name_or_path=<hf model or dir> lr=2e-5
    python -m alignment.sft config=real/sft.yaml                   # SmolLM2-135M-Instruct, LoRA, on real-format pairs

Every other stage trains the same policy on demand (`alignment.policy.starting_policy`, cached under runs/cache/);
this command trains it into a run directory of its own.
"""

from __future__ import annotations

from pathlib import Path

from alignment.config import run_cli
from alignment.policy import SFTConfig, train_policy


def main(cfg: SFTConfig) -> Path:
    return train_policy(cfg)


if __name__ == "__main__":
    run_cli(SFTConfig, main)
