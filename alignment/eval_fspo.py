"""Re-run the held-out-user FSPO evaluation (`alignment.fspo_eval`) of a finished FSPO run on any checkpoint.

    python -m alignment.eval_fspo fspo=runs/fspo-<...>                   # re-evaluate a finished FSPO run
    python -m alignment.eval_fspo fspo=runs/fspo-<...> policy=runs/fspo-<...>/ckpt/step_000100/model

The run's config supplies the world, the policies and the settings (`eval=` overrides them); world runs only, since
win rates need the users' true rewards. results.json, results.md, win_rate_vs_k.png and samples.jsonl land in a
new run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from alignment.config import load_config, run_cli
from alignment.fspo import FSPOConfig, load_policy, population_policy, positions, prerequisites
from alignment.fspo_eval import EvalSettings, evaluate_world
from alignment.runs import Run, seed_everything
from alignment.training import final_model
from alignment.world import load_world


# --- entry point ------------------------------------------------------------------------------------------------
@dataclass
class EvalFSPOConfig:
    seed: int = 0
    name: str | None = None  # run name; default eval-fspo-<timestamp>
    runs_dir: str = "runs"
    fspo: str = "???"  # a finished fspo run directory; its config supplies world, policies and settings
    policy: str | None = None  # evaluate this checkpoint instead of the run's last one
    eval: EvalSettings | None = None  # None: the settings the run was trained with


def main(cfg: EvalFSPOConfig) -> Path:
    """Re-run the held-out-user evaluation of an FSPO run on any checkpoint."""
    fspo_cfg = load_config(FSPOConfig, [f"config={Path(cfg.fspo) / 'config.yaml'}"])
    if cfg.eval is not None:
        fspo_cfg = replace(fspo_cfg, eval=cfg.eval)
    if fspo_cfg.data is not None:
        raise ValueError(f"fspo: {cfg.fspo} trained on adapter data; win rates need the world's true rewards")
    run = Run.start(cfg, "eval-fspo", runs_dir=cfg.runs_dir, name=cfg.name)
    seed_everything(cfg.seed)
    world_dir, policy_dir = prerequisites(fspo_cfg)
    length = positions(replace(fspo_cfg, evaluate=True))
    tokenizer, base = load_policy(policy_dir, length)
    trained = load_policy(Path(cfg.policy) if cfg.policy else final_model(Path(cfg.fspo)), length)[1]
    stage1 = Path(cfg.fspo) / "pref_ft"
    pref_ft = load_policy(stage1, length)[1] if stage1.exists() else None
    results = evaluate_world(fspo_cfg, load_world(world_dir), tokenizer, base, trained,
                             population_policy(fspo_cfg, world_dir, policy_dir), run.dir, pref_ft)
    run.finish(results)
    return run.dir


if __name__ == "__main__":
    run_cli(EvalFSPOConfig, main)
