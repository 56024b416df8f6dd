"""Evaluation: the functions every training entry point ends with, and an entry point to run them on any checkpoint.

    python -m alignment.evaluate policy=runs/dpo-<...>/ckpt/step_000040/model dpo=runs/dpo-<...>   # kind=apc
    python -m alignment.evaluate kind=rm run=runs/persona_rm-<...> 'eval.ks=[0,4,16]'            # alignment/eval_rm.py

The entry point dispatches on `kind` (alignment.config.run_kind; apc when none is given) to one module per kind.

APC (role-play faithfulness): ΔAPC of each prompt condition (APC paper Table 1: Vanilla, LCM, RAG, RAG+APC-DPO)
scored by the evaluator discriminators and by the world's oracle, with 95% bootstrap intervals over queries and
paired differences between rows. Numbers land in `results.json`, the table in `results.md`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from alignment.oracle import void_note
from alignment.stats import bootstrap_ci, format_ci, paired_difference_ci

log = logging.getLogger(__name__)

APC_DIFFERENCES = (("RAG+APC-DPO", "RAG"), ("RAG", "Vanilla"), ("RAG", "LCM"))


def world_apc_request(query: dict, character: dict, responses: Sequence[str] = ()):
    """The `rewards.apc.APCRequest` that scores `responses` to a world query against its character's persona."""
    from rewards.apc import APCRequest

    return APCRequest([s["text"] for s in character["statements"]], query["text"], list(responses), character["name"])


def apc_table(queries: list[tuple[dict, dict]], responses: dict[str, list[str]], evaluator, seed: int = 0) -> dict:
    """ΔAPC per condition by the evaluator and the oracle, with intervals; paired differences of APC_DIFFERENCES.

    queries: (query, character) rows; responses: condition name -> one response per query (same order).
    """
    from alignment.oracle import oracle_apc

    names = list(responses)
    requests = [world_apc_request(q, c, [responses[n][i] for n in names]) for i, (q, c) in enumerate(queries)]
    scores = evaluator.score_many(requests)  # one relevance pass per query, all conditions' NLI batched together
    by_evaluator = {n: np.array([s.delta[j].item() for s in scores]) for j, n in enumerate(names)}
    by_oracle = {n: np.array([oracle_apc(c, q["slot"], responses[n][i])[1] for i, (q, c) in enumerate(queries)])
                 for n in names}
    valid = {n: float(np.mean([_valid(r) for r in responses[n]])) for n in names}
    rows = {n: {"evaluator": bootstrap_ci(by_evaluator[n], seed=seed), "oracle": bootstrap_ci(by_oracle[n], seed=seed),
                "valid": valid[n]} for n in names}
    diffs = {f"{a} - {b}": {"evaluator": paired_difference_ci(by_evaluator[a], by_evaluator[b], seed=seed),
                            "oracle": paired_difference_ci(by_oracle[a], by_oracle[b], seed=seed)}
             for a, b in APC_DIFFERENCES if a in names and b in names}
    out = {"queries": len(queries), "rows": rows, "differences": diffs}
    note = void_note(valid, "the APC table")
    if note:
        log.warning(note)
        out["void"] = note
    return out


def _valid(text: str) -> bool:
    from alignment.language import parse_response

    return parse_response(text) is not None


def format_apc_table(results: dict) -> str:
    """Markdown: one row per condition, ΔAPC mean [95% CI] by evaluator and oracle; then the paired differences."""
    lines = ([f"**{results['void']}**", ""] if results.get("void") else []) + [
             f"ΔAPC on {results['queries']} held-out queries (mean [95% bootstrap CI over queries])", "",
             "| method | ΔAPC evaluator | ΔAPC oracle | valid |", "|---|---|---|---|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {format_ci(row['evaluator'])} | {format_ci(row['oracle'])} | {row['valid']:.1%} |")
    lines += ["", "| paired difference | evaluator | oracle |", "|---|---|---|"]
    for name, d in results["differences"].items():
        lines.append(f"| {name} | {format_ci(d['evaluator'])} | {format_ci(d['oracle'])} |")
    return "\n".join(lines)


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
    from alignment.models import load_tokenizer
    from alignment.runs import Run, atomic_write_text, seed_everything
    from alignment.world import load_world
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
