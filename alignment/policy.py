"""The base policy every later stage starts from: supervised fine-tuning on persona-world dialogues, cached.

    python -m alignment.sft config=sft_world.yaml                  # tiny Llama from scratch, ~5 min on 2 CPU cores
    python -m alignment.sft model.preset=null model.name_or_path=<hf model or dir> lr=2e-5
    python -m alignment.sft config=real/sft.yaml                   # SmolLM2-135M-Instruct, LoRA, on real-format pairs

Data: the world's `dialogues` (system turn = RAG persona statements, sometimes with a user's stated preferences;
user turn = a query; assistant turn = a world response in a mix of styles). The loss is next-token cross-entropy
on response tokens only (DESIGN.md: with the loss on responses the copy-the-slot-value skill appears after ~1,000
steps instead of ~2,000). Any Hugging Face causal LM trains through the same loop with its own tokenizer and chat
template; the tiny default is a Llama built from config for the world tokenizer.

With `pairs` (real preference data through `alignment.adapters`: PRISM, PersonalLLM, FSPO Roleplay/ELIX/Review)
the examples are each train user's prompt -> chosen reply instead, and the held-out check is the per-token NLL of
the test users' chosen replies before and after training; the world's oracle summary is skipped (one log line).

The run ends with a quality summary by the world's oracle on held-out queries, sampled at temperature 1: how many
samples parse as world sentences, how many answer the asked slot with the statement in context, and how spread
the samples are across attribute profiles (results.json). The trained policy is `ckpt/step_*/model` (HF format;
a LoRA run's is an adapter directory, which `policy=` and `ModelConfig.name_or_path` load merged).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment.adapters import read_adapter, split_users
from alignment.cache import artifact_dir, cached_artifact, is_complete
from alignment.config import AdapterData, ConfigError, ModelConfig
from alignment.model_sources import model_path
from alignment.models import load_causal_lm, load_tokenizer, pretrained_path
from alignment.oracle import eval_prompts, response_quality
from alignment.runs import Run, seed_everything
from alignment.sampling import sample_responses
from alignment.training import batch_indices, collate, encode, final_model, lr_lambda
from alignment.world import WorldSpec, load_world, world_artifact

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    seed: int = 0
    name: str | None = None  # run name; default sft-<timestamp>
    resume: bool = False  # continue the run `name` from its last checkpoint
    runs_dir: str = "runs"
    world: WorldSpec = field(default_factory=WorldSpec)  # built and cached under runs/cache/ if missing
    data: str | None = None  # an existing world directory to train on instead of `world`
    pairs: AdapterData | None = None  # real-format pairs (prompt -> chosen) instead of the world; pretrained models
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        preset="llama", hidden_size=128, num_layers=3, num_heads=4, intermediate_size=384, max_positions=512))
    steps: int = 2500  # measured: 97.7% valid samples, 75% answer the asked slot (the 3-layer, 128-wide default)
    batch_size: int = 32
    lr: float = 3e-3  # peak; linear warmup then cosine decay to 10%
    warmup: int = 100
    weight_decay: float = 0.0
    max_length: int = 384  # longer examples are dropped (and counted); LCM prompts of 60 statements reach ~370
    checkpoint_every: int = 500
    log_every: int = 50
    eval_samples: int = 256  # held-out queries sampled at temperature 1 for the closing summary
    max_new_tokens: int = 96
    eval_batch_size: int = 8  # micro-batch of the held-out NLL (`pairs` runs): bounds memory with a 49k vocabulary


def load_dialogues(cfg: SFTConfig) -> tuple[Path, dict]:
    path = Path(cfg.data) if cfg.data else world_artifact(cfg.world, cfg.runs_dir)
    return path, load_world(path)


def pair_dialogues(data: AdapterData, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) SFT dialogues from real-format pairs: each user's prompt -> chosen reply, users split by
    `data.users` (`adapters.split_users`); held out = the test users'."""
    splits = split_users(read_adapter(data).pairs, data.users, seed)
    as_dialogues = lambda split: [{"prompt": p.prompt, "response": p.chosen}
                                  for pairs in splits[split].values() for p in pairs]
    return as_dialogues("train"), as_dialogues("test")


@torch.no_grad()
def held_out_nll(model, tokenizer, examples: list[tuple[list[int], list[int]]], batch_size: int) -> float:
    """Mean per-token NLL of the response tokens (EOS included), in micro-batches of `batch_size` examples."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[i:i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum").item()
        tokens += int((labels != -100).sum())
    model.train(was_training)
    return total / max(tokens, 1)


def evaluate_policy(model, tokenizer, world: dict, n: int, seed: int, max_new_tokens: int) -> dict:
    """Oracle quality of samples at temperature 1 on held-out queries, relevant statement in context."""
    examples = eval_prompts(world, n, seed)
    responses = sample_responses(model, tokenizer, [m for _, _, m in examples], temperature=1.0,
                                 max_new_tokens=max_new_tokens, seed=seed)
    return response_quality(examples, [r[0] for r in responses])


def train_policy(cfg: SFTConfig) -> Path:
    # --- setup
    run = Run.start(cfg, "sft", runs_dir=cfg.runs_dir, name=cfg.name, resume=cfg.resume)
    seed_everything(cfg.seed)
    if cfg.pairs is None:
        world_path, world = load_dialogues(cfg)
        run.add_meta("world", str(world_path))
        tokenizer = load_tokenizer(pretrained_path(cfg.model) or world_path / "tokenizer")
        dialogues, held = world["dialogues"], []
    else:
        if pretrained_path(cfg.model) is None:
            raise ConfigError("pairs: real-format data needs a pretrained model (model.preset: smollm2-135m-instruct "
                              "or model.name_or_path), not the world preset")
        log.info("sft: %s pairs from %s (prompt -> chosen); the world's oracle summary is world-bound and skipped",
                 cfg.pairs.adapter, cfg.pairs.source)
        world = None
        tokenizer = load_tokenizer(pretrained_path(cfg.model))
        dialogues, held = pair_dialogues(cfg.pairs, cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer)
    log.info("policy: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    # --- data
    examples, dropped = encode(tokenizer, dialogues, cfg.max_length)
    if not examples:
        raise ConfigError(f"max_length: all {dropped} examples are longer than {cfg.max_length} tokens")
    held_examples = encode(tokenizer, held, cfg.max_length)[0]
    run.add_meta("examples", {"kept": len(examples), "dropped_too_long": dropped, "held_out": len(held_examples)})
    nll_before = held_out_nll(model, tokenizer, held_examples, cfg.eval_batch_size) if held_examples else None

    # --- optimizer, schedule; the data order is a function of (seed, step), so resume needs no sampler state
    lengths = np.array([len(p) + len(r) for p, r in examples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, cfg.steps))
    state = run.load_checkpoint(model, optimizer, scheduler) if cfg.resume else None
    start = state["step"] if state else 0

    # --- loop
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="sft", initial=start, total=cfg.steps)
    for step in bar:
        idx = batch_indices(lengths, cfg.batch_size, step, cfg.seed)
        batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}
        loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0:
            run.log(step + 1, loss=loss.item(), grad_norm=grad_norm.item(), lr=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            run.save_checkpoint(step + 1, model, optimizer, scheduler, tokenizer=tokenizer)
    train_seconds = time.time() - t0

    # --- closing summary: the world's oracle, or the held-out NLL of real-format pairs
    if world is None:
        quality = {"held_out_nll": {"before": nll_before, "after": held_out_nll(model, tokenizer, held_examples,
                                                                              cfg.eval_batch_size)
                                    if held_examples else None}, "train_seconds": train_seconds}
        print(f"sft: {cfg.steps} steps in {train_seconds:.0f}s; held-out chosen-reply NLL per token "
              f"{quality['held_out_nll']['before']} -> {quality['held_out_nll']['after']}")
        run.finish({"held_out": quality, "policy": str(final_model(run.dir).relative_to(run.dir))})
        return run.dir
    quality = evaluate_policy(model, tokenizer, world, cfg.eval_samples, cfg.seed, cfg.max_new_tokens)
    quality["train_seconds"] = train_seconds
    run.log(cfg.steps, **{f"eval/{k}": v for k, v in quality.items()})
    print(f"sft: {cfg.steps} steps in {train_seconds:.0f}s; held-out samples at T=1: {quality['valid']:.1%} valid, "
          f"{quality['answered']:.1%} answer the asked slot, {quality['contradicted']:.1%} contradict, "
          f"{quality['profiles']} profiles (largest {quality['top_profile_share']:.1%})")
    # Relative to the run directory: cached runs are built in a temporary directory and renamed.
    run.finish({"oracle": quality, "policy": str(final_model(run.dir).relative_to(run.dir))})
    return run.dir


# Bumped when the same config trains a different policy (2: length-grouped batches), so no stale cache is reused.
SFT_FORMAT = 2


def policy_artifact(cfg: SFTConfig) -> Path:
    """The SFT policy for a config, trained once and cached under runs/cache/sft-v<SFT_FORMAT>-<hash>/ (the training
    run is kept inside it as `run/`); run fields (name, resume, runs_dir) do not enter the key."""
    world = cfg.data or str(world_artifact(cfg.world, cfg.runs_dir))
    key = replace(cfg, name=None, resume=False, runs_dir="")
    build = lambda out: train_policy(replace(cfg, data=world, runs_dir=str(out), name="run", resume=False))
    artifact = cached_artifact(f"sft-v{SFT_FORMAT}", key, build, runs_dir=cfg.runs_dir)
    return final_model(artifact / "run")


def cached_policy(runs_dir: str | Path = "runs") -> Path | None:
    """The default world's SFT policy if `policy_artifact` has cached it already (nothing is trained), else None:
    what the benchmarks time when it is there."""
    key = replace(SFTConfig(), name=None, resume=False, runs_dir="")  # policy_artifact's key for the default world
    cached = artifact_dir(f"sft-v{SFT_FORMAT}", key, runs_dir=runs_dir)
    return final_model(cached / "run") if is_complete(cached) else None


def starting_policy(policy: str | None, sft: SFTConfig, world: WorldSpec, runs_dir: str,
                    data: str | None = None) -> Path:
    """The policy a stage starts from: `policy` when given, else the SFT policy of `world` (or of the world directory
    `data`) trained by `sft`, built once and cached. Every stage resolves its default here, so they share one cache
    key and the SFT policy is trained once for all of them."""
    if policy:
        return Path(model_path(policy))
    return policy_artifact(replace(sft, world=world, data=data or sft.data, runs_dir=runs_dir))


