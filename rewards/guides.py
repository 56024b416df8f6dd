"""Guide models for decoding-time personalization: PAD's preference-conditioned guide, GenARM's autoregressive
reward model, an ARGS sequence reward model, and Drift's attribute prompts.

    python -m rewards.train config=guides.yaml                  # all three on the tiny world, ~15 min on 2 CPU cores
    python -m rewards.train config=guides.yaml arm.beta=0.2 pad.steps=1000

Every guide reads the user's preference TEXT (the persona's stated preferences, appended to the system turn as
the world's SFT data do), never a user id, so it applies to users and preference combinations it never saw. All
three start from the SFT policy (same tokenizer, so their tokens line up with the base's) and train on the
world's *train* users only; decoding.generate evaluates on val/test users.

  pad/  PAD's guide (Chen et al., ICLR 2025, arXiv:2410.04070). The paper's PersRM is a full LM conditioned on the
        preference text; its training code was never released (research/decoding.md §1.2). Here: next-token
        cross-entropy on world responses whose style follows the stated preferences (each liked attribute present
        with probability `pad.liked`, each disliked one with `pad.disliked`, like `world.make_dialogues` but always
        conditioned and sharper), so pi_g(y | preferences) is the preference-following response distribution.
  arm/  GenARM's autoregressive RM (Xu et al., ICLR 2025, arXiv:2410.08193 eq. 5; the official `arm_loss`): a causal
        LM trained reference-free on the train users' labelled pairs,
            L = -log sigmoid(beta (log pi_r(y_w | x, prefs) - log pi_r(y_l | x, prefs)))
        so its token log-probs are a token-level reward; decoding adds alpha log pi_r to the base log-probs.
  rm/   ARGS's sequence reward (Khanov et al., ICLR 2024, arXiv:2402.01694): a decoder classifier with one output
        read at the last token, Bradley-Terry on the same pairs; decoding rescores the base top-k with it.
        (The persona-conditioned RMs of rewards/persona_rm.py implement the same `fn(ids, mask)` shape.)
  drift.json  Drift's differential prompts: a neutral preference text and one per attribute (the positive
        statement of people.PREFERENCE_TEXT); the small LM under them is the PAD guide (or the base).

Held-out checks in results.json: pairwise accuracy of arm/ and rm/ on the test users' target pairs (unseen users,
unseen prompts) beside the world's Bayes ceiling, and the per-token cross-entropy of pad/ on held-out dialogues.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from alignment.sft import SFTConfig
from alignment.world import WorldSpec

log = logging.getLogger(__name__)

NEUTRAL_PREFERENCE = "the user has no stated preferences ."  # what people.persona_text writes for no salient weight


@dataclass
class PADGuideSettings:
    steps: int = 500
    lr: float = 1e-3
    examples: int = 20000  # preference-conditioned dialogues drawn from train users x train queries
    liked: float = 0.9  # probability of an attribute the user states a liking for
    disliked: float = 0.03  # ... and of one the user states a dislike for (others: the world's style_p)


@dataclass
class ARMSettings:
    steps: int = 300
    lr: float = 5e-4
    beta: float = 0.5  # GenARM's beta (the official HH run: 0.05 with a 7B model)
    pairs: Literal["train_context", "train_all"] = "train_all"  # train users' pairs on train queries, or all theirs


@dataclass
class RMSettings:
    steps: int = 300
    lr: float = 5e-4


@dataclass
class GuidesConfig:
    kind: Literal["guides"] = "guides"  # picks this module in `python -m rewards.train`
    seed: int = 0
    name: str | None = None  # run name; default guides-<timestamp>
    resume: bool = False  # continue the run `name`: guides already saved there are loaded, not retrained
    runs_dir: str = "runs"
    world: WorldSpec = field(default_factory=WorldSpec)  # built and cached under runs/cache/ if missing
    data: str | None = None  # an existing world directory to use instead of `world`
    sft: SFTConfig = field(default_factory=SFTConfig)  # the starting policy when `policy` is unset
    policy: str | None = None  # HF directory of the policy every guide starts from; default: the cached SFT policy
    train: list[str] = field(default_factory=lambda: ["pad", "arm", "rm"])  # which guides to train
    batch_size: int = 32
    max_length: int = 160  # tokens; world prompt + response <= ~110
    warmup: int = 30
    log_every: int = 50
    eval_pairs: int = 2000  # held-out target pairs for the accuracy checks (0 = all)
    pad: PADGuideSettings = field(default_factory=PADGuideSettings)
    arm: ARMSettings = field(default_factory=ARMSettings)
    rm: RMSettings = field(default_factory=RMSettings)


Config = GuidesConfig  # the name `rewards.train` dispatches to


# --- data -----------------------------------------------------------------------------------------------------------
def preference_messages(messages: list[dict], persona: str) -> list[dict]:
    """A pair's or dialogue's prompt with the user's stated preferences appended to the system turn."""
    from decoding.drift import with_system_suffix

    return with_system_suffix(messages, persona)


def drift_prompts() -> dict:
    from alignment import people

    return {"neutral": NEUTRAL_PREFERENCE, "attributes": {a: pos for a, (pos, _) in people.PREFERENCE_TEXT.items()}}


def preference_dialogues(world: dict, spec: WorldSpec, n: int, liked: float, disliked: float, seed: int) -> list[dict]:
    """n dialogues on train queries, each conditioned on a random train user's persona, styled by its preferences."""
    import numpy as np

    from alignment import people
    from alignment.world import rag_statements, sample_response

    rng = np.random.default_rng(seed)
    chars = {c["character_id"]: c for c in world["characters"]}
    queries = [q for q in world["queries"] if q["split"] == "train"]
    users = [u for u in world["users"] if u["split"] == "train"]
    rows = []
    for _ in range(n):
        q, u = queries[rng.integers(len(queries))], users[rng.integers(len(users))]
        c = chars[q["character_id"]]
        stated = people.stated_preferences(u["persona"])
        style_p = np.where(stated > 0, liked, np.where(stated < 0, disliked, spec.style_p))
        system = f"{rag_statements(rng, c['statements'], q['slot'], spec.rag_k)} {u['persona']}"
        facts = [(s["slot"], s["value"]) for s in c["statements"]]
        rows.append({"prompt": [{"role": "system", "content": system}, {"role": "user", "content": q["text"]}],
                     "response": sample_response(rng, facts, q["slot"], spec, style_p)})
    return rows


def user_pairs(world: dict, splits: tuple[str, ...], limit: int = 0) -> list[dict]:
    """Pairs of the given splits with each user's persona in the prompt; the first `limit` (0 = all)."""
    persona = {u["user_id"]: u["persona"] for u in world["users"]}
    rows = [{**p, "prompt": preference_messages(p["prompt"], persona[p["user_id"]])}
            for p in world["pairs"] if p["split"] in splits]
    return rows[:limit] if limit else rows


def pair_batch(tokenizer, pairs: list[dict], max_length: int, device):
    from alignment.logps import build_pair_batch
    from alignment.sampling import render_prompt

    batch = build_pair_batch(tokenizer, [render_prompt(tokenizer, p["prompt"]) for p in pairs],
                             [p["chosen"] for p in pairs], [p["rejected"] for p in pairs], max_length)
    return {k: v.to(device) for k, v in batch.items()}


# --- objectives: (model, batch) -> loss -----------------------------------------------------------------------------
def arm_loss(chosen_logps, rejected_logps, beta: float):
    """GenARM eq. 5 (reference-free): -log sigmoid(beta (log pi_r(y_w) - log pi_r(y_l))), (B,) -> (B,)."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * (chosen_logps - rejected_logps))


def sequence_rewards(model, batch):
    """(2B,) rewards of a right-padded pair batch: the classifier head at each row's last real token."""
    import torch

    from decoding.guides import positions, score_head

    mask = batch["attention_mask"]
    h = model.base_model(input_ids=batch["input_ids"], attention_mask=mask,
                         position_ids=positions(mask)).last_hidden_state
    last = mask.sum(-1) - 1
    return score_head(model)(h[torch.arange(len(h)), last])[:, 0]


def train_loop(model, params, batches, steps: int, lr: float, cfg: GuidesConfig, run, desc: str, loss_fn) -> dict:
    """AdamW with warmup + cosine decay (sft.lr_lambda) over `batches(step)`; returns timing and final loss."""
    import torch
    from tqdm.auto import tqdm

    from alignment.sft import lr_lambda

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, steps))
    model.train()
    t0, loss = time.time(), torch.tensor(float("nan"))
    for step in (bar := tqdm(range(steps), desc=desc)):
        loss = loss_fn(model, batches(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            run.log(step + 1, **{f"{desc}/loss": loss.item(), f"{desc}/lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    seconds = time.time() - t0
    return {"steps": steps, "train_seconds": seconds, "final_loss": loss.item()}


# --- the three guides -----------------------------------------------------------------------------------------------
def train_pad(cfg: GuidesConfig, world: dict, tokenizer, policy: Path, run) -> tuple[object, dict]:
    import torch

    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm
    from alignment.sft import collate, encode

    model = load_causal_lm(ModelConfig(name_or_path=str(policy), dtype="float32"), tokenizer)
    data = preference_dialogues(world, cfg.world, cfg.pad.examples, cfg.pad.liked, cfg.pad.disliked, cfg.seed)
    examples, _ = encode(tokenizer, data, cfg.max_length)
    held_out, examples = examples[:256], examples[256:]
    order = torch.Generator().manual_seed(cfg.seed)

    def batches(step):
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=order).tolist()
        return {k: v.to(model.device) for k, v in collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}

    stats = train_loop(model, list(model.parameters()), batches, cfg.pad.steps, cfg.pad.lr, cfg, run, "pad",
                       lambda m, b: m(**b).loss)
    with torch.no_grad():
        held = {k: v.to(model.device) for k, v in collate(held_out, tokenizer.pad_token_id).items()}
        stats["held_out_loss"] = model(**held).loss.item()
    return model, stats


def train_arm(cfg: GuidesConfig, world: dict, tokenizer, policy: Path, run) -> tuple[object, dict]:
    import torch

    from alignment.config import ModelConfig
    from alignment.logps import pair_logps
    from alignment.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(policy), dtype="float32"), tokenizer)
    splits = ("train_context",) if cfg.arm.pairs == "train_context" else ("train_context", "train_target")
    pairs, order = user_pairs(world, splits), torch.Generator().manual_seed(cfg.seed + 1)

    def batches(step):
        idx = torch.randint(len(pairs), (cfg.batch_size,), generator=order).tolist()
        return pair_batch(tokenizer, [pairs[i] for i in idx], cfg.max_length, model.device)

    loss_fn = lambda m, b: arm_loss(*pair_logps(m, b), cfg.arm.beta).mean()
    stats = train_loop(model, list(model.parameters()), batches, cfg.arm.steps, cfg.arm.lr, cfg, run, "arm", loss_fn)
    stats.update(pairwise_accuracy(lambda b: pair_logps(model, b), cfg, world, tokenizer, model.device))
    return model, stats


def train_rm(cfg: GuidesConfig, world: dict, tokenizer, policy: Path, run) -> tuple[object, dict]:
    import torch
    import torch.nn.functional as F

    from alignment.config import ModelConfig
    from alignment.models import load_sequence_classifier

    model = load_sequence_classifier(ModelConfig(name_or_path=str(policy), dtype="float32"), tokenizer, ["reward"])
    pairs, order = user_pairs(world, ("train_context", "train_target")), torch.Generator().manual_seed(cfg.seed + 2)

    def batches(step):
        idx = torch.randint(len(pairs), (cfg.batch_size,), generator=order).tolist()
        return pair_batch(tokenizer, [pairs[i] for i in idx], cfg.max_length, model.device)

    def loss_fn(m, b):
        chosen, rejected = sequence_rewards(m, b).chunk(2)
        return -F.logsigmoid(chosen - rejected).mean()  # Bradley-Terry

    stats = train_loop(model, list(model.parameters()), batches, cfg.rm.steps, cfg.rm.lr, cfg, run, "rm", loss_fn)
    stats.update(pairwise_accuracy(lambda b: sequence_rewards(model, b).chunk(2), cfg, world, tokenizer, model.device))
    return model, stats


def pairwise_accuracy(score, cfg: GuidesConfig, world: dict, tokenizer, device) -> dict:
    """Share of the test users' target pairs (unseen users, unseen prompts) whose chosen response scores higher."""
    import torch

    pairs = user_pairs(world, ("test_target",), cfg.eval_pairs)
    correct = 0.0
    with torch.no_grad():
        for s in range(0, len(pairs), 128):
            chosen, rejected = score(pair_batch(tokenizer, pairs[s:s + 128], cfg.max_length, device))
            correct += ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum().item()
    return {"test_target_accuracy": correct / len(pairs), "eval_pairs": len(pairs),
            "bayes_ceiling": world["stats"]["test_target"]["bayes_ceiling"],
            "population_bt": world["stats"]["test_target"]["population_bt"]}


TRAINERS = {"pad": train_pad, "arm": train_arm, "rm": train_rm}


# --- entry point ----------------------------------------------------------------------------------------------------
def main(cfg: GuidesConfig) -> Path:
    import json

    from alignment.models import load_tokenizer, save_model
    from alignment.runs import Run, seed_everything
    from alignment.sft import starting_policy
    from alignment.world import load_world, world_artifact

    unknown = sorted(set(cfg.train) - set(TRAINERS))
    if unknown:
        raise ValueError(f"train: unknown guides {unknown} (known: {', '.join(TRAINERS)})")
    # --- setup
    run = Run.start(cfg, "guides", runs_dir=cfg.runs_dir, name=cfg.name, resume=cfg.resume)
    seed_everything(cfg.seed)
    world = load_world(cfg.data or world_artifact(cfg.world, cfg.runs_dir))
    policy = starting_policy(cfg.policy, cfg.sft, cfg.world, cfg.runs_dir, data=cfg.data)
    run.add_meta("inputs", {"world": str(world["path"]), "policy": str(policy)})
    tokenizer = load_tokenizer(policy)

    # --- train each guide (a resumed run keeps the ones already saved)
    results = {"policy": str(policy)}
    for name in cfg.train:
        out = run.path(name)
        if (out / "config.json").is_file():
            log.info("%s: kept from the resumed run", name)
            continue
        seed_everything(cfg.seed)
        model, stats = TRAINERS[name](cfg, world, tokenizer, policy, run)
        save_model(model, tokenizer, out)
        results[name] = {**stats, "path": str(out)}
        print(f"guides/{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, float)))
    (run.path("drift.json")).write_text(json.dumps(drift_prompts(), indent=1))
    results["drift"] = drift_prompts()
    run.finish(results)
    return run.dir


def guides_artifact(cfg: GuidesConfig) -> Path:
    """The guides for a config, trained once and cached under runs/cache/guides-<hash>/run (the training run itself);
    run fields (name, resume, runs_dir) do not enter the key."""
    from alignment.cache import cached_artifact
    from alignment.sft import starting_policy
    from alignment.world import world_artifact

    # Inputs resolve against the caller's runs_dir before the build, which runs inside the cache directory.
    world = cfg.data or str(world_artifact(cfg.world, cfg.runs_dir))
    policy = str(starting_policy(cfg.policy, cfg.sft, cfg.world, cfg.runs_dir, data=cfg.data))
    key = replace(cfg, name=None, resume=False, runs_dir="")
    build = lambda out: main(replace(cfg, data=world, policy=policy, runs_dir=str(out), name="run", resume=False))
    return cached_artifact("guides", key, build, runs_dir=cfg.runs_dir) / "run"


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(GuidesConfig, main)
