"""FSPO: few-shot preference optimization, each user a task (Singh et al., arXiv:2502.19312).

    python -m alignment.fspo config=fspo.yaml                          # persona world: train, then evaluate
    python -m alignment.fspo config=fspo.yaml describe=true            # the user-description variant
    python -m alignment.fspo config=fspo.yaml format=fspo policy=<hf model> data.adapter=fspo_roleplay \
        data.source=sher222/persona-iterative-responses                # the paper's data, any HF causal LM
    python -m alignment.fspo config=real/fspo.yaml                     # SmolLM2-135M-Instruct, LoRA, FSPO-format data

The policy reads k labelled pairs of one user in its prompt (the shots) and is trained with DPO or IPO on another
pair of the same user (paper eq. 5); the frozen reference sees the same context. Over many users it learns to
personalize from a few examples, with no user embedding and no test-time gradient step. Pipeline:

1. Users split user-disjoint (the world's train/val/test; adapter data by seeded fractions `data.users`).
2. Episodes per user (`alignment.shots`): k ~ U{k_min..k_max} per episode, shots rendered into the prompt through
   the chat template, whole shots dropped to fit `max_length`; dropped shots and examples are counted.
3. Targets: the user's own labelled pair (`targets=pairs`, off-policy); `samples` responses of the stage-1 policy
   to the few-shot prompt ranked by the user's true reward, best vs worst (`targets=on_policy`); or `samples`
   responses of the starting policy with the user's stated preferences in its system turn, ranked the same way
   (`targets=persona`: FSPO's synthetic pipeline, a persona-conditioned generator and a labeller that knows the
   user; the few-shot policy learns to write them from the shots alone, and stage 1 trains on them). The last two
   need the world (its oracle is the labeller); train users' personas are used, never a held-out user's.
4. Reference log-probs computed once and cached in the run (ref_logps.safetensors); the few-shot prompt is run
   once per pair and its KV cache shared by chosen and rejected (`shared_prompt_logps`).
5. DPO (sigmoid) or IPO (`alignment.losses`; IPO on length-averaged log-probs) over a seeded order, with
   length-bucketed batches; checkpoints and exact resume as in alignment/policy.py.
6. Evaluation (`alignment.fspo_eval`): held-out users, win rate against the base policy under each user's true
   reward, with the baselines the paper compares (few-shot prompting, population DPO/IPO, oracle persona).

`describe=true` is the paper's user-description variant (v1 "COT", v2 "RAT"): the completion is a short
description of the user followed by the response; chosen carries the user's own description, rejected the
description of another user from the same template (the reference's Review data used two templates, a shortcut,
apc_fspo.md §2.2). Differences from the reference code (§2.8): user-level splits, variable k, no truncation of the
question or of all target tokens, cached reference log-probs, shared prompt forward, seeded data order.
`format=diff` renders each shot as the words where its two responses differ (~35 tokens instead of ~70).

What was measured on the persona world (the policy reads little from its shots): docs/experiments/fspo.md.

Files: episodes.jsonl (records.Episode as trained on), persona_episodes.jsonl (targets=persona: the teacher's ranked
targets, read back on resume), pref_ft/ (stage 1), ref_logps.safetensors, ckpt/, metrics.jsonl, samples.jsonl,
results.json, results.md and win_rate_vs_k.png (the evaluation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from alignment.config import AdapterData, LoraConfig
from alignment.fspo_eval import EvalSettings, evaluate_world, true_reward_fn
from alignment.model_sources import model_path
from alignment.policy import SFTConfig
from alignment.sampling import sample_responses_by_length, with_system_suffix
from alignment.shots import Users, adapter_users, world_users
from alignment.world import WorldSpec

log = logging.getLogger(__name__)


@dataclass
class FSPOConfig:
    seed: int = 0
    name: str | None = None  # run name; default fspo-<timestamp>
    resume: bool = False  # continue the run `name` from its last checkpoint
    runs_dir: str = "runs"
    world: WorldSpec = field(default_factory=WorldSpec)
    sft: SFTConfig = field(default_factory=SFTConfig)  # how the starting policy is trained when `policy` is unset
    policy: str | None = None  # HF directory (or hub id) of the starting policy; default: the cached SFT policy
    world_dir: str | None = None  # an existing world directory to use instead of building `world`
    data: AdapterData | None = None  # real data through an adapter; None: the persona world
    format: Literal["world", "fspo", "diff"] = "world"  # shot rendering (alignment.shots.FORMATS)
    k_min: int = 0  # shots per training episode are drawn from [k_min, k_max]
    k_max: int = 8
    episodes_per_user: int = 8  # training episodes per train user
    targets_per_shots: int = 4  # episodes per drawn shot set: they share one forward of the few-shot prefix
    val_episodes_per_user: int = 2  # episodes per val/test user for the held-out implicit-reward accuracy
    targets: Literal["pairs", "on_policy", "persona"] = "pairs"  # labelled pair, or ranked samples (step 3 above)
    samples: int = 4  # on_policy/persona: responses sampled per episode; chosen/rejected = best/worst by true reward
    describe: bool = False  # user-description variant: the completion is "<description> <response>"
    loss: Literal["sigmoid", "ipo"] = "ipo"
    beta: float = 0.1  # IPO on per-token averages targets a margin of 1 / (2 beta) nats per token
    sft_weight: float = 0.0  # + this times the per-token NLL of chosen (RPO, arXiv:2404.19733)
    sft_epochs: int = 0  # stage 1, the paper's: epochs of NLL on the chosen responses given the shots ("Pref-FT")
    sft_lr: float = 3e-3  # stage 1 peak lr (warmup then cosine, as alignment/policy.py); the world policy's value
    lora: LoraConfig | None = None  # None: full fine-tuning; LoRA for a pretrained policy (one adapter per stage)
    lr: float = 3e-4  # peak; linear decay to 0
    epochs: int = 2
    batch_size: int = 16
    max_length: int = 768  # prompt + completion tokens; whole shots are dropped to fit
    temperature: float = 1.0  # on_policy/persona sampling
    max_new_tokens: int = 96  # on_policy/persona sampling (world responses: 33 tokens on average, 71 at most)
    log_every: int = 10
    checkpoint_every: int = 100
    evaluate: bool = True  # run the held-out-user evaluation at the end (false inside the population baseline)
    eval: EvalSettings = field(default_factory=EvalSettings)


# --- setup: prerequisites and data ------------------------------------------------------------------------------
def prerequisites(cfg: FSPOConfig) -> tuple[Path | None, Path]:
    """(world dir or None for adapter data, starting policy dir), building and caching whatever is missing."""
    from alignment.policy import starting_policy
    from alignment.world import world_artifact

    if cfg.data is not None:
        if cfg.policy is None:
            raise ValueError("policy: adapter data needs a policy (an HF causal LM directory or hub id)")
        return None, Path(model_path(cfg.policy))
    world = Path(cfg.world_dir) if cfg.world_dir else world_artifact(cfg.world, cfg.runs_dir)
    return world, starting_policy(cfg.policy, cfg.sft, cfg.world, cfg.runs_dir, data=cfg.world_dir)


def on_policy_targets(cfg: FSPOConfig, episodes: list, policy, tokenizer, reward,
                      persona: dict[str, str] | None = None) -> tuple[list, int]:
    """Replace each episode's target pair by the best and worst of `samples` policy responses, ranked by the user's
    true reward `reward(user_id, prompt_id, text)`. The policy answers the few-shot prompt, first fitted to leave
    room for `max_new_tokens` (whole shots dropped, as in training); with `persona` (user -> stated preferences) it
    answers the target's own prompt with the user's persona in the system turn instead, and the shots are kept as
    drawn. Episodes whose samples all tie are dropped (returned count)."""
    from alignment.shots import FORMATS, fit_prompt, kept_shots

    fmt, budget = FORMATS[cfg.format], cfg.max_length - cfg.max_new_tokens - 1
    if persona is None:
        fitted = [(e, fit_prompt(tokenizer, fmt, e.shots, e.target.prompt, cfg.describe, budget)) for e in episodes]
        kept_episodes = [kept_shots(e, f[1]) for e, f in fitted if f is not None]
        prompts = [fmt.prompt(e.shots, e.target.prompt, cfg.describe) for e in kept_episodes]
    else:
        kept_episodes = episodes
        prompts = [with_system_suffix(e.target.prompt, persona[e.user_id]) for e in episodes]
    samples = sample_responses_by_length(policy, tokenizer, prompts, n=cfg.samples, temperature=cfg.temperature,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    kept, ties = [], len(episodes) - len(kept_episodes)
    for episode, responses in zip(kept_episodes, samples, strict=True):
        rewards = [reward(episode.user_id, episode.target.prompt_id, r) for r in responses]
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        if rewards[best] == rewards[worst]:
            ties += 1
            continue
        target = replace(episode.target, chosen=responses[best], rejected=responses[worst],
                         chosen_reward=rewards[best], rejected_reward=rewards[worst])
        kept.append(replace(episode, target=target))
    return kept, ties


def other_description(persona: dict[str, str], episode, seed: int) -> str:
    """The description of another user (a different text), the rejected completion's description. Drawn from a
    generator seeded by the episode's content, so re-encoding a saved episode (resume) draws the same one."""
    import zlib

    user, target = episode.user_id, episode.target
    others = sorted({p for u, p in persona.items() if u != user and p != persona[user]})
    if not others:
        return ""
    key = zlib.crc32(f"{user}|{target.prompt_id}|{target.chosen}|{target.rejected}".encode())
    return others[int(np.random.default_rng([seed, key]).integers(len(others)))]


def encode_episodes(cfg: FSPOConfig, episodes: list, tokenizer, persona: dict[str, str]) -> tuple[list, dict]:
    """Fit every episode to `max_length` (alignment.shots.fit_episode); returns the kept (Episode as trained on,
    Encoded) pairs and counts of dropped examples, dropped shots and cut completions."""
    from alignment.shots import FORMATS, fit_episode, kept_shots

    fmt = FORMATS[cfg.format]
    kept, counts = [], {"examples": len(episodes), "examples_dropped": 0, "shots_dropped": 0, "completions_cut": 0}
    for episode in episodes:
        descriptions = None
        if cfg.describe:
            descriptions = (persona[episode.user_id], other_description(persona, episode, cfg.seed))
        enc = fit_episode(tokenizer, fmt, episode, cfg.max_length, cfg.describe, descriptions)
        if enc is None:
            counts["examples_dropped"] += 1
            continue
        counts["shots_dropped"] += len(episode.shots) - enc.shots
        counts["completions_cut"] += enc.cut
        kept.append((kept_shots(episode, enc.shots), enc))
    return kept, counts


# --- batches and log-probs --------------------------------------------------------------------------------------
def shot_groups(episodes: list) -> list[list[int]]:
    """Indices of consecutive episodes of one user with the same shots: they share their prompt up to the target's
    own turns (`shots.sample_episodes(targets_per_shots=...)` makes them, the budget may split them)."""
    groups: list[list[int]] = []
    for i, e in enumerate(episodes):
        if groups and (episodes[groups[-1][0]].user_id, episodes[groups[-1][0]].shots) == (e.user_id, e.shots):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest common prefix of token lists, leaving every prompt at least its last token."""
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts[1:]):
            return i
    return n


def collate(groups: list[list], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of groups of Encoded episodes that share a prompt prefix.

    prefix_ids, prefix_mask (G, P): each group's shared prefix, left-padded, so it ends in column P-1.
    row_ids, row_mask (2N, R): per episode two rows, [rest of prompt + chosen] and [rest of prompt + rejected],
    right-padded, in the order [chosen_0, rejected_0, chosen_1, ...] over the groups' episodes; each row starts
    with at least one prompt token, so every completion token is predicted inside the row.
    score_mask (2N, R): 1 on completion tokens. row_group (2N,): the group (prefix) of each row.
    """
    prefixes, rows, scores, owner = [], [], [], []
    for g, group in enumerate(groups):
        cut = common_prefix([e.prompt for e in group])
        prefixes.append(group[0].prompt[:cut])
        for e in group:
            for completion in (e.chosen, e.rejected):
                rows.append(e.prompt[cut:] + completion)
                scores.append([0] * (len(e.prompt) - cut) + [1] * len(completion))
                owner.append(g)
    P, R = max(len(p) for p in prefixes), max(len(r) for r in rows)
    batch = {"prefix_ids": torch.full((len(groups), P), pad_id), "prefix_mask": torch.zeros((len(groups), P)),
             "row_ids": torch.full((len(rows), R), pad_id), "row_mask": torch.zeros((len(rows), R)),
             "score_mask": torch.zeros((len(rows), R)), "row_group": torch.tensor(owner)}
    for g, prefix in enumerate(prefixes):
        if prefix:
            batch["prefix_ids"][g, P - len(prefix):] = torch.tensor(prefix)
            batch["prefix_mask"][g, P - len(prefix):] = 1
    for r, (ids, score) in enumerate(zip(rows, scores, strict=True)):
        batch["row_ids"][r, :len(ids)] = torch.tensor(ids)
        batch["row_mask"][r, :len(ids)] = 1
        batch["score_mask"][r, :len(ids)] = torch.tensor(score, dtype=torch.float)
    return {k: v.long() for k, v in batch.items()}


def shared_prompt_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected, running each shared prompt prefix once.

    The prefixes (G, P) go through the model once; their KV caches are gathered for the rows (2N, R) that extend
    them (chosen and rejected of each episode, and the episodes of one shot set), which attend to the prefix and to
    themselves. With a 600-token few-shot prefix, 4 targets per shot set and ~60-token rows this runs ~25% of the
    tokens of the concatenated (2N, P + R) forward that the reference code runs (apc_fspo.md §2.8 item 4).
    Gradients flow through the cache into the prefix. Equal to `logps.pair_logps` on the same pairs
    (tests/test_fspo.py). Returns chosen (N,), rejected (N,) float32 sums; `token_counts` gives the lengths.
    """
    from alignment.logps import sequence_logps

    prefix_mask, rows, owner = batch["prefix_mask"], batch["row_ids"], batch["row_group"]
    cache, lengths = None, prefix_mask.sum(-1)  # (G,)
    if prefix_mask.shape[1] > 0 and bool(lengths.any()):
        positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens at 0..len-1
        cache = model(input_ids=batch["prefix_ids"], attention_mask=prefix_mask, position_ids=positions,
                      use_cache=True).past_key_values
        cache.batch_select_indices(owner)  # (G, ...) -> (2N, ...): each row gets its group's prefix
    mask = torch.cat([prefix_mask[owner], batch["row_mask"]], dim=1) if cache is not None else batch["row_mask"]
    positions = lengths[owner][:, None] + torch.arange(rows.shape[1], device=rows.device)  # (2N, R)
    logits = model(input_ids=rows, attention_mask=mask, past_key_values=cache, position_ids=positions,
                   use_cache=cache is not None).logits  # (2N, R, V)
    logps = sequence_logps(logits, rows, batch["score_mask"])  # (2N,); column 0 is a prompt token, never scored
    return logps[0::2], logps[1::2]


def token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 2) completion lengths of chosen and rejected, to turn summed log-probs into per-token averages."""
    return batch["score_mask"].sum(-1).view(-1, 2).float()


def bucketed_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Seeded batches of similar length: shuffle, sort each window of 8 batches by length, cut into batches,
    shuffle the batches. On the world's k in [0, 8] this halves the padded prompt tokens of random batches."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = 8 * batch_size
    batches = []
    for i in range(0, len(perm), window):
        chunk = sorted(perm[i:i + window], key=lambda j: lengths[j])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def batches_of(groups: list[list[int]], encoded: list, pad_id: int):
    """batch(group indices) -> (collated tensors, the episode indices of its rows in order)."""
    def make(idx: list[int]):
        episode_idx = [i for g in idx for i in groups[g]]
        return collate([[encoded[i] for i in groups[g]] for g in idx], pad_id), episode_idx
    return make


@torch.no_grad()
def reference_logps(model, episodes: list, encoded: list, pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, 2) summed chosen/rejected log-probs under the frozen reference, computed once before training."""
    model.eval()
    groups = shot_groups(episodes)
    make = batches_of(groups, encoded, pad_id)
    out = torch.zeros((len(encoded), 2))
    per_batch = max(1, batch_size // max(len(g) for g in groups)) if groups else 1
    for i in range(0, len(groups), per_batch):
        batch, idx = make(list(range(i, min(len(groups), i + per_batch))))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out[idx] = torch.stack(shared_prompt_logps(model, batch), dim=-1).float().cpu()
    return out


def lengths_of(encoded: list) -> torch.Tensor:
    """(N, 2) completion lengths of chosen and rejected."""
    return torch.tensor([[len(e.chosen), len(e.rejected)] for e in encoded], dtype=torch.float)


def step_loss(cfg: FSPOConfig, policy, batch: dict, ref: torch.Tensor):
    """Mean DPO/IPO loss (+ sft_weight * per-token NLL of chosen) of one batch, the per-pair rewards, the NLL.

    `ref` (B, 2) are the cached summed reference log-probs; losses that expect per-token averages
    (`losses.LENGTH_AVERAGED`, IPO) get policy and reference divided by the completion lengths."""
    from alignment.losses import LENGTH_AVERAGED, LOSSES

    chosen, rejected = shared_prompt_logps(policy, batch)
    counts = token_counts(batch)  # (B, 2)
    scale = counts if LENGTH_AVERAGED[cfg.loss] else torch.ones_like(counts)
    losses, rc, rr = LOSSES[cfg.loss](chosen / scale[:, 0], rejected / scale[:, 1], ref[:, 0] / scale[:, 0],
                                      ref[:, 1] / scale[:, 1], cfg.beta)
    nll = -(chosen / counts[:, 0]).mean()  # RPO (arXiv:2404.19733 eq. 2): keeps the chosen likely, not only
    return losses.mean() + cfg.sft_weight * nll, rc, rr, nll.detach()  # more likely than the rejected


@torch.no_grad()
def implicit_accuracy(policy, ref_model, episodes: list, encoded: list, pad_id: int, batch_size: int,
                      average: bool) -> dict:
    """Held-out pairs: how often the implicit reward log pi/pi_ref ranks chosen above rejected (ties count half),
    and the mean margin (per token when `average`). The reference is 50% by construction."""
    if not encoded:
        return {"pairs": 0}
    policy.eval()
    mine = reference_logps(policy, episodes, encoded, pad_id, batch_size)
    ref = reference_logps(ref_model, episodes, encoded, pad_id, batch_size)
    scale = lengths_of(encoded) if average else torch.ones_like(mine)
    delta = (mine - ref) / scale  # (N, 2)
    margin = delta[:, 0] - delta[:, 1]
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {"pairs": len(encoded), "accuracy": wins.mean().item(), "margin": margin.mean().item()}


def pref_ft_stage(cfg: FSPOConfig, run, base, episodes: list, tokenizer, persona: dict[str, str]):
    """Stage 1 of the paper's recipe (apc_fspo.md §2.1): NLL of the chosen response given the few-shot prompt, for
    `sft_epochs` over the episodes' labelled pairs, on a copy of `base`. It teaches the policy to read shots at
    all (the world SFT policy has never seen one: 3% of its samples parse after 8 shots); the reference of
    stage 2 is its result. Saved as `pref_ft/` in the run and loaded from there on resume."""
    import copy

    from alignment.models import save_model
    from alignment.training import lr_lambda as warmup_cosine

    if run.path("pref_ft").exists():
        return load_policy(run.path("pref_ft"), positions(cfg))[1]
    kept = encode_episodes(cfg, episodes, tokenizer, persona)[0]
    chosen_only = [replace(enc, rejected=[]) for _, enc in kept]  # rejected rows score nothing (empty)
    groups = shot_groups([e for e, _ in kept])
    make_batch = batches_of(groups, chosen_only, tokenizer.pad_token_id)
    model = with_adapter(copy.deepcopy(base), cfg.lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    per_batch = max(1, cfg.batch_size // cfg.targets_per_shots)
    order = torch.Generator().manual_seed(cfg.seed + 2)
    plans = [bucketed_order([len(chosen_only[g[0]].prompt) for g in groups], per_batch, order)
             for _ in range(cfg.sft_epochs)]
    total = sum(len(p) for p in plans)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(1, total // 10), total))
    for step, idx in enumerate((i for plan in plans for i in plan), start=1):
        batch = {k: v.to(model.device) for k, v in make_batch(idx)[0].items()}
        chosen, _ = shared_prompt_logps(model, batch)
        nll = -(chosen / token_counts(batch)[:, 0]).mean()
        nll.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == total:
            # logged at steps <= 0, before stage 2's, so that a resumed stage 2 keeps these lines
            run.log(step - total, **{"pref_ft/nll": nll.item(), "pref_ft/lr": scheduler.get_last_lr()[0]})
    save_model(model.eval(), tokenizer, run.path("pref_ft"))  # merged, so stage 2 attaches a fresh adapter
    return model.merge_and_unload() if cfg.lora is not None else model


def with_adapter(model, lora: LoraConfig | None):
    """`model` with a fresh LoRA adapter when `lora` is set (only the adapter trains), else `model` itself."""
    from alignment.models import attach_lora

    return model if lora is None else attach_lora(model, lora)


def ranked_targets(cfg: FSPOConfig, run, episodes: list, policy, tokenizer, world: dict,
                   persona: dict[str, str] | None = None) -> list:
    """`on_policy_targets` with the world's true reward, episodes that tie counted in the run's meta. Persona
    targets are written to `persona_episodes.jsonl` and read back on resume (stage 1 trains on them)."""
    from alignment.records import Episode, read_jsonl, write_jsonl

    cache = run.path("persona_episodes.jsonl") if persona is not None else None
    if cache is not None and cache.exists():
        return read_jsonl(cache, Episode)
    kept, ties = on_policy_targets(cfg, episodes, policy, tokenizer, true_reward_fn(world), persona)
    run.add_meta(f"{cfg.targets}_dropped", ties)
    if not kept:
        raise RuntimeError(f"targets={cfg.targets}: the samples of all {len(episodes)} episodes tie in true reward "
                           "(an untrained policy writes only invalid text); train the starting policy longer")
    if cache is not None:
        write_jsonl(cache, kept)
    return kept


def lr_lambda(total: int):
    return lambda step: 1.0 - step / max(total, 1)


# --- entry point ------------------------------------------------------------------------------------------------
def main(cfg: FSPOConfig) -> Path:
    import copy

    from tqdm.auto import tqdm

    from alignment.files import json_digest
    from alignment.losses import LENGTH_AVERAGED
    from alignment.records import Episode, read_jsonl, write_jsonl
    from alignment.runs import Run, seed_everything
    from alignment.shots import sample_episodes

    # --- setup
    if not 0 <= cfg.k_min <= cfg.k_max:
        raise ValueError(f"k_min, k_max: need 0 <= k_min <= k_max, got {cfg.k_min}, {cfg.k_max}")
    if cfg.targets != "pairs" and cfg.data is not None:
        raise ValueError(f"targets={cfg.targets} needs the world's true rewards; adapter data has labelled pairs only")
    run = Run.start(cfg, "fspo", runs_dir=cfg.runs_dir, name=cfg.name, resume=cfg.resume)
    seed_everything(cfg.seed)
    world_dir, policy_dir = prerequisites(cfg)
    run.add_meta("policy", str(policy_dir))
    world = None
    if world_dir is not None:
        from alignment.world import load_world

        world = load_world(world_dir)
        run.add_meta("world", str(world_dir))
        users = world_users(world)
    else:
        users = adapter_users(cfg.data, cfg.seed)
    run.add_meta("users", {s: len(p) for s, p in users.shots.items()})
    tokenizer, base = load_policy(policy_dir, positions(cfg))
    average = LENGTH_AVERAGED[cfg.loss]
    pad = tokenizer.pad_token_id

    # --- data: episodes per user (seeded); stage 1 (Pref-FT) on their labelled pairs; the targets of stage 2 (the
    # labelled pairs, or ranked samples of the stage-1 policy); the token budget. Each result is written into the
    # run once and read back on resume.
    rng = np.random.default_rng(cfg.seed)
    episodes = sample_episodes(users.shots["train"], cfg.episodes_per_user, cfg.k_min, cfg.k_max, rng,
                               targets_per_shots=cfg.targets_per_shots)
    if cfg.targets == "persona":  # the teacher's targets come first: stage 1 trains on them
        episodes = ranked_targets(cfg, run, episodes, base, tokenizer, world, users.persona)
    start = pref_ft_stage(cfg, run, base, episodes, tokenizer, users.persona) if cfg.sft_epochs else base
    if not run.path("episodes.jsonl").exists():
        if cfg.targets == "on_policy":
            episodes = ranked_targets(cfg, run, episodes, start, tokenizer, world)
        kept, counts = encode_episodes(cfg, episodes, tokenizer, users.persona)
        run.add_meta("budget", counts)
        log.info("episodes: %s", counts)
        write_jsonl(run.path("episodes.jsonl"), [e for e, _ in kept])
    episodes = read_jsonl(run.path("episodes.jsonl"), Episode)
    encoded = [enc for _, enc in encode_episodes(cfg, episodes, tokenizer, users.persona)[0]]
    groups = shot_groups(episodes)
    make_batch = batches_of(groups, encoded, pad)
    if not encoded:
        raise RuntimeError("no training episode fits max_length; raise max_length or lower k_max")
    if min(min(len(e.chosen), len(e.rejected)) for e in encoded) < 1:  # fit_episode guarantees it; never train on 0
        raise RuntimeError("an example has no target token")
    def compute_ref() -> torch.Tensor:
        t0 = time.time()
        ref = reference_logps(start, episodes, encoded, pad, cfg.batch_size)
        run.add_meta("ref_logps_seconds", time.time() - t0)
        return ref

    # (N, 2) summed over completion tokens; a resumed run reads them back while the episodes are the same
    fingerprint = {"episodes": json_digest([[e.prompt, e.chosen, e.rejected] for e in encoded]),
                   "batch_size": cfg.batch_size}
    ref = run.cached_tensor("ref_logps.safetensors", fingerprint, compute_ref)

    # --- policy, optimizer, schedule, data order (a seeded generator, checkpointed)
    policy = with_adapter(copy.deepcopy(start), cfg.lora)  # the reference is `start` too: it sees the same context
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    # a batch is `batch_size` episodes' worth of shot groups; groups are bucketed by their prompt length
    lengths = [len(encoded[g[0]].prompt) for g in groups]
    per_batch = max(1, cfg.batch_size // cfg.targets_per_shots)
    steps_per_epoch = (len(groups) + per_batch - 1) // per_batch
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total))
    order = torch.Generator().manual_seed(cfg.seed)
    state = run.load_checkpoint(policy, optimizer, scheduler, generators={"order": order}) if cfg.resume else None
    step = state["step"] if state else 0
    plan = state["plan"] if state else bucketed_order(lengths, per_batch, order)

    # --- loop: epochs of length-bucketed batches; the epoch's plan is checkpointed with the step
    policy.train()
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc="fspo")
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 and step > 0 and (state is None or state["step"] != step):
            plan = bucketed_order(lengths, per_batch, order)
        state = None
        batch, idx = make_batch(plan[i])
        batch = {k: v.to(policy.device) for k, v in batch.items()}
        loss, rc, rr, nll = step_loss(cfg, policy, batch, ref[idx].to(policy.device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            run.log(step, epoch=epoch, loss=loss.item(), nll=nll.item(), grad_norm=grad_norm.item(),
                    lr=scheduler.get_last_lr()[0],
                    reward_margin=(rc - rr).mean().item(), reward_accuracy=(rc > rr).float().mean().item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == total:
            run.save_checkpoint(step, policy, optimizer, scheduler, {"order": order, "plan": plan},
                                tokenizer=tokenizer)
    bar.close()
    train_seconds = time.time() - t0
    if cfg.lora is not None:
        policy = policy.merge_and_unload()

    # --- held-out users: implicit-reward accuracy on val users' episodes, then the full evaluation
    results = {"episodes": len(encoded), "steps": total, "train_seconds": train_seconds,
               "held_out": held_out(cfg, users, policy, start, tokenizer, average)}
    log.info("held-out users, implicit-reward accuracy: %s", results["held_out"])
    if cfg.evaluate and world is not None:
        population = population_policy(cfg, world_dir, policy_dir)
        pref_ft = start if cfg.sft_epochs else None
        results["eval"] = evaluate_world(cfg, world, tokenizer, base, policy, population, run.dir, pref_ft)
    run.finish(results)
    return run.dir


def held_out(cfg: FSPOConfig, users: Users, policy, base, tokenizer, average: bool) -> dict:
    """Implicit-reward accuracy on the val and test users (their shots in context, k = k_max; their pairs as
    targets): the held-out check that needs no true reward, so it also runs on real data."""
    from alignment.shots import sample_episodes

    out = {}
    for split in ("val", "test"):
        rng = np.random.default_rng(cfg.seed + 1)
        episodes = sample_episodes(users.shots[split], cfg.val_episodes_per_user, cfg.k_max, cfg.k_max, rng,
                                   users.targets[split], cfg.targets_per_shots)
        kept = encode_episodes(cfg, episodes, tokenizer, users.persona)[0]
        if kept:
            out[split] = implicit_accuracy(policy, base, [e for e, _ in kept], [enc for _, enc in kept],
                                           tokenizer.pad_token_id, cfg.batch_size, average)
    return out


def positions(cfg: FSPOConfig) -> int:
    """The longest sequence the policy sees: training, or the evaluation's longer test-time k."""
    return max(cfg.max_length, cfg.eval.max_length) if cfg.evaluate else cfg.max_length


def load_policy(path: Path, max_length: int):
    """(tokenizer, model) of a starting policy, fp32 as stored unless the model config says otherwise.

    A model whose position limit is below `max_length` is refused, except RoPE models: their limit is a number
    in the config, not learned weights (the tiny world policy was trained at 256 and is raised here)."""
    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_causal_lm(ModelConfig(name_or_path=str(path)), tokenizer)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and limit < max_length:
        if not getattr(model.config, "rope_parameters", None):
            raise ValueError(f"max_length={max_length} exceeds the policy's {limit} positions ({path})")
        model.config.max_position_embeddings = max_length
    return tokenizer, model


def population_policy(cfg: FSPOConfig, world_dir: Path, policy_dir: Path):
    """The population DPO/IPO baseline: the same training without user context (k = 0), cached by config; it
    trains on the same world and starting policy (passed as paths, so nothing is rebuilt inside the cache)."""
    from alignment.cache import cached_artifact
    from alignment.training import final_model

    pop = replace(cfg, k_min=0, k_max=0, describe=False, evaluate=False, name=None, resume=False)
    key = replace(pop, runs_dir="")
    build = lambda out: main(replace(pop, runs_dir=str(out), name="run", world_dir=str(world_dir),
                                     policy=str(policy_dir)))
    artifact = cached_artifact("fspo-population", key, build, runs_dir=cfg.runs_dir)
    return load_policy(final_model(artifact / "run"), positions(cfg))[1]


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(FSPOConfig, main)
