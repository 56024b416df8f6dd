"""Re-evaluate the reward models of a finished `rewards.persona_rm` run under the protocol of `rewards.rm_eval`.

    python -m alignment.evaluate kind=rm run=runs/persona_rm-<...>          # re-evaluate a trained run
    python -m alignment.eval_rm run=runs/persona_rm-<...> evaluation.ks=[0,4,16]

Same data, backbone and methods as the run (its config.yaml); results.json, results.md and accuracy_vs_k.png in
a new run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.config import load_config, run_cli
from alignment.runs import Run
from rewards.persona_rm import PersonaRMConfig, load_data, load_scorers
from rewards.rm_eval import RMEvalSettings, evaluate, write_report


# --- entry point --------------------------------------------------------------------------------------------------
@dataclass
class EvalRMConfig:
    kind: Literal["rm"] = "rm"  # `python -m alignment.evaluate kind=rm` picks this evaluation
    run: str = "???"  # a rewards.persona_rm run directory: its config.yaml names the data, backbone and methods
    methods: list[str] | None = None  # default: every method of the run
    name: str | None = None  # run name; default eval_rm-<timestamp>
    runs_dir: str = "runs"
    evaluation: RMEvalSettings = field(default_factory=RMEvalSettings)


Config = EvalRMConfig


def main(cfg: EvalRMConfig) -> Path:
    """Re-evaluate the reward models of a persona_rm run, on the same data, with these settings."""
    trained = load_config(PersonaRMConfig, [f"config={Path(cfg.run).absolute() / 'config.yaml'}"])
    run = Run.start(cfg, "eval_rm", runs_dir=cfg.runs_dir, name=cfg.name)
    data = load_data(trained)
    results = evaluate(load_scorers(cfg.run, trained, methods=cfg.methods), data, cfg.evaluation)
    print(write_report(results, run.dir))
    run.finish(results)
    return run.dir


if __name__ == "__main__":
    run_cli(EvalRMConfig, main)
