"""FSPO evaluation on held-out users: win rate against the base policy under each user's true reward.

    python -m alignment.fspo config=fspo.yaml                           # trains, then ends with this evaluation
    python -m alignment.eval_fspo fspo=runs/fspo-<...>                   # re-evaluate a finished FSPO run

Rows (the comparisons of the FSPO paper, research/apc_fspo.md §2.6, on the persona world's test users):

    base                 the starting (SFT) policy, no user context: the reference every row is compared with
    few-shot prompting   the base policy with the user's k shots in its prompt, no training
    few-shot Pref-FT     FSPO's stage 1 alone (NLL of chosen responses given shots; when trained with one)
    population           DPO/IPO on the same training targets without user context (FSPO with k = 0)
    FSPO                 the trained policy with the user's k shots
    oracle persona       the base policy with the user's stated preferences in its system turn (the world's SFT
                         corpus has such turns, so this is the policy's best use of a known user)

For each test user, prompts come from the user's target pairs (test queries: unseen prompts, unseen users) and
shots from the user's context pairs (labelled by that user, on train queries), in one seeded order per user, so
the shots at k are a prefix of the shots at k + 1. Every row samples with the same temperature, length and seed.
A row wins a prompt when the user's true reward (`people.true_reward`; invalid text scores below any valid one)
of its sample is above the base sample's; ties count half. Intervals are 95% bootstrap intervals resampling users;
differences between rows are paired (same users, prompts and base samples). The win rate of FSPO as a function of
the test-time k (`k_curve`) includes k beyond the largest k of training. Beside it, `reader_ceiling`: the win rate
of an ideal reader of the same k shots (E[w | shots] under the train users' weights, then the best style; no
policy), what the shots make possible, so a flat FSPO curve reads as a policy that ignores its shots, not as
shots with nothing in them. Output in the run directory:
results.json (`eval`), results.md (the table), win_rate_vs_k.png, samples.jsonl.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignment import language as lang
from alignment.files import atomic_write_text
from alignment.oracle import facts_of, void_note
from alignment.people import stated_preferences, true_reward
from alignment.sampling import sample_responses_by_length, with_system_suffix
from alignment.shots import FORMATS, fit_prompt, world_users
from alignment.stats import bootstrap_ci, excludes_zero, format_ci, paired_difference_ci
from alignment.world import pair_features

log = logging.getLogger(__name__)

ROWS = ("base", "few-shot prompting", "few-shot Pref-FT", "population", "FSPO", "oracle persona")
DIFFERENCES = (("FSPO", "few-shot prompting"), ("FSPO", "population"), ("FSPO", "few-shot Pref-FT"),
               ("FSPO", "oracle persona"))


@dataclass
class EvalSettings:
    users: int = 100  # held-out (test) users; all of them when fewer
    prompts_per_user: int = 8  # test-query prompts per user, from the user's target pairs
    k: int | None = None  # shots for the few-shot prompting and FSPO rows; None: the training k_max
    k_curve: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 12, 16])  # test-time k of the curve
    temperature: float = 1.0
    max_new_tokens: int = 128  # world responses take <= 71 tokens, a description + response <= ~120
    max_length: int = 1408  # prompt + new tokens at test time; 16 world shots need ~1,250


# --- ground truth -----------------------------------------------------------------------------------------------
def true_reward_fn(world: dict):
    """reward(user_id, prompt_id, text) -> the user's true reward of `text` as a reply to that world prompt."""
    weights = {u["user_id"]: np.asarray(u["weights"]) for u in world["users"]}
    queries = {q["query_id"]: q for q in world["queries"]}
    facts = {c["character_id"]: facts_of(c) for c in world["characters"]}
    quality = world["stats"]["population"]["quality"]

    def reward(user_id: str, prompt_id: str, text: str) -> float:
        q = queries[prompt_id]
        return true_reward(weights[user_id], quality, facts[q["character_id"]], q["slot"], text)
    return reward


def win_rates(rewards: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(N,) 1 where rewards > base, 0.5 on ties, 0 below."""
    return (rewards > base) + 0.5 * (rewards == base)


# --- what the shots allow ----------------------------------------------------------------------------------------
def attribute_space() -> np.ndarray:
    """(S, K) every attribute vector a world response can realize (greeting and closing share one register)."""
    import itertools

    flags = itertools.product((False, True), repeat=5)
    styles = [lang.Style(greeting=g, closing=c, elaborations=e, empathy=m, technical=t, joke=h, structure=s,
                         exclaim=x)
              for m, t, h, s, x in flags for g, c in itertools.product((-1, 0, 1), repeat=2) if g * c >= 0
              for e in range(len(lang.ELABORATIONS) + 1)]
    return np.unique(np.array([lang.attribute_vector(style) for style in styles]), axis=0)


def posterior_mean(prior: np.ndarray, diffs: np.ndarray, beta: float, offsets: np.ndarray | None = None) -> np.ndarray:
    """E[w | shots] over prior samples `prior` (S, K): a shot whose responses differ by d = a(chosen) - a(rejected)
    in attributes and by o in the reward every user shares (quality) has likelihood sigmoid(beta (w . d + o)), the
    world's Bradley-Terry label."""
    if len(diffs) == 0:
        return prior.mean(0)
    margins = prior @ np.asarray(diffs).T + (0.0 if offsets is None else np.asarray(offsets))  # (S, k)
    loglik = -np.logaddexp(0.0, -beta * margins).sum(1)  # (S,)
    weights = np.exp(loglik - loglik.max())
    return weights @ prior / weights.sum()


def reader_ceiling(world: dict, cases, base_rewards: np.ndarray, ks: list[int], seed: int,
                   samples: int = 4000, jitter: float = 0.3) -> dict[int, np.ndarray]:
    """k -> (N,) wins against the base samples of an ideal reader of the same first k shots, per (user, target) in
    `cases` order: it knows the world's reward family and its train users' weights (the prior FSPO must learn from
    its training users; samples of them plus N(0, jitter^2) noise), takes E[w | shots] at the population's median
    rationality, and answers the asked fact in the style that maximizes that estimate. What the shots make
    possible; at k = 0 it is the best style for the population."""
    from dataclasses import asdict

    rng = np.random.default_rng(seed)
    train = np.array([u["weights"] for u in world["users"] if u["split"] == "train"])
    prior = train[rng.integers(len(train), size=samples)] + jitter * rng.standard_normal((samples, train.shape[1]))
    weights = {u["user_id"]: np.asarray(u["weights"]) for u in world["users"]}
    queries = {q["query_id"]: q for q in world["queries"]}
    facts = {c["character_id"]: facts_of(c) for c in world["characters"]}
    beta, quality = world["stats"]["population"]["temperature"], world["stats"]["population"]["quality"]
    space = attribute_space()
    wins: dict[int, list] = {k: [] for k in ks}
    i = 0
    for user, shots, targets in cases:
        x = pair_features([asdict(s) for s in shots[:max(ks)]], queries, facts).reshape(-1, lang.K + 1)
        base = base_rewards[i:i + len(targets)]
        i += len(targets)
        for k in ks:
            best = space[np.argmax(space @ posterior_mean(prior, x[:k, :-1], beta, quality * x[:k, -1]))]
            wins[k].append(win_rates(np.full(len(targets), weights[user] @ best + quality), base))
    return {k: np.concatenate(w) for k, w in wins.items()}


# --- prompts ----------------------------------------------------------------------------------------------------
def test_cases(world: dict, settings: EvalSettings, seed: int) -> list[tuple[str, list, list]]:
    """(user_id, shots in a fixed seeded order, target pairs) for up to `settings.users` test users."""
    users = world_users(world)
    rng = np.random.default_rng(seed)
    names = sorted(users.shots["test"])
    names = [names[i] for i in sorted(rng.permutation(len(names))[:settings.users])]
    cases = []
    for user in names:
        shots, targets = users.shots["test"][user], users.targets["test"][user]
        cases.append((user, [shots[i] for i in rng.permutation(len(shots))],
                      [targets[i] for i in rng.permutation(len(targets))[:settings.prompts_per_user]]))
    return cases


def few_shot_prompts(tokenizer, fmt, cases, k: int, budget: int, describe: bool) -> tuple[list[list[dict]], float]:
    """One few-shot prompt per (user, target), the user's first k shots, whole shots dropped to fit `budget`
    tokens; returns the prompts and the mean number of shots they kept."""
    prompts, kept = [], []
    for _, shots, targets in cases:
        for t in targets:
            fitted = fit_prompt(tokenizer, fmt, shots[:k], t.prompt, describe, budget)
            n = fitted[1] if fitted else 0
            prompts.append(fmt.prompt(shots[:n], t.prompt, describe))
            kept.append(n)
    return prompts, float(np.mean(kept))


# --- evaluation -------------------------------------------------------------------------------------------------
def sample_row(model, tokenizer, prompts, settings: EvalSettings, seed: int) -> list[str]:
    """One completion per prompt, with the same sampling settings and seed for every row."""
    return [r[0] for r in sample_responses_by_length(model, tokenizer, prompts, temperature=settings.temperature,
                                           max_new_tokens=settings.max_new_tokens, seed=seed)]


def description_agreement(descriptions: list[str], personas: list[str]) -> float:
    """Share of the K attributes on which a written description states what the user's own persona states
    (like / dislike / nothing), averaged over completions."""
    return float(np.mean([np.mean(stated_preferences(d) == stated_preferences(p))
                          for d, p in zip(descriptions, personas, strict=True)]))


def evaluate_world(cfg, world: dict, tokenizer, base, trained, population, out_dir: Path, pref_ft=None) -> dict:
    """Every row and the k curve on the world's test users; writes results.md, the plot and samples.jsonl.

    `cfg` is the FSPOConfig of the trained policy (format, describe, k_max, seed, eval settings); `pref_ft` the
    stage-1 policy, if there was a stage 1."""
    settings, fmt, seed = cfg.eval, FORMATS[cfg.format], cfg.seed
    k = cfg.k_max if settings.k is None else settings.k
    budget = settings.max_length - settings.max_new_tokens
    cases = test_cases(world, settings, seed)
    reward = true_reward_fn(world)
    keys = [(user, t.prompt_id) for user, _, targets in cases for t in targets]
    plain = [t.prompt for _, _, targets in cases for t in targets]
    personas = {u["user_id"]: u["persona"] for u in world["users"]}

    shots_k, _ = few_shot_prompts(tokenizer, fmt, cases, k, budget, False)
    texts = {"base": sample_row(base, tokenizer, plain, settings, seed),
             "few-shot prompting": sample_row(base, tokenizer, shots_k, settings, seed),
             "population": sample_row(population, tokenizer, plain, settings, seed)}
    if pref_ft is not None:  # with describe, stage 1 learned to write the description too
        rows = sample_row(pref_ft, tokenizer, shots_k, settings, seed)
        texts["few-shot Pref-FT"] = [fmt.split(t)[1] for t in rows] if cfg.describe else rows
    texts["oracle persona"] = sample_row(base, tokenizer, [with_system_suffix(p, personas[u]) for p, (u, _) in
                                                           zip(plain, keys, strict=True)], settings, seed)
    curve, mean_shots = {}, {}
    for kk in sorted(set(settings.k_curve) | {k}):
        prompts, mean_shots[kk] = few_shot_prompts(tokenizer, fmt, cases, kk, budget, cfg.describe)
        curve[kk] = sample_row(trained, tokenizer, prompts, settings, seed)
    descriptions = [fmt.split(t)[0] for t in curve[k]] if cfg.describe else None
    if cfg.describe:  # score the response after the description
        curve = {kk: [fmt.split(t)[1] for t in rows] for kk, rows in curve.items()}
    texts["FSPO"] = curve[k]

    score = lambda rows: np.array([reward(u, p, t) for (u, p), t in zip(keys, rows, strict=True)])
    rewards = {name: score(rows) for name, rows in texts.items()}
    groups = [u for u, _ in keys]
    win = {name: win_rates(r, rewards["base"]) for name, r in rewards.items()}
    curve_win = {kk: win_rates(score(rows), rewards["base"]) for kk, rows in curve.items()}
    ci = lambda values: bootstrap_ci(values, groups, seed=seed)
    results = {
        "users": len(cases), "prompts": len(keys), "k": k, "k_max_trained": cfg.k_max,
        "rows": {name: {"win_rate": ci(win[name]), "reward": ci(rewards[name]),
                        "valid": float(np.mean(rewards[name] > -10.0))} for name in ROWS if name in texts},
        "differences": {f"{a} - {b}": paired_difference_ci(win[a], win[b], groups, seed=seed)
                        for a, b in DIFFERENCES if b in texts},
        "k_curve": {str(kk): {"win_rate": ci(w), "mean_shots": mean_shots[kk]} for kk, w in curve_win.items()},
    }
    seen = [kk for kk in sorted(curve_win) if kk <= cfg.k_max]
    results["k_steps"] = {f"{b} - {a}": paired_difference_ci(curve_win[b], curve_win[a], groups, seed=seed)
                          for a, b in zip(seen, seen[1:], strict=False)}
    ceiling = reader_ceiling(world, cases, rewards["base"], sorted(curve_win), seed)
    results["reader_ceiling"] = {str(kk): ci(w) for kk, w in ceiling.items()}
    if descriptions is not None:
        results["description_agreement"] = description_agreement(descriptions, [personas[u] for u, _ in keys])
    results["checks"] = checks(results)
    results["rows"]["base"]["win_rate"]["note"] = "the reference: 0.5 by definition"
    note = void_note({name: row["valid"] for name, row in results["rows"].items()}, "the FSPO evaluation")
    if note:
        log.warning(note)
        results["void"] = note
    write_samples(out_dir / "samples.jsonl", keys, texts, rewards)
    table = format_table(results)
    atomic_write_text(out_dir / "results.md", table + "\n")
    plot_k_curve(results, out_dir / "win_rate_vs_k.png")
    print(table)
    return results


def checks(results: dict) -> dict:
    """The issue's bars on these numbers: FSPO wins >= 75% against base; its paired differences with few-shot
    prompting and population exclude 0 (above); no significant fall between consecutive k up to the largest
    k of training (every paired interval's upper end >= 0)."""
    d = results["differences"]
    return {"fspo_win_rate_at_least_0.75": results["rows"]["FSPO"]["win_rate"]["mean"] >= 0.75,
            "beats_few_shot_prompting": d["FSPO - few-shot prompting"]["lo"] > 0,
            "beats_population": d["FSPO - population"]["lo"] > 0,
            "no_fall_with_k_up_to_k_max": all(step["hi"] >= 0 for step in results["k_steps"].values())}


def write_samples(path: Path, keys, texts: dict, rewards: dict) -> None:
    with open(path, "w") as f:
        for i, (user, prompt_id) in enumerate(keys):
            f.write(json.dumps({"user_id": user, "prompt_id": prompt_id,
                                **{n: {"text": texts[n][i], "reward": float(rewards[n][i])} for n in texts}}) + "\n")


def format_table(results: dict) -> str:
    """Markdown: win rate vs base [95% CI over users], mean true reward and valid share per row; the paired
    differences; the k curve."""
    lines = ([f"**{results['void']}**", ""] if results.get("void") else []) + [
             f"Held-out users: {results['users']} users x {results['prompts'] // max(results['users'], 1)} unseen "
             f"prompts, k = {results['k']} shots (training k <= {results['k_max_trained']}); "
             "mean [95% bootstrap CI over users]", "",
             "| row | win rate vs base | true reward | valid |", "|---|---|---|---|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {format_ci(row['win_rate'])} | {format_ci(row['reward'])} | {row['valid']:.1%} |")
    lines += ["", "| paired difference of win rates | mean [95% CI] | excludes 0 |", "|---|---|---|"]
    for name, ci in results["differences"].items():
        lines.append(f"| {name} | {format_ci(ci)} | {'yes' if excludes_zero(ci) else 'no'} |")
    lines += ["", "| test-time k | FSPO win rate vs base | shots kept (mean) | Bayes reader of the k shots |",
              "|---|---|---|---|"]
    for kk, row in results["k_curve"].items():
        seen = "" if int(kk) <= results["k_max_trained"] else " (unseen in training)"
        reader = format_ci(results["reader_ceiling"][kk]) if "reader_ceiling" in results else "-"
        lines.append(f"| {kk}{seen} | {format_ci(row['win_rate'])} | {row['mean_shots']:.2f} | {reader} |")
    lines += ["", "| k step (paired, up to the largest training k) | win-rate change [95% CI] |", "|---|---|"]
    lines += [f"| {name} | {format_ci(ci)} |" for name, ci in results["k_steps"].items()]
    if "description_agreement" in results:
        lines += ["", f"User descriptions written by FSPO agree with the user's persona on "
                      f"{results['description_agreement']:.1%} of attributes."]
    lines += ["", "Checks: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in results["checks"].items())]
    return "\n".join(lines)


def plot_k_curve(results: dict, path: Path) -> None:
    """Win rate against the base vs test-time k (FSPO, with 95% intervals), the other rows as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in results["k_curve"]]
    rows = [results["k_curve"][str(k)]["win_rate"] for k in ks]
    mean = np.array([r["mean"] for r in rows])
    err = np.array([[r["mean"] - r["lo"] for r in rows], [r["hi"] - r["mean"] for r in rows]])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(ks, mean, yerr=err, marker="o", capsize=3, label="FSPO")
    if "reader_ceiling" in results:
        ax.plot(ks, [results["reader_ceiling"][str(k)]["mean"] for k in ks], marker=".", color="green",
                linestyle=":", label="Bayes reader of the shots")
    for name, style in (("few-shot prompting", ":"), ("population", "--"), ("oracle persona", "-.")):
        ax.axhline(results["rows"][name]["win_rate"]["mean"], linestyle=style, color="gray", label=name)
    ax.axhline(0.5, color="black", linewidth=0.8, label="base")
    ax.axvline(results["k_max_trained"], color="red", linewidth=0.8, alpha=0.5, label="largest k in training")
    ax.set(xlabel="shots at test time (k)", ylabel="win rate vs base (true user reward)", ylim=(0.3, 1.0),
           title=f"Held-out users ({results['users']}), 95% CI over users")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
