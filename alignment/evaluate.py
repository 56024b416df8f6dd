"""Evaluation entry point: rerun a training run's closing evaluation on any checkpoint.

    python -m alignment.evaluate policy=runs/dpo-<...>/ckpt/step_000040/model dpo=runs/dpo-<...>   # kind=apc
    python -m alignment.evaluate kind=rm run=runs/persona_rm-<...> 'eval.ks=[0,4,16]'            # alignment/eval_rm.py

The entry point dispatches on `kind` (alignment.config.run_kind; apc when none is given) to one module per kind.

APC (role-play faithfulness): ΔAPC of each prompt condition (APC paper Table 1: Vanilla, LCM, RAG, RAG+APC-DPO)
scored by the evaluator discriminators and by the world's oracle, with 95% bootstrap intervals over queries and
paired differences between rows (`rewards.apc_eval`). Numbers land in `results.json`, the table in `results.md`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    kind: Literal["apc"] = "apc"  # apc: this module; rm: alignment/eval_rm.py
    seed: int = 0
    name: str | None = None  # run name; default eval-<timestamp>
    runs_dir: str = "runs"
    policy: str = "???"  # HF directory of the policy to evaluate against its base (the RAG+APC-DPO row)
    base: str | None = None  # HF directory of the base policy (Vanilla/LCM/RAG rows); default: the cached SFT policy
    dpo: str | None = None  # a dpo run directory whose config supplies world, discriminators and eval settings


def main(cfg: EvaluateConfig) -> Path:
    """Re-run the APC evaluation of a DPO run on any checkpoint (same prompts, discriminators and oracle)."""
    from alignment.config import load_config
    from alignment.dpo import DPOConfig, _load_policy, evaluate, prerequisites
    from alignment.files import atomic_write_text
    from alignment.models import load_tokenizer
    from alignment.runs import Run, seed_everything
    from alignment.world import load_world
    from rewards.apc_eval import format_apc_table
    from rewards.discriminators import load_scorer

    dpo_cfg = load_config(DPOConfig, [f"config={Path(cfg.dpo) / 'config.yaml'}"] if cfg.dpo else [])
    run = Run.start(cfg, "eval", runs_dir=cfg.runs_dir, name=cfg.name)
    seed_everything(cfg.seed)
    world_dir, policy_dir, disc_dir = prerequisites(dpo_cfg)
    base_dir = Path(cfg.base) if cfg.base else policy_dir
    tokenizer = load_tokenizer(base_dir)
    results = evaluate(dpo_cfg, load_world(world_dir), _load_policy(base_dir, tokenizer),
                       _load_policy(Path(cfg.policy), tokenizer), tokenizer, load_scorer(disc_dir, "reward"),
                       load_scorer(disc_dir, "evaluator"), run)
    table = format_apc_table(results)
    atomic_write_text(run.path("results.md"), table + "\n")
    print(table)
    run.finish(results)
    return run.dir


Config = EvaluateConfig  # the name `run_kind` dispatches to
KINDS = {"apc": "alignment.evaluate", "rm": "alignment.eval_rm"}

if __name__ == "__main__":
    from alignment.config import run_kind

    run_kind(KINDS, None, "python -m alignment.evaluate [kind=apc|rm] [config=FILE.yaml] [key=value ...]",
             default="apc")
