"""Persona-conditioned Bradley-Terry reward models: four ways to tell the reward who the user is, one backbone.

    python -m rewards.train config=persona_rm_controversial.yaml     # all four methods + evaluation
    python -m rewards.train config=persona_rm_consensus.yaml methods=[population,weights]
    python -m rewards.train config=real/persona_rm.yaml     # PersonalLLM fixture, SmolLM2-135M-Instruct + LoRA
    python -m rewards.train config=real/persona_rm.yaml adapter=prism data=<prism dir> \
        model.preset=null model.name_or_path=<hf model dir>                          # real data, any HF backbone

Every method is a Bradley-Terry reward model (loss -log sigmoid(r(x, y+) - r(x, y-)), research/reward_models.md
§1) on the same backbone, a sequence classifier whose score is read at the last real token (a dedicated pad
token; left and right padding give the same score). They differ in how the user enters:

    population  no user information: the baseline every personalized method must beat (PersonalRewardBench's FT RM)
    persona     the user's persona text appended to the system turn (SynthesizeMe-style FT RM + persona)
    shots       k of the user's labelled pairs in context (k ~ U{0..k_max} in training, episodes of one user),
                read without any test-time fitting; `shot_readout` picks how they enter:
                kernel (default): the head outputs a reward r and D basis rewards b; the context is the shots'
                  mean basis difference z = sum_j (b(y+_j) - b(y-_j)) / (k + 1), and a target's margin is
                  r(y+) - r(y-) + z . (b(y+) - b(y-)) (`kernel_margins`): one step of the user's BT regression from
                  zero (no personal term), what linear attention over the shots computes. Trained episodically end to
                  end, so b is learned to make that step useful.
                tokens: each shot compressed to ONE context token h(y+) - h(y-) (the backbone's last hidden states
                  over the two responses' differing tokens), fed as an input embedding in front of the
                  conversation (a GPO/ICL-style set input, §6.3 item 7); the transformer reads them by attention.
                Flipping a label negates its shot's vector in both, so the label-flip rate measures how much the
                model uses its context.
    weights     the backbone outputs D basis rewards phi; r_u = w_u . phi with per-user weights learned jointly on
                the training users (LoRe, arXiv:2504.14439), then a population prior over w fitted on them and a
                new user adapted from k pairs by MAP without retraining the backbone (`rewards/user_weights.py`)

Data: a persona world (`alignment.world`: train users' `train_context` pairs train every method; seen users are
evaluated on `train_target`, unseen users read shots from `test_context` and are evaluated on `test_target`), or
real data through `alignment.adapters` (PRISM, PersonalLLM; users are split into seen/unseen and each user's
prompts into context/target here). The run ends with the evaluation of `rewards/rm_eval.py`.

Output: runs/<name>/<method>/model (Hugging Face classifier + tokenizer), <method>/state.json (what the scorer
needs besides the weights: the prior for `weights`), results.json, results.md, accuracy_vs_k.png.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from alignment.config import ModelConfig
from alignment.sampling import with_system_suffix
from alignment.world import WorldSpec
from rewards.rm_eval import RMEvalSettings, flipped

log = logging.getLogger(__name__)

# A fresh score head starts with output std ~HEAD_SCALE instead of transformers' ~0.1 (std 0.02 x sqrt(hidden)).
# With tiny basis rewards the factorization w_u . phi starts at a saddle and picks up one direction at a time;
# measured on the controversial world, 400 steps: k=8 accuracy of `weights` 65% at std 0.02, 75% at 0.18, 77% at 0.5.
HEAD_SCALE = 2.0
SPLITS = ("train", "val", "test")


@dataclass
class PersonaRMConfig:
    kind: Literal["persona_rm"] = "persona_rm"  # picks this module in `python -m rewards.train`
    seed: int = 0
    name: str | None = None  # run name; default persona_rm-<timestamp>
    runs_dir: str = "runs"
    world: WorldSpec = field(default_factory=WorldSpec)  # built and cached under runs/cache/ if missing
    data: str | None = None  # an existing world directory; with `adapter`, the dataset (local path or hub id)
    adapter: str | None = None  # real data: prism or personal_llm (alignment.adapters), read from `data`
    tokenizer: str | None = None  # default: the pretrained model's (model.preset or name_or_path), else the world's
    test_users: float = 0.3  # adapter data: share of users held out as unseen users
    context_share: float = 0.5  # adapter data without a train/test split: share of each user's prompts as context
    simulated_users: int = 1000  # adapter personal_llm: users with Dirichlet weights over its 10 RMs (LoRe: 1000)
    methods: list[str] = field(default_factory=lambda: ["population", "persona", "shots", "weights"])
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        preset="llama", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128, max_positions=2048))
    steps: dict[str, int] = field(default_factory=lambda: {"population": 400, "persona": 800, "shots": 600,
                                                            "weights": 800})  # optimizer steps per method
    batch_pairs: int = 32  # pairs per step of population, persona and weights
    episode_users: int = 8  # users per step of shots
    episode_targets: int = 4  # target pairs per user and step, scored against that user's shots
    lr: float = 3e-3  # peak; linear warmup then cosine decay to 10%
    warmup: int = 30
    max_length: int = 256  # tokens of a conversation; longer prompts are cut from the left
    k_max: int = 16  # shots: k ~ U{0..k_max} in training
    swap_users: float = 0.0  # shots: share of training episodes with every label swapped (SPL's opposing users)
    shot_readout: Literal["kernel", "tokens"] = "kernel"  # shots: how the context enters (module docstring)
    shot_tokens: int = 48  # shots: each side of a shot keeps at most this many differing tokens
    basis: int = 8  # weights, and shots' kernel readout: D, the number of basis rewards
    user_scale: float = 1.0  # weights: std of a user's deviation from the mean weights while training
    user_lr: float = 0.1  # weights: peak lr of the user weights (Adam moves a weight ~lr per step; margins need ~5)
    prior_components: int = 1  # weights: Gaussians in the population prior (1: N(mu, Sigma))
    log_every: int = 50
    evaluation: RMEvalSettings = field(default_factory=RMEvalSettings)


Config = PersonaRMConfig  # the name `rewards.train` dispatches to


# --- data ---------------------------------------------------------------------------------------------------------
@dataclass
class PreferenceData:
    """Labelled pairs grouped by user and part, the one structure every method and the evaluation read.

    users: user_id -> {"persona": str, "split": train | val | test, "temperature": BT rationality or None}.
    pairs: (user_id, "context" | "target") -> PreferencePair dicts. Context pairs are shots and training data;
    target pairs are on prompts disjoint from them.
    """

    users: dict[str, dict]
    pairs: dict[tuple[str, str], list[dict]]
    source: str
    stats: dict = field(default_factory=dict)  # the world's statistics (world.json) when the data is a world

    def user_ids(self, split: str) -> list[str]:
        return [u for u, row in self.users.items() if row["split"] == split and (u, "context") in self.pairs]


def from_world(world: dict) -> PreferenceData:
    """The persona world's users and pairs; a pair's split `<user split>_<part>` names its group."""
    users = {u["user_id"]: {"persona": u["persona"], "split": u["split"], "temperature": u["temperature"]}
             for u in world["users"]}
    pairs: dict[tuple[str, str], list[dict]] = {}
    for p in world["pairs"]:
        pairs.setdefault((p["user_id"], p["split"].rsplit("_", 1)[1]), []).append(p)
    return PreferenceData(users, pairs, str(world["path"]), world["stats"])


def from_adapter(adapted, source: str, test_users: float, context_share: float, seed: int) -> PreferenceData:
    """Real data: users split into train/test by a seeded hash (user-disjoint); each user's pairs into context and
    target by the dataset's split when it has one (PersonalLLM: train/test prompts), else by prompt (PRISM)."""
    users = {u.user_id: {"persona": u.persona, "split": "test" if _unit(u.user_id, seed) < test_users else "train",
                         "temperature": None} for u in adapted.users}
    pairs: dict[tuple[str, str], list[dict]] = {}
    for p in adapted.pairs:
        if p.split in ("train", "test"):
            part = "context" if p.split == "train" else "target"
        else:
            part = "context" if _unit(f"{p.user_id}/{p.prompt_id}", seed) < context_share else "target"
        pairs.setdefault((p.user_id, part), []).append(p.to_dict())
    for user_id in users:  # a user needs both parts to train on or to be evaluated
        if (user_id, "context") not in pairs or (user_id, "target") not in pairs:
            pairs.pop((user_id, "context"), None)
            pairs.pop((user_id, "target"), None)
    return PreferenceData(users, pairs, source)


def _unit(key: str, seed: int) -> float:
    """A stable uniform draw in [0, 1) for `key`: splits do not depend on row order or Python's hash seed."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def load_data(cfg: PersonaRMConfig) -> PreferenceData:
    from alignment.world import load_world, world_artifact

    if cfg.adapter is not None:
        from alignment.adapters import ADAPTERS

        if cfg.adapter not in ADAPTERS or cfg.data is None:
            raise ValueError(f"adapter: expected one of {', '.join(ADAPTERS)} with data=<source>, got "
                             f"adapter={cfg.adapter!r} data={cfg.data!r}")
        extra = {"n_users": cfg.simulated_users, "seed": cfg.seed} if cfg.adapter == "personal_llm" else {}
        adapted = ADAPTERS[cfg.adapter](cfg.data, **extra)
        return from_adapter(adapted, cfg.data, cfg.test_users, cfg.context_share, cfg.seed)
    return from_world(load_world(cfg.data or world_artifact(cfg.world, cfg.runs_dir)))


# --- inputs -------------------------------------------------------------------------------------------------------
def conversation_ids(tokenizer, prompt: list[dict], response: str, max_length: int) -> list[int]:
    """Chat-template ids of prompt + response + EOS; an overlong prompt loses its oldest tokens."""
    from alignment.sampling import encode_example

    prompt_ids, response_ids = encode_example(tokenizer, prompt, response)
    return (prompt_ids + response_ids)[-max_length:]


def shot_sides(tokenizer, pair: dict, shot_tokens: int) -> tuple[list[int], list[int]]:
    """The two responses of a labelled pair, compactly: a leading BOS (so an empty side is still a sequence), then
    only the tokens where they differ (difflib opcodes over token ids), each cut to `shot_tokens`. The prompt is
    left out: both responses share it, so the label is about their difference. World pairs: 65 -> 30 tokens."""
    ids = {s: tokenizer(pair[s], add_special_tokens=False)["input_ids"] for s in ("chosen", "rejected")}
    ops = difflib.SequenceMatcher(a=ids["chosen"], b=ids["rejected"], autojunk=False).get_opcodes()
    lead = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    chosen = [t for op, i1, i2, _, _ in ops if op != "equal" for t in ids["chosen"][i1:i2]]
    rejected = [t for op, _, _, j1, j2 in ops if op != "equal" for t in ids["rejected"][j1:j2]]
    return lead + chosen[:shot_tokens], lead + rejected[:shot_tokens]


# --- scoring ------------------------------------------------------------------------------------------------------
def pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (N, T)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def score(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """(N, L) head outputs of right-padded sequences, read at each one's last real token."""
    ids, mask = pad(seqs, pad_id)
    return model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()


def shot_vectors(model, tokenizer, shots: list[dict], shot_tokens: int) -> torch.Tensor:
    """(n, H) one context vector per labelled pair: h(chosen side) - h(rejected side), where h is the backbone's
    last hidden state at the side's last token (`shot_sides`). Flipping a label negates its vector exactly."""
    if not shots:
        return torch.zeros(0, model.config.hidden_size, device=model.device)
    sides = [shot_sides(tokenizer, s, shot_tokens) for s in shots]
    ids, mask = pad([c for c, _ in sides] + [r for _, r in sides], tokenizer.pad_token_id)
    hidden = model.base_model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
    last = hidden[torch.arange(len(ids)), mask.sum(1) - 1]  # (2n, H)
    return last[: len(shots)] - last[len(shots):]


def score_in_context(model, contexts: list[torch.Tensor], targets: list[list[list[int]]], pad_id: int) -> torch.Tensor:
    """(sum_u n_u, L) scores of each user's target conversations, each read after that user's context vectors
    (k_u, H), which enter as input embeddings in front of the conversation.

    Rows are [context | conversation], each part left-padded, so the last position is every row's last real
    token; positions count real tokens only, so padding changes nothing (RoPE is relative; tests check it).
    """
    owner = [u for u, rows in enumerate(targets) for _ in rows]
    ids, mask = pad([t for rows in targets for t in rows], pad_id, left=True)
    width = max(c.shape[0] for c in contexts)
    ctx = torch.zeros(len(owner), width, model.config.hidden_size, device=model.device)
    ctx_mask = torch.zeros(len(owner), width, dtype=torch.long)
    for i, u in enumerate(owner):
        k = contexts[u].shape[0]
        if k:
            ctx[i, width - k:] = contexts[u]
            ctx_mask[i, width - k:] = 1
    embeds = torch.cat([ctx, model.get_input_embeddings()(ids.to(model.device))], dim=1)
    full = torch.cat([ctx_mask, mask], dim=1)
    positions = (full.cumsum(1) - 1).clamp(min=0)
    return model(inputs_embeds=embeds, attention_mask=full.to(model.device),
                 position_ids=positions.to(model.device)).logits.float()


def kernel_margins(phi_targets: list[torch.Tensor], phi_shots: list[torch.Tensor]) -> torch.Tensor:
    """shots, kernel readout: (sum_u n_u,) margins of each user's target pairs given that user's shots.

    `phi_targets[u]` (2 n_u, 1 + D) and `phi_shots[u]` (2 k_u, 1 + D) are head outputs [r, b_1..b_D] of user u's
    (chosen, rejected) conversations, interleaved c0 r0 c1 r1 .... The user's weights over the basis are read off
    the shots: z_u = sum_j d_j / (k_u + 1), d_j = b(chosen_j) - b(rejected_j), the mean shot difference shrunk
    toward 0 (no personal term) as if one more shot without a difference were there. A target's margin is
    (r(y+) - r(y-)) + z_u . (b(y+) - b(y-)). Flipping a shot's label negates its d_j exactly."""
    out = []
    for targets, shots in zip(phi_targets, phi_shots, strict=True):
        d = shots[0::2, 1:] - shots[1::2, 1:]
        z = d.sum(0) / (len(d) + 1)
        diff = targets[0::2] - targets[1::2]
        out.append(diff[:, 0] + diff[:, 1:] @ z)
    return torch.cat(out)


def bt_loss(margins: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood -log sigmoid(r+ - r-), mean over pairs; margins (N,)."""
    return -torch.nn.functional.logsigmoid(margins).mean()


# --- training -----------------------------------------------------------------------------------------------------
def scale_fresh_head(model, cfg: ModelConfig) -> None:
    """Re-initialize the linear score head at std HEAD_SCALE / sqrt(hidden) when it is new (a preset, or a
    pretrained model without a classification head); a trained classifier's head is left alone."""
    from transformers import AutoConfig

    from alignment.models import pretrained_path

    path = pretrained_path(cfg)
    architectures = (AutoConfig.from_pretrained(path).architectures or []) if path else []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    wrapped = getattr(head, "modules_to_save", None)  # LoRA: peft's trained copy, then the frozen original
    heads = [*wrapped.values(), head.original_module] if wrapped is not None else [head]
    if isinstance(heads[0], torch.nn.Linear):
        with torch.no_grad():
            heads[0].weight.normal_(0.0, HEAD_SCALE / heads[0].in_features**0.5)
            for other in heads[1:]:
                other.weight.copy_(heads[0].weight)


def fit(model, extra: list[torch.nn.Parameter], loss_fn, steps: int, cfg: PersonaRMConfig, run, tag: str) -> dict:
    """AdamW on the model and `extra` parameters, warmup + cosine schedule; loss_fn(rng) -> scalar loss."""
    from tqdm.auto import tqdm

    from alignment.training import lr_lambda

    params = [p for p in model.parameters() if p.requires_grad] + extra
    groups = [{"params": params[:len(params) - len(extra)], "lr": cfg.lr}]
    groups += [{"params": extra, "lr": cfg.user_lr}] if extra else []
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, steps))
    rng = np.random.default_rng(cfg.seed)
    model.train()
    t0, recent = time.time(), []
    bar = tqdm(range(steps), desc=tag)
    for step in bar:
        loss = loss_fn(rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-(cfg.log_every - 1):], loss.item()]
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            run.log(step + 1, **{f"{tag}/loss": float(np.mean(recent)), f"{tag}/lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{np.mean(recent):.3f}")
    model.eval()
    return {"steps": steps, "train_seconds": time.time() - t0, "final_loss": float(np.mean(recent))}


def training_pairs(data: PreferenceData) -> list[tuple[int, dict]]:
    """(train user index, pair) for every context pair of the training users."""
    users = data.user_ids("train")
    return [(i, p) for i, u in enumerate(users) for p in data.pairs[(u, "context")]]


def train_text(model, tokenizer, data, cfg, run, tag: str, persona: bool) -> dict:
    """population (persona=False) and persona: pooled BT on every training pair."""
    rows = training_pairs(data)
    users = data.user_ids("train")
    prompt = lambda u, p: with_system_suffix(p["prompt"], data.users[users[u]]["persona"]) if persona else p["prompt"]
    encoded = [[conversation_ids(tokenizer, prompt(u, p), p[s], cfg.max_length) for s in ("chosen", "rejected")]
               for u, p in rows]

    def loss_fn(rng):
        batch = [encoded[i] for i in rng.integers(len(encoded), size=cfg.batch_pairs)]
        scores = score(model, [c for c, _ in batch] + [r for _, r in batch], tokenizer.pad_token_id)[:, 0]
        return bt_loss(scores[: len(batch)] - scores[len(batch):])

    return {"fit": fit(model, [], loss_fn, cfg.steps[tag], cfg, run, tag)}


def train_weights(model, tokenizer, data, cfg, run, tag: str) -> dict:
    """weights: phi (D outputs) and per-user w_u = mean + delta_u jointly, delta_u ~ N(0, user_scale^2) as an L2
    term; then the population prior fitted on the learned w_u (empirical Bayes)."""
    from rewards.user_weights import fit_mixture

    rows = training_pairs(data)
    users = data.user_ids("train")
    encoded = [(u, [conversation_ids(tokenizer, p["prompt"], p[s], cfg.max_length) for s in ("chosen", "rejected")])
               for u, p in rows]
    gen = torch.Generator().manual_seed(cfg.seed)
    mean = torch.nn.Parameter(torch.randn(cfg.basis, generator=gen) / cfg.basis**0.5)
    delta = torch.nn.Parameter(torch.zeros(len(users), cfg.basis))

    def loss_fn(rng):
        batch = [encoded[i] for i in rng.integers(len(encoded), size=cfg.batch_pairs)]
        phi = score(model, [c for _, (c, _) in batch] + [r for _, (_, r) in batch], tokenizer.pad_token_id)
        w = mean + delta[torch.tensor([u for u, _ in batch])]
        margins = (w * (phi[: len(batch)] - phi[len(batch):])).sum(-1)
        penalty = delta.pow(2).sum() / (2 * cfg.user_scale**2 * len(encoded))  # the prior, spread over all pairs
        return bt_loss(margins) + penalty

    stats = fit(model, [mean, delta], loss_fn, cfg.steps[tag], cfg, run, tag)
    weights = (mean + delta).detach()
    prior = fit_mixture(weights, cfg.prior_components, seed=cfg.seed)
    return {"fit": stats, "prior": prior.to_dict(), "users": users, "user_weights": weights.tolist()}


def train_shots(model, tokenizer, data, cfg, run, tag: str) -> dict:
    """shots: episodes of one training user: k ~ U{0..k_max} of their pairs as context (`shot_readout`), and
    `episode_targets` other pairs of theirs scored given it. Gradients reach the backbone through both."""
    users = data.user_ids("train")
    encode = lambda p: [conversation_ids(tokenizer, p["prompt"], p[s], cfg.max_length) for s in ("chosen", "rejected")]
    targets = {u: [encode(p) for p in data.pairs[(u, "context")]] for u in users}

    def loss_fn(rng):
        shots, shot_rows, rows, signs = [], [], [], []
        for u in rng.choice(users, size=cfg.episode_users, replace=False):
            pool = data.pairs[(u, "context")]
            order = rng.permutation(len(pool))
            k = int(rng.integers(0, min(cfg.k_max, len(pool) - cfg.episode_targets) + 1))
            # A virtual opposing user (SPL, arXiv:2603.12595): every label of the episode swapped, shots and targets
            # alike. Its preferences are the user's negated, so only the context tells the two apart.
            swap = rng.random() < cfg.swap_users
            shots.append([flipped(pool[i]) if swap else pool[i] for i in order[:k]])
            # the shots' conversations (kernel readout), c0 r0 c1 r1 ...: a flipped label is the pair reversed
            shot_rows.append([t for i in order[:k] for t in (targets[u][i][::-1] if swap else targets[u][i])])
            rows.append([t for i in order[k:k + cfg.episode_targets] for t in targets[u][i]])  # c0 r0 c1 r1 ...
            signs += [-1.0 if swap else 1.0] * len(rows[-1][::2])
        if cfg.shot_readout == "kernel":
            groups = [*rows, *shot_rows]
            phi = score(model, [t for g in groups for t in g], tokenizer.pad_token_id).split([len(g) for g in groups])
            margins = kernel_margins(list(phi[:len(rows)]), list(phi[len(rows):]))
        else:
            vectors = shot_vectors(model, tokenizer, [s for user in shots for s in user], cfg.shot_tokens)
            contexts = list(vectors.split([len(user) for user in shots]))
            scores = score_in_context(model, contexts, rows, tokenizer.pad_token_id)[:, 0]
            margins = scores[0::2] - scores[1::2]
        return bt_loss(torch.tensor(signs, device=margins.device) * margins)

    return {"fit": fit(model, [], loss_fn, cfg.steps[tag], cfg, run, tag)}


def basis_labels(cfg: PersonaRMConfig) -> list[str]:
    return [f"basis_{i}" for i in range(cfg.basis)]


METHODS = {  # name -> (head outputs, trainer)
    "population": (lambda cfg: ["reward"], lambda *a: train_text(*a, persona=False)),
    "persona": (lambda cfg: ["reward"], lambda *a: train_text(*a, persona=True)),
    "shots": (lambda cfg: ["reward", *(basis_labels(cfg) if cfg.shot_readout == "kernel" else [])], train_shots),
    "weights": (basis_labels, train_weights),
}


# --- scorers (what the evaluation calls) --------------------------------------------------------------------------
class TextScorer:
    """population / persona: margins r(x, y+) - r(x, y-) of the targets; shots are ignored."""

    uses_shots = False

    def __init__(self, model, tokenizer, cfg: PersonaRMConfig, persona: bool, batch: int = 256):
        self.model, self.tok, self.cfg, self.persona, self.batch = model, tokenizer, cfg, persona, batch

    @torch.inference_mode()
    def margins(self, requests) -> list[np.ndarray]:
        seqs = []
        for r in requests:
            for p in r.targets:
                prompt = with_system_suffix(p["prompt"], r.persona) if self.persona else p["prompt"]
                seqs += [conversation_ids(self.tok, prompt, p[s], self.cfg.max_length) for s in ("chosen", "rejected")]
        scores = torch.cat([score(self.model, seqs[i:i + self.batch], self.tok.pad_token_id)[:, 0]
                            for i in range(0, len(seqs), self.batch)]).cpu().numpy()
        return _split(scores[0::2] - scores[1::2], [len(r.targets) for r in requests])


class ShotScorer:
    """shots: each request's targets scored given its shots, by the model's `shot_readout`."""

    uses_shots = True

    def __init__(self, model, tokenizer, cfg: PersonaRMConfig, users_per_batch: int = 4):
        self.model, self.tok, self.cfg, self.users_per_batch = model, tokenizer, cfg, users_per_batch
        self.heads = HeadOutputs(model, tokenizer, cfg)  # the kernel readout's

    @torch.inference_mode()
    def margins(self, requests) -> list[np.ndarray]:
        if self.cfg.shot_readout == "kernel":
            margins = kernel_margins([self.heads(r.targets) for r in requests],
                                     [self.heads(r.shots) for r in requests])
            return _split(margins.cpu().numpy(), [len(r.targets) for r in requests])
        out = []
        for i in range(0, len(requests), self.users_per_batch):
            group = requests[i:i + self.users_per_batch]
            vectors = shot_vectors(self.model, self.tok, [s for r in group for s in r.shots], self.cfg.shot_tokens)
            contexts = list(vectors.split([len(r.shots) for r in group]))
            rows = [[conversation_ids(self.tok, p["prompt"], p[s], self.cfg.max_length)
                     for p in r.targets for s in ("chosen", "rejected")] for r in group]
            scores = score_in_context(self.model, contexts, rows, self.tok.pad_token_id)[:, 0]
            out += _split((scores[0::2] - scores[1::2]).cpu().numpy(), [len(r.targets) for r in group])
        return out


class HeadOutputs:
    """(2n, L) head outputs of pairs' conversations, chosen and rejected interleaved; each conversation is scored
    once (the k sweep and the flipped shots reuse them)."""

    def __init__(self, model, tokenizer, cfg: PersonaRMConfig, batch: int = 256):
        self.model, self.tok, self.cfg, self.batch = model, tokenizer, cfg, batch
        self._cache: dict[tuple, torch.Tensor] = {}

    @torch.inference_mode()
    def __call__(self, pairs: list[dict]) -> torch.Tensor:
        keys = [tuple(conversation_ids(self.tok, p["prompt"], p[s], self.cfg.max_length))
                for p in pairs for s in ("chosen", "rejected")]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        for i in range(0, len(todo), self.batch):
            chunk = todo[i:i + self.batch]
            self._cache.update(zip(chunk, score(self.model, [list(k) for k in chunk], self.tok.pad_token_id),
                                   strict=True))
        if not keys:
            return torch.zeros(0, self.model.config.num_labels)
        return torch.stack([self._cache[k] for k in keys]).cpu()


class WeightScorer:
    """weights: basis differences of shots and targets; w adapted from the shots under the population prior."""

    uses_shots = True

    def __init__(self, model, tokenizer, cfg: PersonaRMConfig, prior, batch: int = 256):
        self.prior = prior
        self.heads = HeadOutputs(model, tokenizer, cfg, batch)

    def diffs(self, pairs: list[dict]) -> torch.Tensor:
        """(n, D) phi(chosen) - phi(rejected)."""
        phi = self.heads(pairs).double()
        return phi[0::2] - phi[1::2]

    def margins(self, requests) -> list[np.ndarray]:
        from rewards.user_weights import adapt, predictive_margin

        out = []
        for r in requests:
            ws, log_resp = adapt(self.diffs(r.shots), self.prior)
            out.append(predictive_margin(self.diffs(r.targets), ws, log_resp).cpu().numpy())
        return out


def _split(values: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(sizes)[:-1])


def load_scorers(run_dir: str | Path, cfg: PersonaRMConfig, tokenizer=None, methods: list[str] | None = None) -> dict:
    """method -> scorer for every method saved in a persona_rm run directory."""
    import json
    from dataclasses import replace

    from alignment.models import load_sequence_classifier, load_tokenizer

    out = {}
    for method in methods or cfg.methods:
        path = Path(run_dir) / method
        tok = tokenizer or load_tokenizer(str(path / "model"))
        model_cfg = replace(cfg.model, name_or_path=str(path / "model"), preset=None, lora=None)
        labels = METHODS[method][0](cfg)
        saved = len(json.loads((path / "model" / "config.json").read_text()).get("id2label") or labels)
        if saved != len(labels):  # e.g. shots trained with another shot_readout (the default changed)
            raise ValueError(f"{path / 'model'}: {saved} head outputs, but {method} with this config has {len(labels)}"
                             f" (shot_readout={cfg.shot_readout}, basis={cfg.basis}); set them as the run was trained")
        model = load_sequence_classifier(model_cfg, tok, labels)
        state = json.loads((path / "state.json").read_text())
        out[method] = make_scorer(method, model, tok, cfg, state)
    return out


def make_scorer(method: str, model, tokenizer, cfg: PersonaRMConfig, state: dict):
    from rewards.user_weights import Prior

    if method == "weights":
        return WeightScorer(model, tokenizer, cfg, Prior.from_dict(state["prior"]))
    if method == "shots":
        return ShotScorer(model, tokenizer, cfg)
    return TextScorer(model, tokenizer, cfg, persona=method == "persona")


# --- entry point --------------------------------------------------------------------------------------------------
def main(cfg: PersonaRMConfig) -> Path:
    from alignment.files import write_json
    from alignment.models import load_sequence_classifier, load_tokenizer, pretrained_path, save_model
    from alignment.runs import Run, seed_everything
    from rewards.rm_eval import evaluate, write_report

    for method in cfg.methods:
        if method not in METHODS:
            raise ValueError(f"methods: unknown method {method!r} (known: {', '.join(METHODS)})")
        if method not in cfg.steps:
            raise ValueError(f"steps: no entry for method {method!r} (have: {', '.join(cfg.steps)})")

    # --- setup and data
    run = Run.start(cfg, "persona_rm", runs_dir=cfg.runs_dir, name=cfg.name)
    data = load_data(cfg)
    run.add_meta("data", {"source": data.source, "users": {s: len(data.user_ids(s)) for s in SPLITS}})
    tokenizer = load_tokenizer(cfg.tokenizer or pretrained_path(cfg.model) or str(Path(data.source) / "tokenizer"))

    # --- one backbone per method, trained and saved in turn
    scorers, training = {}, {}
    for method in cfg.methods:
        seed_everything(cfg.seed)
        labels, trainer = METHODS[method]
        model = load_sequence_classifier(cfg.model, tokenizer, labels(cfg))
        scale_fresh_head(model, cfg.model)
        log.info("%s: %.2fM parameters", method, sum(p.numel() for p in model.parameters()) / 1e6)
        state = trainer(model, tokenizer, data, cfg, run, method)
        save_model(model, tokenizer, run.dir / method / "model")
        write_json(run.dir / method / "state.json", state)
        training[method] = state["fit"]
        scorers[method] = make_scorer(method, model, tokenizer, cfg, state)

    # --- evaluation (the same functions `python -m alignment.evaluate kind=rm run=<dir>` runs)
    t0 = time.time()
    results = evaluate(scorers, data, cfg.evaluation)
    results["training"] = training
    results["evaluation_seconds"] = time.time() - t0
    print(write_report(results, run.dir))
    run.finish(results)
    return run.dir


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(PersonaRMConfig, main)
