"""APC-DPO: DPO with Active-Passive-Constraint rewards for role-play persona faithfulness.

    python -m alignment.dpo config=apc.yaml                      # the main job (see the runtime note below)
    python -m alignment.dpo config=apc.yaml loss=apc_weighted    # the paper's per-statement loss (eq. 9)
    python -m alignment.dpo config=apc.yaml policy=<hf policy> discriminators=<dir>   # real models
    python -m alignment.dpo config=apc.yaml reward=oracle        # pairs ranked by the world's true ΔAPC: the ceiling
    python -m alignment.dpo config=real/dpo.yaml                 # SmolLM2-135M-Instruct, LoRA, real-format pairs

Pipeline (Peng & Shang, "Quantifying and Optimizing Global Faithfulness in Persona-driven Role-playing",
NeurIPS 2024; research/apc_fspo.md §1.4, §3.2):

1. RAG prompt: the top-k persona statements by the reward relevance discriminator, in the system turn.
2. Sample N >= 4 responses per training query from the SFT policy (temperature 1).
3. Score every response with APC against *all* of the character's statements, using the reward discriminators.
4. Chosen = best ΔAPC, rejected = worst, kept when the gap exceeds `margin` (the paper: N = 2, margin 0.2).
5. DPO (sigmoid or IPO; arXiv:2305.18290 eq. 7, arXiv:2310.12036 eq. 17) against the frozen SFT policy, full or
   LoRA; or `apc_weighted`, our reading of the paper's eq. 9 (alignment/losses.py): each statement votes for the
   response it prefers, weighted by relevance, a soft-label DPO. The official code never shipped eq. 9.
6. Evaluate on held-out queries of the same characters, APC paper Table 1 shape: Vanilla (no persona), LCM (all
   statements in context), RAG, RAG+APC-DPO; ΔAPC by the *evaluator* discriminators (trained on other characters
   than the reward ones, so the metric is not the reward being optimized) and by the world's oracle.

Differences from the official code: N >= 4 samples ranked best-vs-worst instead of 2; batched, cached APC; the
reference log-probs are computed once before training (the reference is the frozen starting policy); held-out
queries, a separate evaluator and bootstrap intervals. On a fresh machine the world, the SFT policy and the
discriminators are built once and cached under runs/cache/; every run ends by printing where its time went (stage,
seconds; results.json `timings`). Measured times and tables: README and docs/experiments/main_job.md.
`reward=oracle` ranks the pairs by the world's true ΔAPC instead: the ceiling any discriminators can reach, and the
way to tell a failed run's reward from its optimizer.
Files: pairs.jsonl (records.PreferencePair, APC scores as rewards), ref_logps.safetensors, ckpt/, metrics.jsonl,
samples.jsonl (evaluation responses), results.json and results.md (the table).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from alignment.config import AdapterData, ConfigError, LoraConfig
from alignment.policy import SFTConfig
from alignment.world import WorldSpec
from rewards.discriminators import DiscriminatorConfig

log = logging.getLogger(__name__)


@dataclass
class DPOConfig:
    seed: int = 0
    name: str | None = None  # run name; default dpo-<timestamp>
    resume: bool = False  # continue the run `name` from its last checkpoint
    runs_dir: str = "runs"
    world: WorldSpec = field(default_factory=WorldSpec)
    sft: SFTConfig = field(default_factory=SFTConfig)  # how the starting policy is trained when `policy` is unset
    policy: str | None = None  # HF directory (or hub id) of the starting policy; default: the cached SFT policy
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)  # used when `discriminators` is unset
    discriminators: str | None = None  # directory with reward/ and evaluator/ discriminator sets
    pairs: AdapterData | None = None  # real-format pairs instead of APC pairs from the world (needs `policy`)
    # What scores the sampled responses: the reward discriminators (APC-DPO), or the world's true ΔAPC (oracle:
    # the ceiling any discriminators can reach; RAG prompts and evaluation still use the discriminators).
    reward: Literal["discriminators", "oracle"] = "discriminators"
    characters: str = "holdout"  # character split whose queries are trained on (train split) and evaluated (test)
    train_queries: int = 1000  # the default world has 1090 train-split queries of holdout characters
    rag_k: int = 4
    samples: int = 4  # N responses per training query
    temperature: float = 1.0
    max_new_tokens: int = 96
    margin: float = 0.2  # minimum ΔAPC gap between chosen and rejected
    loss: Literal["sigmoid", "ipo", "apc_weighted"] = "sigmoid"
    beta: float = 0.1
    lora: LoraConfig | None = None  # None: full fine-tuning
    lr: float = 3e-4
    epochs: int = 2
    batch_size: int = 16
    log_every: int = 5
    checkpoint_every: int = 20
    eval_queries: int = 400  # held-out queries (all test slot queries of the characters, at most this many)


# --- setup: prerequisites ---------------------------------------------------------------------------------------
def prerequisites(cfg: DPOConfig, run=None) -> tuple[Path, Path, Path]:
    """(world dir, policy dir, discriminators dir), building and caching whatever is missing; each is a stage of
    `run`'s timings when a run is given."""
    from dataclasses import replace

    from alignment.policy import starting_policy
    from alignment.runs import timed
    from alignment.world import world_artifact
    from rewards.discriminators import discriminators_artifact

    with timed(run, "world"):
        world = world_artifact(cfg.world, cfg.runs_dir)
    with timed(run, "sft"):
        policy = starting_policy(cfg.policy, cfg.sft, cfg.world, cfg.runs_dir)
    if cfg.policy and not cfg.discriminators:
        from alignment.models import load_tokenizer, same_vocabulary

        if not same_vocabulary(load_tokenizer(policy), load_tokenizer(world / "tokenizer")):
            # The discriminators would be fine-tuned from this policy on world text: four classifiers of its size.
            raise ConfigError(f"policy {cfg.policy}: not a persona-world policy (another vocabulary); APC-DPO's "
                              "pairs, discriminators and table are world-bound. For DPO on real-format pairs use "
                              "pairs.adapter/pairs.source (configs/real/dpo.yaml)")
    with timed(run, "discriminators"):
        discs = Path(cfg.discriminators) if cfg.discriminators else discriminators_artifact(  # from the same policy
            replace(cfg.disc, world=cfg.world, runs_dir=cfg.runs_dir, policy=cfg.disc.policy or str(policy)))
    return world, policy, discs


# --- prompts ----------------------------------------------------------------------------------------------------
def persona_prompts(queries: list[tuple[dict, dict]], scorer, k: int) -> list[dict[str, list[dict]]]:
    """The three prompt conditions of the APC table for each (query, character): no persona, all statements, RAG
    top-k by `scorer`'s relevance (one batched relevance pass over all queries)."""
    from rewards.apc_eval import world_apc_request

    def turn(system: str, query: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": query}]

    requests = [world_apc_request(q, c) for q, c in queries]
    prompts = []
    for r, scores in zip(requests, scorer.score_many(requests), strict=True):
        top = torch.topk(scores.p_rel, min(k, len(r.statements))).indices.tolist()
        prompts.append({"vanilla": turn("", r.query), "lcm": turn(" ".join(r.statements), r.query),
                        "rag": turn(" ".join(r.statements[i] for i in top), r.query)})
    return prompts


def select_queries(world: dict, characters: str, split: str, n: int, seed: int, with_off_topic: bool):
    import numpy as np

    chars = {c["character_id"]: c for c in world["characters"] if c["split"] == characters}
    pool = [q for q in world["queries"] if q["character_id"] in chars and q["split"] == split
            and (with_off_topic or q["slot"] is not None)]
    picked = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [(pool[i], chars[pool[i]["character_id"]]) for i in sorted(picked)]


# --- pairs ------------------------------------------------------------------------------------------------------
def build_pairs(cfg: DPOConfig, world: dict, policy, tokenizer, scorer, judge, run=None,
                chunk: int = 100) -> list[dict]:
    """Sample N responses per training query (RAG prompts by `scorer`'s relevance), score them with `judge`'s APC,
    keep best-vs-worst above the margin; `run` times the two as stages "sampling" and "apc"."""
    from tqdm.auto import tqdm

    from alignment.losses import apc_pair_weights
    from alignment.runs import timed
    from alignment.sampling import sample_responses
    from rewards.apc_eval import world_apc_request

    queries = select_queries(world, cfg.characters, "train", cfg.train_queries, cfg.seed, with_off_topic=True)
    with timed(run, "sampling"):
        prompts = [p["rag"] for p in persona_prompts(queries, scorer, cfg.rag_k)]
        samples = sample_responses(policy, tokenizer, prompts, n=cfg.samples, temperature=cfg.temperature,
                                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    # Identical samples carry no preference; queries with fewer than two distinct ones are skipped.
    kept = [(q, c, prompt, unique) for (q, c), prompt, responses in zip(queries, prompts, samples, strict=True)
            if len(unique := list(dict.fromkeys(responses))) >= 2]
    requests = [world_apc_request(q, c, unique) for q, c, _, unique in kept]
    # Chunks of queries, each one batched pass per classifier: 76 s instead of 105 s query by query (1000 queries,
    # ~150k statement-response pairs, 2-core CPU); the chunks only give the progress bar its steps.
    scores, bar = [], tqdm(total=len(requests), desc="apc", unit="query")
    with timed(run, "apc"):
        for i in range(0, len(requests), chunk):
            part = requests[i:i + chunk]
            scores += judge.score_many(part)
            bar.update(len(part))
    bar.close()
    pairs = []
    for (q, c, prompt, unique), s in zip(kept, scores, strict=True):
        best, worst = int(s.delta.argmax()), int(s.delta.argmin())
        if s.delta[best] - s.delta[worst] <= cfg.margin:
            continue
        w12, w21 = apc_pair_weights(*(t.unsqueeze(0) for t in (s.p_rel.expand_as(s.p_ent[best]), s.p_ent[best],
                                                                  s.p_con[best], s.p_ent[worst], s.p_con[worst],
                                                                  torch.ones_like(s.p_rel))))
        pairs.append({"user_id": c["character_id"], "prompt": prompt, "chosen": unique[best],
                      "rejected": unique[worst], "prompt_id": q["query_id"], "chosen_reward": float(s.delta[best]),
                      "rejected_reward": float(s.delta[worst]), "split": "train",
                      "votes": [float(w12), float(w21)]})
    log.info("pairs: %d of %d queries kept (margin %.2f)", len(pairs), len(queries), cfg.margin)
    return pairs


def batches(pairs: list[dict], tokenizer, max_length: int):
    """Tokenized (2B, T) batches in TRL's layout, one per index list, built on demand."""
    from alignment.logps import build_pair_batch
    from alignment.sampling import render_prompt

    def make(idx: list[int]) -> dict[str, torch.Tensor]:
        rows = [pairs[i] for i in idx]
        return build_pair_batch(tokenizer, [render_prompt(tokenizer, r["prompt"]) for r in rows],
                                [r["chosen"] for r in rows], [r["rejected"] for r in rows], max_length)
    return make


@torch.no_grad()
def reference_logps(model, make_batch, n: int, batch_size: int, average: bool) -> torch.Tensor:
    """(n, 2) log-probs of chosen and rejected under the frozen reference, computed once before training."""
    from alignment.logps import pair_logps

    model.eval()
    out = []
    for i in range(0, n, batch_size):
        batch = {k: v.to(model.device) for k, v in make_batch(list(range(i, min(n, i + batch_size)))).items()}
        out.append(torch.stack(pair_logps(model, batch, average=average), dim=-1).float().cpu())
    return torch.cat(out)


def dpo_step_loss(cfg: DPOConfig, model, batch, ref: torch.Tensor, votes: torch.Tensor):
    """Mean loss and per-pair rewards of one batch; `ref` (B, 2) reference log-probs, `votes` (B, 2) = w12, w21."""
    from alignment.logps import pair_logps
    from alignment.losses import LENGTH_AVERAGED, LOSSES, apc_weighted_loss

    chosen, rejected = pair_logps(model, batch, average=LENGTH_AVERAGED[cfg.loss])
    if cfg.loss == "apc_weighted":
        losses, rc, rr = apc_weighted_loss(chosen, rejected, ref[:, 0], ref[:, 1], votes[:, 0], votes[:, 1],
                                           cfg.beta)
    else:
        losses, rc, rr = LOSSES[cfg.loss](chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta)
    return losses.mean(), rc, rr


# --- evaluation -------------------------------------------------------------------------------------------------
def evaluate(cfg: DPOConfig, world, base, trained, tokenizer, reward_scorer, evaluator, run) -> dict:
    """The APC Table 1 rows on held-out queries, scored by the evaluator discriminators and the oracle."""
    from alignment.sampling import sample_responses
    from rewards.apc_eval import apc_table

    queries = select_queries(world, cfg.characters, "test", cfg.eval_queries, cfg.seed, with_off_topic=False)
    prompts = persona_prompts(queries, reward_scorer, cfg.rag_k)
    rows = {"Vanilla": (base, "vanilla"), "LCM": (base, "lcm"), "RAG": (base, "rag"), "RAG+APC-DPO": (trained, "rag")}
    responses = {}
    for name, (model, kind) in rows.items():
        out = sample_responses(model, tokenizer, [p[kind] for p in prompts], temperature=cfg.temperature,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1)
        responses[name] = [r[0] for r in out]
    with open(run.path("samples.jsonl"), "w") as f:
        for i, (q, _) in enumerate(queries):
            f.write(json.dumps({"query_id": q["query_id"], "query": q["text"],
                                **{name: responses[name][i] for name in rows}}) + "\n")
    return apc_table(queries, responses, evaluator, seed=cfg.seed)


# --- entry point ------------------------------------------------------------------------------------------------
def main(cfg: DPOConfig) -> Path:
    from alignment.files import atomic_write_text
    from alignment.models import load_tokenizer
    from alignment.records import PreferencePair, read_jsonl, write_jsonl
    from alignment.runs import Run, seed_everything
    from alignment.world import load_world
    from rewards.apc_eval import format_apc_table
    from rewards.discriminators import load_scorer

    # --- setup
    run = Run.start(cfg, "dpo", runs_dir=cfg.runs_dir, name=cfg.name, resume=cfg.resume)
    seed_everything(cfg.seed)
    if cfg.pairs is not None:
        return main_pairs(cfg, run)
    world_dir, policy_dir, disc_dir = prerequisites(cfg, run)
    for key, path in (("world", world_dir), ("policy", policy_dir), ("discriminators", disc_dir)):
        run.add_meta(key, str(path))
    world = load_world(world_dir)
    tokenizer = load_tokenizer(policy_dir)
    base = _load_policy(policy_dir, tokenizer)
    reward_scorer, evaluator = load_scorer(disc_dir, "reward"), load_scorer(disc_dir, "evaluator")

    # --- data: pairs (built once per run; a resumed run reads them back)
    if not run.path("pairs.jsonl").exists():
        from rewards.apc_eval import OracleAPCScorer

        judge = OracleAPCScorer() if cfg.reward == "oracle" else reward_scorer
        pairs = build_pairs(cfg, world, base, tokenizer, reward_scorer, judge, run)
        if not pairs:
            raise RuntimeError("no training pair cleared the margin; lower `margin` or raise `samples`")
        write_jsonl(run.path("pairs.jsonl"), [PreferencePair(**p) for p in pairs])
    pairs = [p.to_dict() for p in read_jsonl(run.path("pairs.jsonl"), PreferencePair)]
    with run.stage("dpo"):  # reference log-probs, then training
        policy = train(cfg, run, base, tokenizer, pairs)

    # --- evaluation: the APC table on held-out queries
    with run.stage("evaluation"):
        results = evaluate(cfg, world, base, policy, tokenizer, reward_scorer, evaluator, run)
    gaps = [p["chosen_reward"] - p["rejected_reward"] for p in pairs]
    results["pairs"] = {"count": len(pairs), "mean_apc_gap": torch.tensor(gaps).mean().item()}
    results["timings"] = {"seconds": run.timings, "resumed": run.resumed}  # this invocation's stages
    table = format_apc_table(results)
    atomic_write_text(run.path("results.md"), table + "\n")
    print(table)
    print(run.timings_line() + (" (a resumed run: only what this invocation did)" if run.resumed else ""))
    run.finish(results)
    return run.dir


def main_pairs(cfg: DPOConfig, run) -> Path:
    """DPO on real-format pairs through an adapter (`cfg.pairs`): the train users' pairs, from `policy`; the APC
    pairs, discriminators and table are world-bound and skipped. Held out: the test users' pairs' implicit-reward
    accuracy and margin (beta * log-ratio to the reference), which need no true reward."""
    from alignment.adapters import read_adapter, split_users
    from alignment.models import load_tokenizer

    if cfg.policy is None:
        raise ConfigError("pairs: DPO on real-format data needs policy= (e.g. smollm2-135m-instruct or an SFT run's "
                          "ckpt/step_*/model)")
    log.info("dpo: %s pairs from %s; APC pair building, discriminators and the APC table are world-bound and "
             "skipped", cfg.pairs.adapter, cfg.pairs.source)
    policy_dir = starting_policy_dir(cfg.policy)
    run.add_meta("policy", str(policy_dir))
    tokenizer = load_tokenizer(policy_dir)
    base = _load_policy(policy_dir, tokenizer)
    splits = split_users(read_adapter(cfg.pairs).pairs, cfg.pairs.users, cfg.seed)
    pairs, held = ([p.to_dict() for pairs in splits[s].values() for p in pairs] for s in ("train", "test"))
    if not pairs:
        raise ConfigError(f"pairs: no train user's pair in {cfg.pairs.source}")
    policy = train(cfg, run, base, tokenizer, pairs)
    results = {"pairs": {"train": len(pairs), "held_out": len(held)},
               "held_out": held_out_rewards(cfg, base, policy, tokenizer, held) if held else None}
    print(f"dpo: {len(pairs)} train pairs; held-out users' pairs: {results['held_out']}")
    run.finish(results)
    return run.dir


def starting_policy_dir(policy: str) -> Path:
    from alignment.model_sources import model_path

    return Path(model_path(policy))


@torch.no_grad()
def held_out_rewards(cfg: DPOConfig, base, policy, tokenizer, pairs: list[dict]) -> dict:
    """Implicit-reward accuracy (chosen's beta * log(pi / pi_ref) above rejected's) and mean margin on `pairs`."""
    from alignment.losses import LENGTH_AVERAGED

    make_batch = batches(pairs, tokenizer, max_length=base.config.max_position_embeddings)
    average = LENGTH_AVERAGED[cfg.loss]
    ref = reference_logps(base, make_batch, len(pairs), cfg.batch_size, average)
    now = reference_logps(policy, make_batch, len(pairs), cfg.batch_size, average)
    margin = cfg.beta * ((now[:, 0] - ref[:, 0]) - (now[:, 1] - ref[:, 1]))
    return {"count": len(pairs), "reward_accuracy": (margin > 0).float().mean().item(),
            "reward_margin": margin.mean().item()}


def train(cfg: DPOConfig, run, base, tokenizer, pairs: list[dict]):
    """DPO from `base` (frozen, the reference) on `pairs`; returns the trained policy (LoRA merged)."""
    import copy

    from tqdm.auto import tqdm

    from alignment.files import json_digest
    from alignment.losses import LENGTH_AVERAGED
    from alignment.models import attach_lora

    # --- reference log-probs, computed once per run (a resumed run reads them back while they still apply)
    votes = torch.tensor([p["votes"] or [1.0, 0.0] for p in pairs])  # (P, 2): w12, w21 of APC eq. 9
    make_batch = batches(pairs, tokenizer, max_length=base.config.max_position_embeddings)
    average = LENGTH_AVERAGED[cfg.loss]
    fingerprint = {"length_averaged": average, "pairs": json_digest([[p["prompt"], p["chosen"], p["rejected"]]
                                                                for p in pairs]), "batch_size": cfg.batch_size}
    ref = run.cached_tensor("ref_logps.safetensors", fingerprint,
                            lambda: reference_logps(base, make_batch, len(pairs), cfg.batch_size, average))  # (P, 2)

    # --- policy, optimizer, schedule, data order
    policy = copy.deepcopy(base)
    if cfg.lora is not None:
        policy = attach_lora(policy, cfg.lora)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = (len(pairs) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(total, 1))
    order = torch.Generator().manual_seed(cfg.seed)
    state = run.load_checkpoint(policy, optimizer, scheduler, generators={"order": order}) if cfg.resume else None
    step = state["step"] if state else 0
    if step == 0:
        gaps = [p["chosen_reward"] - p["rejected_reward"] for p in pairs if p["chosen_reward"] is not None]
        run.log(0, pairs=len(pairs), **({"mean_apc_gap": torch.tensor(gaps).mean().item()} if gaps else {}))
    perm = torch.tensor(state["perm"]) if state else torch.randperm(len(pairs), generator=order)

    # --- loop: epochs over a seeded permutation; the permutation in use is checkpointed with the step
    policy.train()
    bar = tqdm(total=total, initial=step, desc="dpo")
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 and step > 0:  # a new epoch draws its order (a checkpoint at an epoch end holds the old one)
            perm = torch.randperm(len(pairs), generator=order)
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
        batch = {k: v.to(policy.device) for k, v in make_batch(idx).items()}
        loss, rc, rr = dpo_step_loss(cfg, policy, batch, ref[idx].to(policy.device), votes[idx].to(policy.device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            run.log(step, epoch=epoch, loss=loss.item(), grad_norm=grad_norm.item(), reward_margin=(rc - rr).mean()
                    .item(), reward_accuracy=(rc > rr).float().mean().item(), lr=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == total:
            run.save_checkpoint(step, policy, optimizer, scheduler, {"order": order, "perm": perm.tolist()},
                                tokenizer=tokenizer)
    bar.close()
    return policy.merge_and_unload() if cfg.lora is not None else policy


def _load_policy(path: Path, tokenizer):
    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm

    return load_causal_lm(ModelConfig(name_or_path=str(path)), tokenizer)


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(DPOConfig, main)
