"""Decoding-time personalization of a frozen policy: PAD, Drift, GenARM and ARGS against the base and against
preference prompting, measured by the persona world's true user rewards on held-out users.

    python -m decoding.generate config=pad.yaml        # 17 s on a 2-core CPU once world, SFT policy, guides are cached
    python -m decoding.generate config=drift.yaml      # + Drift's weight recovery at 10/25/50/100 pairs
    python -m decoding.generate config=genarm.yaml genarm.alpha=2
    python -m decoding.generate config=args.yaml split=val
    python -m decoding.generate config=real/generate.yaml   # SmolLM2-135M-Instruct, no world artifact, ~2 min

Every arm decodes the same prompts with the same temperature, length and per-row seeds (`generate`, one batched
KV-cached loop for every arm; sampling inverts the CDF at one uniform per row and step, a pure function of the
row's seed and step, so a row's noise does not depend on its batch and the arms share their random numbers):

    base        the SFT policy, prompt = RAG statements + query (no preferences)
    prompting   the SFT policy with the user's stated preferences written into the system turn (as the SFT data do)
    <method>    the SFT policy (prompt per `<method>.base_prompt`) guided per token by the method's rule
                (decoding/processors.py); the guides are trained by `python -m rewards.train config=guides.yaml`
                (rewards/guides.py) on train users only, so held-out users, and among them preference
                combinations no train user has, are unseen

Users: `split` (test by default: user-disjoint from the guides' training users) and prompts from the held-out
queries (prompt-disjoint). Each sample gets the user's true reward r_u(x, y) (`people.true_reward`; text that is
not a valid sentence scores INVALID_REWARD). results.json / results.md: per arm, mean true reward and win rate
against the base (ties count half), with 95% bootstrap intervals over users, for all users and for users whose
combination of stated preferences no train user has. Drift also reports the centred cosine between fitted and
true weights at `drift.pair_counts` pairs (decoding/drift.py).

A policy that is not a world model (another vocabulary, e.g. `policy=smollm2-135m-instruct`) gets no world guides
(they are trained from the world SFT policy): one start-up line names what is world-bound and skipped (arms
needing guides, the true-reward evaluation, which is void) and the rest runs: base, prompting, self-guided PAD
(`pad.guide=base`, `pad.base_prompt=plain`: PAD's zero-training case) and zero-shot Drift (`drift.guide=base`,
`drift.prompts=<attribute prompts JSON>`). results.md then carries the void note and every arm's cost per
generated token against plain decoding (`cost` in results.json, for world runs too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from alignment.models import stop_ids
from alignment.world import WorldSpec
from decoding.loop import encode_prompts, generate
from rewards.guides import GuidesConfig

log = logging.getLogger(__name__)


# --- config ---------------------------------------------------------------------------------------------------------
BasePrompt = Literal["plain", "preference"]


@dataclass
class PADSettings:
    w: float = 1.0  # interpolation weight: 0 = base, 1 = the guide's argmax inside the base top-k
    top_k: int = 10  # support: the base's top-k tokens
    base_prompt: BasePrompt = "preference"  # what the base reads in this arm (PAD's code: the preference prompt)
    guide: Literal["pad", "base"] = "pad"  # the personalized model; base: self-guided (needs base_prompt plain)


@dataclass
class DriftSettings:
    beta: float = 1.0  # strength 1 / beta of the attribute drift
    pairs: int = 100  # labelled pairs per user the decoding weights are fitted from
    fit: Literal["closed_form", "sparse"] = "closed_form"
    sparsity: float = 0.25  # sparse fit: soft threshold as a share of the largest |mean Delta|
    pair_counts: list[int] = field(default_factory=lambda: [10, 25, 50, 100])  # weight recovery table
    guide: Literal["pad", "base"] = "pad"  # the small LM under the attribute prompts (base: zero-shot Drift)
    prompts: str | None = None  # attribute prompts JSON (e.g. real/drift_attributes.json); default: the guides'
    base_prompt: BasePrompt = "plain"  # Drift reads implicit preferences (pairs), not stated ones


@dataclass
class GenARMSettings:
    alpha: float = 1.0  # weight of the autoregressive RM's log-probs (1 / beta of the paper)
    base_prompt: BasePrompt = "preference"


@dataclass
class ARGSSettings:
    w: float = 1.0  # weight of the sequence reward of each candidate
    top_k: int = 10
    base_prompt: BasePrompt = "preference"


@dataclass
class DecodeConfig:
    method: Literal["pad", "drift", "genarm", "args"] = "pad"
    arms: list[str] = field(default_factory=list)  # more guided methods decoded beside `method` (e.g. [drift])
    seed: int = 0
    name: str | None = None  # run name; default decode-<method>-<timestamp>
    runs_dir: str = "runs"
    world: WorldSpec = field(default_factory=WorldSpec)
    guides: GuidesConfig = field(default_factory=GuidesConfig)  # trained (and cached) when `guides_dir` is unset
    guides_dir: str | None = None  # a finished `rewards.train kind=guides` run directory
    policy: str | None = None  # HF directory of the base policy; default: the cached SFT policy of guides.sft
    split: Literal["val", "test"] = "test"  # held-out users to decode for (tune on val, report on test)
    users: int = 100  # users of the split (0 = all)
    prompts_per_user: int = 4  # held-out queries per user
    temperature: float = 0.0  # 0 = greedy, the setting of PAD's and ARGS's released configs
    top_p: float = 1.0  # nucleus of each sampled step (1 = every token; a pretrained chat model wants ~0.9)
    max_new_tokens: int = 80  # the longest world response is ~60 tokens
    batch_size: int = 64
    pad: PADSettings = field(default_factory=PADSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    genarm: GenARMSettings = field(default_factory=GenARMSettings)
    args: ARGSSettings = field(default_factory=ARGSSettings)


# --- prompts and users ----------------------------------------------------------------------------------------------
def signature(persona: str) -> tuple:
    """The combination of stated preferences in a persona text, as a hashable (K,) sign tuple."""
    from alignment import people

    return tuple(people.stated_preferences(persona).astype(int).tolist())


def decoding_rows(world: dict, cfg: DecodeConfig) -> list[dict]:
    """One row per (user, held-out query): user, messages (plain and preference-prompted), facts, seed."""
    from alignment.oracle import eval_prompts, facts_of
    from alignment.sampling import with_system_suffix

    users = [u for u in world["users"] if u["split"] == cfg.split]
    users = users[:cfg.users] if cfg.users else users
    seen = {signature(u["persona"]) for u in world["users"] if u["split"] == "train"}
    rows = []
    for i, u in enumerate(users):
        for q, c, messages in eval_prompts(world, cfg.prompts_per_user, cfg.seed * 100_003 + i):
            rows.append({"user": u, "query": q, "facts": facts_of(c), "plain": messages,
                         "preference": with_system_suffix(messages, u["persona"]),
                         "unseen_combination": signature(u["persona"]) not in seen,
                         "seed": cfg.seed * 7919 + len(rows)})
    return rows


# --- the methods: a rule for a batch of rows ------------------------------------------------------------------------
@dataclass
class Decoders:
    """Everything the rule builders read: tokenizer, models, settings, Drift's fitted weights per user."""

    cfg: DecodeConfig
    tokenizer: object
    base: object
    guides: dict  # name -> model: pad, arm, rm
    drift_prompts: list[str]  # neutral first, then one per attribute
    drift_weights: dict  # user_id -> (m,) np.ndarray
    drift_attributes: list[str] = field(default_factory=list)  # the names of drift_prompts[1:]


def build_pad(d: Decoders, rows: list[dict]):
    from decoding.guides import Guide
    from decoding.processors import pad_rule

    guide = Guide(d.guides[d.cfg.pad.guide], *encode_prompts(d.tokenizer, [r["preference"] for r in rows]))
    return pad_rule(guide, d.cfg.pad.w, d.cfg.pad.top_k)


def build_genarm(d: Decoders, rows: list[dict]):
    from decoding.guides import Guide
    from decoding.processors import genarm_rule

    return genarm_rule(Guide(d.guides["arm"], *encode_prompts(d.tokenizer, [r["preference"] for r in rows])),
                       d.cfg.genarm.alpha)


def build_drift(d: Decoders, rows: list[dict]):
    from alignment.sampling import with_system_suffix
    from decoding.guides import Guide
    from decoding.processors import drift_rows, drift_rule

    weights = torch.tensor(np.stack([d.drift_weights[r["user"]["user_id"]] for r in rows]), dtype=torch.float32)
    active = weights != 0  # the sparse fit zeroes attributes: their guide rows are never built
    contexts = [with_system_suffix(rows[b]["plain"], d.drift_prompts[i]) for b, i in drift_rows(active)]
    guide = Guide(d.guides[d.cfg.drift.guide], *encode_prompts(d.tokenizer, contexts))
    return drift_rule(guide, weights, d.cfg.drift.beta, active)


def build_args(d: Decoders, rows: list[dict]):
    from decoding.guides import CachedSequenceReward
    from decoding.processors import args_rule

    reward = CachedSequenceReward(d.guides["rm"], *encode_prompts(d.tokenizer, [r["preference"] for r in rows]))
    return args_rule(reward, d.cfg.args.w, d.cfg.args.top_k, batch=len(rows))


METHODS = {"pad": build_pad, "drift": build_drift, "genarm": build_genarm, "args": build_args}


def decode_arm(d: Decoders, rows: list[dict], prompt: BasePrompt, method: str | None) -> tuple[list[str], int]:
    """Responses of one arm for every row, in batches of cfg.batch_size, and the tokens generated (stop included)."""
    cfg, tok, texts, tokens = d.cfg, d.tokenizer, [], 0
    eos = stop_ids(d.base, tok)
    for s in range(0, len(rows), cfg.batch_size):
        chunk = rows[s:s + cfg.batch_size]
        ids, mask = encode_prompts(tok, [r[prompt] for r in chunk], d.base.device)
        rule = METHODS[method](d, chunk) if method else None
        top_p = torch.full((len(chunk),), cfg.top_p) if cfg.top_p < 1 else None
        new = generate(d.base, ids, mask, rule, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                       pad_token_id=tok.pad_token_id, temperature=cfg.temperature, seeds=[r["seed"] for r in chunk],
                       top_p=top_p)
        stop = torch.isin(new, torch.tensor(eos, device=new.device)).int()
        tokens += int(((stop.cumsum(1) - stop) == 0).sum())  # positions up to each row's first stop token
        texts += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return texts, tokens


# --- Drift: a labelled questionnaire, features, fitted weights ----------------------------------------------------
def questionnaire(world: dict, spec: WorldSpec, n: int, seed: int) -> list[dict]:
    """n response pairs on train queries (two world responses, style_p 0.5, as in the world's own pairs), unlabelled.

    Every user labels the same n pairs (a calibration questionnaire): the attribute rewards of a pair do not depend
    on who labels it, so they are computed once, not once per user.
    """
    from alignment.world import rag_statements, sample_response

    rng = np.random.default_rng(seed)
    chars = {c["character_id"]: c for c in world["characters"]}
    queries = [q for q in world["queries"] if q["split"] == "train"]
    out = []
    for j in rng.choice(len(queries), size=n, replace=len(queries) < n):
        q, c = queries[j], chars[queries[j]["character_id"]]
        facts = [(s["slot"], s["value"]) for s in c["statements"]]
        a = b = sample_response(rng, facts, q["slot"], spec, style_p=0.5)
        while b == a:
            b = sample_response(rng, facts, q["slot"], spec, style_p=0.5)
        system = rag_statements(rng, c["statements"], q["slot"], spec.rag_k)
        out.append({"prompt": [{"role": "system", "content": system}, {"role": "user", "content": q["text"]}],
                    "chosen": a, "rejected": b, "facts": facts, "slot": q["slot"]})
    return out


def label(pairs: list[dict], user: dict, quality: float, seed: int) -> np.ndarray:
    """(n,) +1 where the user prefers the first response, -1 otherwise: Bradley-Terry on the true rewards."""
    from alignment import people

    rng, w = np.random.default_rng(seed), np.asarray(user["weights"])
    r = np.array([[people.true_reward(w, quality, p["facts"], p["slot"], p[k]) for k in ("chosen", "rejected")]
                  for p in pairs])
    return np.where(rng.random(len(pairs)) < people.bt_probability(user["temperature"], r[:, 0], r[:, 1]), 1.0, -1.0)


def fit_drift(d: Decoders, world: dict, rows: list[dict], recovery: bool = True) -> dict:
    """Fit every decoded user's weights from its labels of cfg.drift.pairs questionnaire pairs; with `recovery`
    (the attributes are the world's own), the weight-recovery table at cfg.drift.pair_counts pairs (nested
    prefixes of one questionnaire)."""
    from alignment.stats import bootstrap_ci
    from decoding.drift import attribute_rewards, fit_weights, weight_recovery

    cfg, quality = d.cfg.drift, world["stats"]["population"]["quality"]
    users = list({r["user"]["user_id"]: r["user"] for r in rows}.values())
    pairs = questionnaire(world, d.cfg.world, max([cfg.pairs, *cfg.pair_counts]), d.cfg.seed)
    first, second = attribute_rewards(d.guides[cfg.guide], d.tokenizer, pairs, d.drift_prompts)  # (n, m) each
    deltas = [label(pairs, u, quality, d.cfg.seed * 1_000_003 + i)[:, None] * (first - second)
              for i, u in enumerate(users)]  # chosen minus rejected, per user
    for u, delta in zip(users, deltas, strict=True):
        d.drift_weights[u["user_id"]] = fit_weights(delta[:cfg.pairs], cfg.fit, cfg.sparsity)
    if not recovery:  # other attributes than the world's: no true weights to recover
        fitted = np.stack([d.drift_weights[u["user_id"]] for u in users])
        return {"users": len(users), "pairs": cfg.pairs, "cosine": {},
                "mean_weights": dict(zip(d.drift_attributes, fitted.mean(0).round(3).tolist(), strict=True))}
    true = np.array([u["weights"] for u in users])
    table = {method: {str(n): bootstrap_ci(c) for n, c in weight_recovery(deltas, true, cfg.pair_counts, method,
                                                                         cfg.sparsity).items()}
             for method in ("closed_form", "sparse")}
    return {"users": len(users), "pairs": len(pairs), "cosine": table}


# --- scoring and the table ------------------------------------------------------------------------------------------
def true_rewards(rows: list[dict], texts: list[str], quality: float) -> np.ndarray:
    from alignment import people

    return np.array([people.true_reward(np.asarray(r["user"]["weights"]), quality, r["facts"], r["query"]["slot"], t)
                     for r, t in zip(rows, texts, strict=True)])


def arm_summary(rewards: np.ndarray, base: np.ndarray, groups: np.ndarray) -> dict:
    """Mean true reward and win rate against the base (ties half), 95% bootstrap intervals over users."""
    from alignment import people
    from alignment.stats import bootstrap_ci, paired_difference_ci

    wins = (rewards > base) + 0.5 * (rewards == base)
    return {"reward": bootstrap_ci(rewards, groups), "win_rate": bootstrap_ci(wins, groups),
            "gain": paired_difference_ci(rewards, base, groups),
            "valid": float(np.mean(rewards > people.INVALID_REWARD)),
            "prompts": len(rewards)}


def summarize(rows: list[dict], rewards: dict[str, np.ndarray]) -> dict:
    groups = np.array([r["user"]["user_id"] for r in rows])
    unseen = np.array([r["unseen_combination"] for r in rows])
    out = {"all": {arm: arm_summary(v, rewards["base"], groups) for arm, v in rewards.items()}}
    if unseen.any():
        out["unseen_combinations"] = {arm: arm_summary(v[unseen], rewards["base"][unseen], groups[unseen])
                                      for arm, v in rewards.items()}
    return out


def results_markdown(cfg: DecodeConfig, table: dict, drift: dict | None) -> str:
    from alignment.stats import format_ci

    lines = [f"# {cfg.method} vs base and preference prompting ({cfg.split} users, T={cfg.temperature})", ""]
    for subset, arms in table.items():
        users = arms["base"]["reward"]["n"]
        lines += [f"## {subset.replace('_', ' ')} ({users} users, {arms['base']['prompts']} prompts)", "",
                  "| arm | true reward | win rate vs base | gain vs base | valid |", "|---|---|---|---|---|"]
        lines += [f"| {arm} | {format_ci(s['reward'])} | {format_ci(s['win_rate'])} | {format_ci(s['gain'])} | "
                  f"{s['valid']:.1%} |" for arm, s in arms.items()]
        lines.append("")
    if drift and drift["cosine"]:
        counts = list(next(iter(drift["cosine"].values())))
        lines += [f"## Drift weight recovery ({drift['users']} users): centred cosine, fitted vs true", "",
                  "| fit | " + " | ".join(f"{n} pairs" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(format_ci(t[n]) for n in counts) + " |" for m, t in drift["cosine"].items()]
    return "\n".join(lines) + "\n"


def void_markdown(cfg: DecodeConfig, arms: dict, cost: dict, drift: dict | None) -> str:
    """results.md of a run whose texts the world cannot score: the void note, the cost table, Drift's weights."""
    lines = [f"# {', '.join(a for a in arms if a not in ('base', 'prompting'))} vs base and preference prompting "
             f"({cfg.split} users, T={cfg.temperature})", "", VOID.format(policy=cfg.policy), "",
             "## cost per generated token", "", "| arm | tokens | seconds | ms / token | vs base |",
             "|---|---|---|---|---|"]
    lines += [f"| {arm} | {c['tokens']} | {c['seconds']:.1f} | {1000 * c['s_per_token']:.1f} | {c['vs_base']:.2f}x |"
              for arm, c in cost.items()]
    if drift and drift.get("mean_weights"):
        lines += ["", f"## Drift weights from {drift['pairs']} pairs per user (mean of {drift['users']} users)", "",
                  "| " + " | ".join(drift["mean_weights"]) + " |", "|---" * len(drift["mean_weights"]) + "|",
                  "| " + " | ".join(f"{w:+.2f}" for w in drift["mean_weights"].values()) + " |"]
    return "\n".join(lines) + "\n"


VOID = ("void: the true rewards are the persona world's and score only the world's language; {policy} is not a "
        "world model, so no reward, win rate or validity is reported (the responses are in samples.jsonl)")


def arm_costs(seconds: dict, tokens: dict) -> dict:
    """Seconds per generated token of each arm, and its ratio to the base's (plain decoding)."""
    per = {arm: seconds[arm] / max(tokens[arm], 1) for arm in seconds}
    return {arm: {"tokens": tokens[arm], "seconds": seconds[arm], "s_per_token": per[arm],
                  "vs_base": per[arm] / per["base"]} for arm in seconds}


# --- main -----------------------------------------------------------------------------------------------------------
def world_guides(cfg: DecodeConfig, method: str) -> set[str]:
    """What `method` reads from a world guides run (`rewards.train kind=guides`): guide names, drift.json."""
    need = {"pad": {cfg.pad.guide}, "genarm": {"arm"}, "args": {"rm"},
            "drift": {cfg.drift.guide} | ({"drift.json"} if cfg.drift.prompts is None else set())}[method]
    return need - {"base"}


def check_methods(cfg: DecodeConfig) -> list[str]:
    """[method, *arms], refused in one line when unknown, repeated, or PAD's base and guide would read the same."""
    from alignment.config import ConfigError

    methods = [cfg.method, *cfg.arms]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) < len(methods):
        raise ConfigError(f"arms: {cfg.arms} must name distinct methods other than method={cfg.method} "
                          f"(known: {', '.join(METHODS)})")
    if "pad" in methods and cfg.pad.guide == "base" and cfg.pad.base_prompt != "plain":
        raise ConfigError("pad.guide=base (self-guided PAD) needs pad.base_prompt=plain: if the base reads the "
                          "persona too, PAD is preference prompting at twice the cost")
    return methods


def is_world_policy(tokenizer, world: dict) -> bool:
    """Whether a policy reads the world's vocabulary (an SFT/DPO policy of this world), so the world can score it."""
    from alignment.models import load_tokenizer, same_vocabulary

    return same_vocabulary(tokenizer, load_tokenizer(Path(world["path"]) / "tokenizer"))


def load_decoders(cfg: DecodeConfig, tokenizer, guides_dir: Path | None, policy: Path, methods: list[str]) -> Decoders:
    """The base, the guides `methods` read (each refused in one line if its vocabulary is not the base's) and
    Drift's prompts (drift.prompts, else the guides run's drift.json)."""
    import json

    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm
    from decoding.drift import load_attribute_prompts
    from decoding.guides import load_guide

    base = load_causal_lm(ModelConfig(name_or_path=str(policy), dtype="float32"), tokenizer)
    models = {"base": base}
    for name in sorted(set().union(*(world_guides(cfg, m) for m in methods)) - {"drift.json"}):
        models[name] = load_guide(guides_dir / name, tokenizer, reward=name == "rm")
    prompts = (load_attribute_prompts(cfg.drift.prompts) if cfg.drift.prompts
               else json.loads((guides_dir / "drift.json").read_text()) if guides_dir else None)
    texts = [prompts["neutral"], *prompts["attributes"].values()] if prompts else []
    return Decoders(cfg, tokenizer, base, models, texts, {}, list(prompts["attributes"]) if prompts else [])


def main(cfg: DecodeConfig) -> Path:
    import json
    import time

    from alignment.models import load_tokenizer
    from alignment.policy import starting_policy
    from alignment.runs import Run, seed_everything
    from alignment.world import load_world, world_artifact
    from rewards.guides import guides_artifact

    # --- setup: world, base policy, guides (each built once and cached on a fresh machine)
    methods = check_methods(cfg)
    run = Run.start(cfg, f"decode-{cfg.method}", runs_dir=cfg.runs_dir, name=cfg.name)
    seed_everything(cfg.seed)
    world = load_world(world_artifact(cfg.world, cfg.runs_dir))
    guides_cfg = replace(cfg.guides, world=cfg.world, runs_dir=cfg.runs_dir)
    policy = starting_policy(cfg.policy, guides_cfg.sft, cfg.world, cfg.runs_dir)
    tokenizer = load_tokenizer(policy)
    world_policy = cfg.policy is None or is_world_policy(tokenizer, world)
    if not world_policy:  # world guides are trained from the world SFT policy: never built for another policy
        bound = [m for m in methods if world_guides(cfg, m)] if cfg.guides_dir is None else []
        methods = [m for m in methods if m not in bound]
        log.warning("policy %s is not a persona-world model: world-bound, so skipped: the true-reward evaluation "
                    "(void)%s; running: base, prompting%s", cfg.policy,
                    "".join(f", {m} (needs world guides)" for m in bound), "".join(f", {m}" for m in methods))
    needs_guides = any(world_guides(cfg, m) for m in methods)
    guides_dir = Path(cfg.guides_dir) if cfg.guides_dir else guides_artifact(guides_cfg) if needs_guides else None
    run.add_meta("inputs", {"world": str(world["path"]), "policy": str(policy),
                            "guides": str(guides_dir) if guides_dir else None})
    d = load_decoders(cfg, tokenizer, guides_dir, policy, methods)

    # --- data: held-out users x held-out queries; Drift first fits each user's weights from labelled pairs
    rows = decoding_rows(world, cfg)
    drift = (fit_drift(d, world, rows, recovery=world_policy and cfg.drift.prompts is None)
             if "drift" in methods else None)

    # --- decode every arm with the same prompts, settings and seeds
    arms = {"base": ("plain", None), "prompting": ("preference", None),
            **{m: (getattr(cfg, m).base_prompt, m) for m in methods}}
    texts, seconds, tokens = {}, {}, {}
    for arm, (prompt, method) in arms.items():
        t0 = time.time()
        texts[arm], tokens[arm] = decode_arm(d, rows, prompt, method)
        seconds[arm] = time.time() - t0
        log.info("%s: %d responses, %d tokens in %.1fs", arm, len(rows), tokens[arm], seconds[arm])
    cost = arm_costs(seconds, tokens)

    # --- score against the truth (the world's, so only for a world policy), write the table
    quality = world["stats"]["population"]["quality"]
    rewards = {arm: true_rewards(rows, t, quality) for arm, t in texts.items()} if world_policy else None
    table = summarize(rows, rewards) if world_policy else None
    with open(run.path("samples.jsonl"), "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"user_id": r["user"]["user_id"], "query_id": r["query"]["query_id"],
                                **{arm: {"text": texts[arm][i],
                                         "reward": float(rewards[arm][i]) if rewards else None} for arm in texts}})
                    + "\n")
    results = {"method": cfg.method, "table": table, "drift": drift, "seconds": seconds, "cost": cost,
               "void": None if world_policy else VOID.format(policy=cfg.policy),
               "unseen_combination_users": len({r["user"]["user_id"] for r in rows if r["unseen_combination"]})}
    markdown = results_markdown(cfg, table, drift) if world_policy else void_markdown(cfg, arms, cost, drift)
    (run.path("results.md")).write_text(markdown)
    print(markdown)
    run.finish(results)
    return run.dir


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(DecodeConfig, main)
