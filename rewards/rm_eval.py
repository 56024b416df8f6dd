"""Evaluation of personalized reward models: one protocol that makes population and personal gains comparable.

    python -m alignment.evaluate kind=rm run=runs/persona_rm-<...>    # rerun on a trained run (alignment/eval_rm.py)

What it measures (research/reward_models.md §1, §6.3, §7), for every method of a `rewards.persona_rm` run:

  - pairwise accuracy, 1[r(x, y+) > r(x, y-)] against the user's observed label (a tie counts as an error, as in
    SynthesizeMe), micro (pooled over pairs) and macro (mean of per-user accuracies), with 95% bootstrap intervals
    that resample USERS (`alignment.stats`), on two splits: seen users on unseen prompts, and unseen users;
  - accuracy against k in `ks`: an unseen user's first k context pairs are the shots (nested: the k = 4 shots
    are the first 4 of the k = 8 ones); methods that read no shots give one number for every k;
  - the Bayes ceiling, when the truth is known (persona world): the expected accuracy of the true preference,
    mean of max(p, 1 - p) with p = sigmoid(beta_u (r_u(y+) - r_u(y-))), on exactly the evaluated pairs;
  - normalized gain = (acc - acc_population) / (ceiling - acc_population) against the `population` method, per k;
  - the paired difference (method - population) with its interval resampling users, at every k;
  - the label-flip rate: flip every context label (swap chosen and rejected in each shot); the share of target
    predictions whose sign flips (P-TTT found ~14% for in-context RMs);
  - NLL of the observed labels under sigmoid(margin) and the expected calibration error over `bins` confidence bins
    (confidence = sigmoid(|margin|), in [0.5, 1]).

Outputs: results.json (every number with its interval), results.md (the tables), accuracy_vs_k.png.
A scorer is anything with `uses_shots: bool` and `margins(requests) -> list[np.ndarray]` (one margin per target
pair, r(chosen) - r(rejected)); `rewards.persona_rm.make_scorer` builds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from alignment.files import atomic_write_text
from alignment.stats import bootstrap_ci, paired_difference_ci

log = logging.getLogger(__name__)

BASELINE = "population"


@dataclass
class RMEvalSettings:
    ks: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])  # shots per unseen user
    k: int = 8  # the k of the headline numbers: normalized gain, label-flip rate, NLL, ECE
    seen_users: int = 50  # seen users evaluated, a seeded sample (0: all); they read all their context pairs
    bins: int = 10  # calibration bins over confidence [0.5, 1]
    n_boot: int = 2000  # bootstrap resamples of users
    seed: int = 0


@dataclass(frozen=True)
class Request:
    """Score `targets` for one user, who labelled `shots` (PreferencePair dicts)."""

    user_id: str
    persona: str
    shots: list[dict]
    targets: list[dict]


class PairScorer(Protocol):
    uses_shots: bool

    def margins(self, requests: list[Request]) -> list[np.ndarray]: ...


# --- metrics: arrays in, numbers out ------------------------------------------------------------------------------
def correct(margins: np.ndarray) -> np.ndarray:
    """(N,) 1.0 where the chosen response scores strictly higher; ties are errors."""
    return (np.asarray(margins) > 0).astype(float)


def accuracy(margins: np.ndarray, users: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Micro (pooled) and macro (per-user mean) accuracy, each with a bootstrap interval over users."""
    hits, users = correct(margins), np.asarray(users)
    ids, inverse = np.unique(users, return_inverse=True)
    per_user = np.bincount(inverse, weights=hits) / np.bincount(inverse)
    return {"micro": bootstrap_ci(hits, users, n_boot=n_boot, seed=seed),
            "macro": bootstrap_ci(per_user, n_boot=n_boot, seed=seed)}


def normalized_gain(acc: float, acc_population: float, ceiling: float) -> float | None:
    """(acc - acc_population) / (ceiling - acc_population): 0 = no better than the population model, 1 = the
    Bayes ceiling. None when the ceiling leaves no headroom."""
    headroom = ceiling - acc_population
    return None if headroom <= 1e-9 else float((acc - acc_population) / headroom)


def flip_rate(margins: np.ndarray, flipped_margins: np.ndarray) -> float:
    """Share of predictions whose sign changes when every context label is flipped (a zero margin has no sign)."""
    a, b = np.sign(margins), np.sign(flipped_margins)
    return float(np.mean((a != b) & (a != 0) & (b != 0)))


def nll(margins: np.ndarray) -> float:
    """Mean -log sigmoid(margin): the negative log-likelihood of the observed labels, in nats."""
    return float(np.mean(np.logaddexp(0.0, -np.asarray(margins, dtype=float))))


def expected_calibration_error(margins: np.ndarray, bins: int = 10) -> float:
    """sum_b (n_b / N) |accuracy_b - confidence_b| over equal-width confidence bins on [0.5, 1], where the model
    predicts the higher-scored response with confidence sigmoid(|margin|)."""
    m = np.asarray(margins, dtype=float)
    confidence = 1.0 / (1.0 + np.exp(-np.abs(m)))
    hit = m > 0
    which = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        rows = which == b
        if rows.any():
            total += rows.sum() / len(m) * abs(hit[rows].mean() - confidence[rows].mean())
    return float(total)


def true_preference(pairs: list[dict], temperatures: list[float]) -> np.ndarray:
    """(N,) P(the user prefers `chosen`) under their true Bradley-Terry model."""
    margin = np.array([p["chosen_reward"] - p["rejected_reward"] for p in pairs])
    return 1.0 / (1.0 + np.exp(-np.asarray(temperatures) * margin))


def bayes_ceiling(p_true: np.ndarray) -> float:
    """Expected accuracy of predicting the truly preferred response: mean max(p, 1 - p)."""
    return float(np.mean(np.maximum(p_true, 1 - p_true)))


# --- the protocol -------------------------------------------------------------------------------------------------
def shot_order(data, user_ids: list[str], seed: int) -> dict[str, list[dict]]:
    """Each user's context pairs in a seeded order: the first k are the k shots, for every k."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in user_ids:
        pool = data.pairs[(u, "context")]
        out[u] = [pool[i] for i in rng.permutation(len(pool))]
    return out


def flipped(pair: dict) -> dict:
    """The pair with its label flipped (chosen and rejected swapped)."""
    return {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"],
            "chosen_reward": pair.get("rejected_reward"), "rejected_reward": pair.get("chosen_reward")}


def _requests(data, users: list[str], shots: dict, k: int | None, flip: bool = False) -> list[Request]:
    out = []
    for u in users:
        chosen = shots[u] if k is None else shots[u][:k]
        out.append(Request(u, data.users[u]["persona"], [flipped(s) for s in chosen] if flip else chosen,
                           data.pairs[(u, "target")]))
    return out


def _flat(requests: list[Request], margins: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    users = np.array([r.user_id for r, m in zip(requests, margins, strict=True) for _ in m])
    return np.concatenate(margins), users


def run_scorer(scorer, data, unseen: list[str], seen: list[str], shots: dict, s: RMEvalSettings) -> dict:
    """Margins of one method: per k on unseen users, with flipped shots at k = s.k, and on seen users."""
    ks = s.ks if scorer.uses_shots else [0]
    out = {"unseen": {}}
    for k in ks:
        out["unseen"][k] = _flat(reqs := _requests(data, unseen, shots, k), scorer.margins(reqs))
    if not scorer.uses_shots:
        out["unseen"] = {k: out["unseen"][0] for k in s.ks}
    elif s.k > 0:
        out["flipped"] = _flat(reqs := _requests(data, unseen, shots, s.k, flip=True), scorer.margins(reqs))
    out["seen"] = _flat(reqs := _requests(data, seen, shots, None), scorer.margins(reqs))
    return out


def summarize(margins: dict, ceilings: dict, s: RMEvalSettings) -> dict:
    """Every metric of every method from their margins (see the module docstring)."""
    results = {}
    base = margins.get(BASELINE)
    for method, m in margins.items():
        row = {"unseen": {}, "seen": None, "vs_population": {}}
        for k, (values, users) in m["unseen"].items():
            row["unseen"][k] = {**accuracy(values, users, s.n_boot, s.seed), "nll": nll(values),
                                "ece": expected_calibration_error(values, s.bins)}
            if base is not None:
                row["vs_population"][k] = paired_difference_ci(correct(values), correct(base["unseen"][k][0]),
                                                               users, n_boot=s.n_boot, seed=s.seed)
        values, users = m["seen"]
        row["seen"] = {**accuracy(values, users, s.n_boot, s.seed), "nll": nll(values),
                       "ece": expected_calibration_error(values, s.bins)}
        if "flipped" in m:
            row["flip_rate"] = flip_rate(m["unseen"][s.k][0], m["flipped"][0])
        if base is not None and ceilings.get("unseen") is not None:
            row["normalized_gain"] = {k: normalized_gain(row["unseen"][k]["micro"]["mean"],
                                                         float(correct(base["unseen"][k][0]).mean()),
                                                         ceilings["unseen"]) for k in row["unseen"]}
        results[method] = row
    return results


def ceilings_of(data, unseen: list[str], seen: list[str]) -> dict:
    """Bayes ceilings on the evaluated target pairs, when every user's BT temperature is known (world data)."""
    out = {}
    for name, users in (("unseen", unseen), ("seen", seen)):
        if not users or any(data.users[u]["temperature"] is None for u in users):
            out[name] = None
            continue
        pairs = [p for u in users for p in data.pairs[(u, "target")]]
        temps = [data.users[u]["temperature"] for u in users for _ in data.pairs[(u, "target")]]
        out[name] = bayes_ceiling(true_preference(pairs, temps))
    return out


def evaluate(scorers: dict, data, s: RMEvalSettings) -> dict:
    """Run every scorer through the protocol; returns the results dict that results.json holds."""
    import time

    unseen = data.user_ids("test")
    seen = data.user_ids("train")
    if s.seen_users and len(seen) > s.seen_users:
        seen = sorted(np.random.default_rng(s.seed).choice(seen, size=s.seen_users, replace=False).tolist())
    if not unseen or not seen:
        raise ValueError(f"{data.source}: need both seen (train) and unseen (test) users with context and target "
                         f"pairs; got {len(seen)} seen and {len(unseen)} unseen")
    shots = shot_order(data, unseen + seen, s.seed)
    margins, seconds = {}, {}
    for method, scorer in scorers.items():
        t0 = time.time()
        margins[method] = run_scorer(scorer, data, unseen, seen, shots, s)
        seconds[method] = time.time() - t0
        log.info("evaluated %s in %.0fs", method, seconds[method])
    ceilings = ceilings_of(data, unseen, seen)
    world = {split: data.stats[key] for split, key in (("unseen", "test_target"), ("seen", "train_target"))
             if key in data.stats}
    return {"source": data.source, "users": {"unseen": len(unseen), "seen": len(seen)},
            "pairs": {"unseen": int(sum(len(data.pairs[(u, 'target')]) for u in unseen)),
                      "seen": int(sum(len(data.pairs[(u, 'target')]) for u in seen))},
            "settings": {"ks": list(s.ks), "k": s.k, "bins": s.bins, "n_boot": s.n_boot, "seed": s.seed},
            "bayes_ceiling": ceilings, "world_statistics": world, "seconds": seconds,
            "methods": summarize(margins, ceilings, s)}


# --- report -------------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci_pct(ci: dict) -> str:
    return f"{100 * ci['mean']:.1f} [{100 * ci['lo']:.1f}, {100 * ci['hi']:.1f}]"


def format_report(results: dict) -> str:
    """Markdown: the regime's statistics, accuracy against k, and the headline metrics at k."""
    ks, k = results["settings"]["ks"], results["settings"]["k"]
    world, ceil = results.get("world_statistics", {}), results["bayes_ceiling"]
    lines = [f"Reward models on {results['source']}: {results['users']['unseen']} unseen users "
             f"({results['pairs']['unseen']} pairs), {results['users']['seen']} seen users "
             f"({results['pairs']['seen']} pairs); accuracy in %, mean [95% CI resampling users]", ""]
    if world:
        lines += [f"World statistics (true features): population-BT ceiling {_pct(world['unseen']['population_bt'])} "
                  f"on unseen users, {_pct(world['seen']['population_bt'])} on seen users; Bayes ceiling "
                  f"{_pct(world['unseen']['bayes_ceiling'])} / {_pct(world['seen']['bayes_ceiling'])}", ""]
    lines += [f"Bayes ceiling on the evaluated pairs: unseen {_pct(ceil['unseen'])}, seen {_pct(ceil['seen'])}", "",
              "| method | " + " | ".join(f"k={x}" for x in ks) + " | seen users |",
              "|---|" + "---|" * (len(ks) + 1)]
    methods = results["methods"]
    for name, row in methods.items():
        cells = [_ci_pct(row["unseen"][x]["micro"]) for x in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_ci_pct(row['seen']['micro'])} |")
    lines += ["", f"Unseen users at k={k} (gain = (acc - population) / (ceiling - population); flip = share of "
                  "predictions that flip when every context label is flipped; min Δ lo = the lowest lower bound of "
                  "(method - population) over all k, in points)", "",
              "| method | micro | macro | gain | flip | NLL | ECE | Δ vs population | min Δ lo |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, row in methods.items():
        at = row["unseen"][k]
        gain = row.get("normalized_gain", {}).get(k)
        delta = row["vs_population"].get(k)
        low = min((d["lo"] for d in row["vs_population"].values()), default=None)
        lines.append(f"| {name} | {_ci_pct(at['micro'])} | {_ci_pct(at['macro'])} | "
                     f"{'n/a' if gain is None else f'{gain:.2f}'} | {_pct(row.get('flip_rate'))} | {at['nll']:.3f} | "
                     f"{at['ece']:.3f} | {'n/a' if delta is None else _ci_pct(delta)} | {_pct(low)} |")
    return "\n".join(lines)


def plot_accuracy_vs_k(results: dict, path: Path, title: str | None = None) -> Path:
    """Unseen-user micro accuracy against k per method, 95% bands; the Bayes ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["settings"]["ks"]
    x = np.arange(len(ks))  # evenly spaced: k = 0 has no place on a log axis
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, row in results["methods"].items():
        cis = [row["unseen"][k]["micro"] for k in ks]
        ax.plot(x, [100 * c["mean"] for c in cis], marker="o", label=name)
        ax.fill_between(x, [100 * c["lo"] for c in cis], [100 * c["hi"] for c in cis], alpha=0.15)
    if results["bayes_ceiling"].get("unseen") is not None:
        ax.axhline(100 * results["bayes_ceiling"]["unseen"], color="black", linestyle="--", label="Bayes ceiling")
    ax.set_xticks(x, [str(k) for k in ks])
    ax.set_xlabel("k (labelled pairs of the user)")
    ax.set_ylabel("pairwise accuracy, unseen users (%)")
    ax.set_title(title or Path(results["source"]).name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: Path) -> str:
    """results.md and accuracy_vs_k.png in `out_dir`; returns the Markdown (results.json is `run.finish`'s)."""
    text = format_report(results)
    atomic_write_text(Path(out_dir) / "results.md", text + "\n")
    title = f"{Path(out_dir).name} on {Path(results['source']).name}"
    plot_accuracy_vs_k(results, Path(out_dir) / "accuracy_vs_k.png", title)
    return text
