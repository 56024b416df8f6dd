"""The APC evaluation on the persona world: requests from world queries, the oracle scorer, the ΔAPC table.

`apc_table` scores each prompt condition's responses (APC paper Table 1: Vanilla, LCM, RAG, RAG+APC-DPO) by the
evaluator discriminators and by the world's oracle, with 95% bootstrap intervals over queries and paired
differences between rows; `OracleAPCScorer` is the world's true APC behind `rewards.apc.APCScorer`'s interface.
`alignment.dpo` builds its pairs and ends with this table; `python -m alignment.evaluate` reruns it on a checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from alignment import language as lang
from alignment.oracle import facts_of, oracle_probabilities, void_note
from alignment.stats import bootstrap_ci, format_ci, paired_difference_ci
from rewards.apc import APCRequest, APCScores, apc_delta, apc_terms, apc_value

log = logging.getLogger(__name__)

APC_DIFFERENCES = (("RAG+APC-DPO", "RAG"), ("RAG", "Vanilla"), ("RAG", "LCM"))


def world_apc_request(query: dict, character: dict, responses: Sequence[str] = ()):
    """The `rewards.apc.APCRequest` that scores `responses` to a world query against its character's persona."""
    return APCRequest([s["text"] for s in character["statements"]], query["text"], list(responses), character["name"])


def apc_table(queries: list[tuple[dict, dict]], responses: dict[str, list[str]], evaluator, seed: int = 0) -> dict:
    """ΔAPC per condition by the evaluator and the oracle, with intervals; paired differences of APC_DIFFERENCES.

    queries: (query, character) rows; responses: condition name -> one response per query (same order).
    """
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
    return lang.parse_response(text) is not None


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


def oracle_apc(character: dict, query_slot: str | None, text: str) -> tuple[float, float]:
    """(V_APC, ΔAPC) of one text with the oracle's relevance and NLI in place of the discriminators (APC eq. 3-6)."""
    probs = oracle_probabilities(facts_of(character), query_slot, [text])
    return apc_value(*probs).item(), apc_delta(*probs).item()


class OracleAPCScorer:
    """The world's true APC behind `rewards.apc.APCScorer`'s interface (`oracle_probabilities` instead of classifier
    probabilities).

    `alignment.dpo` trains on it with `reward=oracle`: the ceiling any pair of discriminators can reach, which tells
    a failed APC-DPO run's reward apart from its optimizer. Statements and queries must be world text.
    """

    def score(self, statements, query: str, responses, character: str = "", prune: bool = True):
        return self.score_many([APCRequest(statements, query, responses, character)])[0]

    def score_many(self, requests, prune: bool = True) -> list:
        out = []
        for r in requests:
            facts = [lang.parse_statement(s) for s in r.statements]
            p_rel, p_ent, p_con = oracle_probabilities(facts, lang.query_slot(r.query), list(r.responses))
            active, passive = apc_terms(p_rel, p_ent, p_con)
            out.append(APCScores(apc_value(p_rel, p_ent, p_con), apc_delta(p_rel, p_ent, p_con), p_rel, p_ent, p_con,
                                 active, passive, torch.ones(len(facts), dtype=torch.bool),
                                 torch.zeros_like(p_ent, dtype=torch.bool)))
        return out
