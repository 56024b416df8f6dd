"""Guide models for decoding-time personalization: PAD's preference-conditioned guide, GenARM's autoregressive
reward model, an ARGS sequence reward model, and Drift's attribute prompts.

    python -m rewards.train config=guides.yaml                  # all three on the tiny world, ~15 min on 2 CPU cores
    python -m rewards.train config=guides.yaml arm.beta=0.2 pad.steps=1000
    python -m rewards.train config=real/guides.yaml             # LoRA guides of SmolLM2-135M-Instruct, real pairs

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
        statement of people.PREFERENCE_TEXT, or `drift_prompts`); the small LM under them is the PAD guide (or
        the base).

Held-out checks in results.json: pairwise accuracy of arm/ and rm/ on the test users' target pairs (unseen users,
unseen prompts) beside the world's Bayes ceiling, and the per-token cross-entropy of pad/ on held-out dialogues.

Real pairs (`pairs`: PRISM, PersonalLLM, FSPO through `alignment.adapters`) replace the world's: users split
user-disjoint (`adapters.split_users`), the persona text of each train user in the system turn (after the chat
template's own system text when the prompt has none), arm/ and rm/ on their pairs, pad/ on their chosen replies,
accuracy and pad/'s cross-entropy on the test users'. The policy must be given (`policy=smollm2-135m-instruct`);
what stays world-bound is logged in one line (WORLD_BOUND). `lora` trains each guide as a LoRA adapter, saved
merged, so decoding loads every guide as a plain HF directory; base.json records the tokenizer the guides share
with their base (`check_base` refuses another). A step of `batch_size` examples runs in forwards of `micro_batch`
rows, gradients accumulated to the whole batch's: a 49k vocabulary makes the logits the memory peak (256 rows x
160 tokens x 49152 x 4 bytes = 8 GB per copy).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from alignment.config import AdapterData, LoraConfig
from alignment.policy import SFTConfig
from alignment.sampling import default_system, with_system_suffix
from alignment.world import WorldSpec

log = logging.getLogger(__name__)

NEUTRAL_PREFERENCE = "the user has no stated preferences ."  # what people.persona_text writes for no salient weight
HELD_OUT = 256  # world: pad/'s held-out dialogues, the first of the drawn ones
# Rows per forward when micro_batch = 0: fp32 logits of at most 512 MiB (a backward holds ~3 such copies). World
# vocabularies (~400 tokens) fit 2000+ rows of 160 tokens, so world runs keep one forward per step; 49152 tokens: 17.
LOGITS_BYTES = 2**29
WORLD_BOUND = ("guides on real pairs; world-bound and not run: the SFT policy (policy= is used), the Bayes ceiling, "
               "pad/'s synthetic dialogues (pad/ trains on the chosen replies), arm.pairs, and Drift's world "
               "attribute prompts (drift.json is written from drift_prompts= when given)")


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
    pairs: AdapterData | None = None  # real-format pairs (alignment.adapters) instead of the world; needs `policy`
    sft: SFTConfig = field(default_factory=SFTConfig)  # the starting policy when `policy` is unset
    policy: str | None = None  # HF directory (or packaged model name) every guide starts from; default: the SFT policy
    lora: LoraConfig | None = None  # train each guide as a LoRA adapter on the policy (saved merged)
    drift_prompts: str | None = None  # JSON {"neutral", "attributes"} written as drift.json; default: the world's
    train: list[str] = field(default_factory=lambda: ["pad", "arm", "rm"])  # which guides to train
    batch_size: int = 32
    micro_batch: int = 0  # rows per forward, training and evaluation; 0: as many as LOGITS_BYTES allows
    max_length: int = 160  # tokens; world prompt + response <= ~110
    warmup: int = 30
    log_every: int = 50
    eval_pairs: int = 2000  # held-out target pairs for the accuracy checks (0 = all)
    pad: PADGuideSettings = field(default_factory=PADGuideSettings)
    arm: ARMSettings = field(default_factory=ARMSettings)
    rm: RMSettings = field(default_factory=RMSettings)


Config = GuidesConfig  # the name `rewards.train` dispatches to


# --- data -----------------------------------------------------------------------------------------------------------
@dataclass
class GuideData:
    """What the guides train and are checked on; every prompt already carries its user's preference text."""

    pairs: dict[str, list[dict]]  # "arm", "rm": the training pairs of each pair-trained guide
    eval_pairs: list[dict]  # held-out users' pairs for the pairwise accuracy
    dialogues: list[dict]  # pad/: {"prompt", "response"}, responses that follow the prompt's preferences
    held_out: list[dict] | None  # pad/'s held-out dialogues; None: the first HELD_OUT of `dialogues`
    accuracy_key: str  # results key of the pairwise accuracy
    reference: dict = field(default_factory=dict)  # numbers reported beside it (the world's Bayes ceiling)


def drift_prompts(path: str | None) -> dict:
    """Drift's prompts {"neutral": s_0, "attributes": {name: s_i}}: a JSON file (`config=`-style lookup, so
    real/x.json is configs/real/x.json), else the world's attribute statements."""
    import json

    from alignment import people
    from alignment.config import ConfigError, find_config_file

    if path is None:
        return {"neutral": NEUTRAL_PREFERENCE,
                "attributes": {a: pos for a, (pos, _) in people.PREFERENCE_TEXT.items()}}
    prompts = json.loads(find_config_file(path).read_text())
    if not isinstance(prompts.get("neutral"), str) or not isinstance(prompts.get("attributes"), dict):
        raise ConfigError(f"drift_prompts: {path}: expected {{\"neutral\": str, \"attributes\": {{name: str}}}}")
    return {"neutral": prompts["neutral"], "attributes": dict(prompts["attributes"])}


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
    rows = [{**p, "prompt": with_system_suffix(p["prompt"], persona[p["user_id"]])}
            for p in world["pairs"] if p["split"] in splits]
    return rows[:limit] if limit else rows


def world_data(cfg: GuidesConfig, world: dict) -> GuideData:
    """The world's train users' pairs and preference dialogues; checks on the test users' target pairs."""
    all_train = user_pairs(world, ("train_context", "train_target"))
    arm = user_pairs(world, ("train_context",)) if cfg.arm.pairs == "train_context" else all_train
    dialogues = preference_dialogues(world, cfg.world, cfg.pad.examples, cfg.pad.liked, cfg.pad.disliked,
                                     cfg.seed) if "pad" in cfg.train else []
    stats = world["stats"]["test_target"]
    return GuideData({"arm": arm, "rm": all_train}, user_pairs(world, ("test_target",), cfg.eval_pairs), dialogues,
                     None, "test_target_accuracy",
                     {"bayes_ceiling": stats["bayes_ceiling"], "population_bt": stats["population_bt"]})


def adapter_data(cfg: GuidesConfig, tokenizer) -> GuideData:
    """Real pairs: train users' pairs (pad/: their chosen replies), checks on the test users' (unseen users)."""
    from alignment.adapters import read_adapter, split_users

    adapted = read_adapter(cfg.pairs)
    persona, default = {u.user_id: u.persona for u in adapted.users}, default_system(tokenizer)
    splits = split_users(adapted.pairs, cfg.pairs.users, cfg.seed)
    rows = {s: [{**p.to_dict(), "prompt": with_system_suffix(p.prompt, persona.get(p.user_id, ""), default)}
                for pairs in splits[s].values() for p in pairs] for s in ("train", "test")}
    if not rows["train"] or not rows["test"]:
        raise ValueError(f"pairs: {cfg.pairs.adapter} {cfg.pairs.source} gives {len(rows['train'])} train and "
                         f"{len(rows['test'])} test pairs with users={cfg.pairs.users}; need both")
    chosen = lambda pairs: [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
    held = rows["test"][:cfg.eval_pairs] if cfg.eval_pairs else rows["test"]
    return GuideData({"arm": rows["train"], "rm": rows["train"]}, held, chosen(rows["train"]), chosen(rows["test"]),
                     "held_out_accuracy")


def pair_batch(tokenizer, pairs: list[dict], max_length: int, device):
    from alignment.logps import build_pair_batch
    from alignment.sampling import render_prompt

    batch = build_pair_batch(tokenizer, [render_prompt(tokenizer, p["prompt"]) for p in pairs],
                             [p["chosen"] for p in pairs], [p["rejected"] for p in pairs], max_length)
    return {k: v.to(device) for k, v in batch.items()}


def rows_per_forward(micro_batch: int, max_length: int, vocab: int) -> int:
    """`micro_batch` when set, else the most rows whose fp32 logits (rows x max_length x vocab x 4 bytes) fit in
    LOGITS_BYTES."""
    return micro_batch if micro_batch > 0 else max(1, LOGITS_BYTES // (max_length * vocab * 4))


def units(batch: dict) -> int:
    """What a batch's loss averages over: its scored tokens (a `labels` batch, HF's shifted causal-LM loss) or its
    pairs (a (2B, T) pair batch)."""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != -100).sum())
    return batch["input_ids"].shape[0] // 2


# --- objectives: (model, batch) -> loss -----------------------------------------------------------------------------
def arm_loss(chosen_logps, rejected_logps, beta: float):
    """GenARM eq. 5 (reference-free): -log sigmoid(beta (log pi_r(y_w) - log pi_r(y_l))), (B,) -> (B,)."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * (chosen_logps - rejected_logps))


def sequence_rewards(model, batch):
    """(2B,) rewards of a right-padded pair batch: the classifier head at each row's last real token. A LoRA model
    is read through its wrapped classifier (peft's own `base_model` is the adapter container, not the backbone)."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch["attention_mask"]
    h = inner.base_model(input_ids=batch["input_ids"], attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    last = mask.sum(-1) - 1
    return inner.score(h[torch.arange(len(h)), last])[:, 0]


def accumulate(model, batches: list[dict], loss_fn):
    """Backward over micro-batches with each one's mean loss weighted by its share of the `units`, so the gradients
    add up to those of the mean loss over all of them in one forward; returns that loss (detached). One batch:
    exactly one forward and backward of loss_fn (the weight is 1.0)."""
    counts = [units(b) for b in batches]
    total, loss = sum(counts), 0.0
    for batch, n in zip(batches, counts, strict=True):
        part = loss_fn(model, batch) * (n / total)
        part.backward()
        loss = loss + part.detach()
    return loss


def held_out_loss(model, examples: list[tuple[list[int], list[int]]], pad_id: int, rows: int) -> float:
    """Per-token cross-entropy of the responses (HF's causal-LM loss over all `examples` as one batch), computed
    in forwards of `rows` examples: each micro-batch's mean weighted by its scored tokens."""
    import torch

    from alignment.training import collate

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), rows):
            batch = {k: v.to(model.device) for k, v in collate(examples[i:i + rows], pad_id).items()}
            n = units(batch)
            total += model(**batch).loss.double().item() * n
            tokens += n
    return total / tokens


def train_loop(model, draw, build, chunk: int, steps: int, lr: float, cfg: GuidesConfig, run, desc: str,
               loss_fn) -> dict:
    """AdamW with warmup + cosine decay (sft.lr_lambda) on the trainable parameters; step s draws `draw(s)` examples
    and runs them `chunk` at a time through `build` (gradients accumulated, `accumulate`)."""
    import torch
    from tqdm.auto import tqdm

    from alignment.training import lr_lambda

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, steps))
    model.train()
    t0, loss = time.time(), torch.tensor(float("nan"))
    for step in (bar := tqdm(range(steps), desc=desc)):
        examples = draw(step)
        loss = accumulate(model, [build(examples[i:i + chunk]) for i in range(0, len(examples), chunk)], loss_fn)
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
def drawer(pool: list, size: int, seed: int):
    """step -> `size` examples of `pool` drawn with replacement from a generator seeded once."""
    import torch

    order = torch.Generator().manual_seed(seed)
    return lambda step: [pool[i] for i in torch.randint(len(pool), (size,), generator=order).tolist()]


def model_config(cfg: GuidesConfig, policy: Path):
    from alignment.config import ModelConfig

    return ModelConfig(name_or_path=str(policy), dtype="float32", lora=cfg.lora)


def train_pad(cfg: GuidesConfig, data: GuideData, tokenizer, policy: Path, run, rows: int) -> tuple[object, dict]:
    from alignment.models import load_causal_lm
    from alignment.training import collate, encode

    model = load_causal_lm(model_config(cfg, policy), tokenizer)
    examples, dropped = encode(tokenizer, data.dialogues, cfg.max_length)
    if data.held_out is None:
        held_out, examples = examples[:HELD_OUT], examples[HELD_OUT:]
    else:
        held_out, _ = encode(tokenizer, data.held_out, cfg.max_length)
    if not examples or not held_out:
        raise ValueError(f"pad: {len(examples)} training and {len(held_out)} held-out dialogues fit max_length="
                         f"{cfg.max_length} ({dropped} training ones were longer); raise max_length")
    draw = drawer(examples, cfg.batch_size, cfg.seed)
    build = lambda chunk: {k: v.to(model.device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
    stats = train_loop(model, draw, build, rows, cfg.pad.steps, cfg.pad.lr, cfg, run, "pad", lambda m, b: m(**b).loss)
    stats["held_out_loss"] = held_out_loss(model, held_out, tokenizer.pad_token_id, rows)
    return model, stats


def train_arm(cfg: GuidesConfig, data: GuideData, tokenizer, policy: Path, run, rows: int) -> tuple[object, dict]:

    from alignment.logps import pair_logps
    from alignment.models import load_causal_lm

    model = load_causal_lm(model_config(cfg, policy), tokenizer)
    draw = drawer(data.pairs["arm"], cfg.batch_size, cfg.seed + 1)
    build = lambda chunk: pair_batch(tokenizer, chunk, cfg.max_length, model.device)
    loss_fn = lambda m, b: arm_loss(*pair_logps(m, b), cfg.arm.beta).mean()
    stats = train_loop(model, draw, build, max(1, rows // 2), cfg.arm.steps, cfg.arm.lr, cfg, run, "arm", loss_fn)
    stats.update(pairwise_accuracy(lambda b: pair_logps(model, b), data, cfg, tokenizer, model.device, rows))
    return model, stats


def train_rm(cfg: GuidesConfig, data: GuideData, tokenizer, policy: Path, run, rows: int) -> tuple[object, dict]:
    import torch.nn.functional as F

    from alignment.models import load_sequence_classifier

    model = load_sequence_classifier(model_config(cfg, policy), tokenizer, ["reward"])
    draw = drawer(data.pairs["rm"], cfg.batch_size, cfg.seed + 2)
    build = lambda chunk: pair_batch(tokenizer, chunk, cfg.max_length, model.device)

    def loss_fn(m, b):
        chosen, rejected = sequence_rewards(m, b).chunk(2)
        return -F.logsigmoid(chosen - rejected).mean()  # Bradley-Terry

    stats = train_loop(model, draw, build, max(1, rows // 2), cfg.rm.steps, cfg.rm.lr, cfg, run, "rm", loss_fn)
    stats.update(pairwise_accuracy(lambda b: sequence_rewards(model, b).chunk(2), data, cfg, tokenizer, model.device,
                                   rows))
    return model, stats


def pairwise_accuracy(score, data: GuideData, cfg: GuidesConfig, tokenizer, device, rows: int) -> dict:
    """Share of the held-out pairs (world: the test users' target pairs, unseen users and prompts) whose chosen
    response scores higher; ties count half. At most 128 pairs (or rows / 2) per forward."""
    import torch

    pairs, chunk, correct = data.eval_pairs, min(128, max(1, rows // 2)), 0.0
    with torch.no_grad():
        for s in range(0, len(pairs), chunk):
            chosen, rejected = score(pair_batch(tokenizer, pairs[s:s + chunk], cfg.max_length, device))
            correct += ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum().item()
    return {data.accuracy_key: correct / len(pairs), "eval_pairs": len(pairs), **data.reference}


TRAINERS = {"pad": train_pad, "arm": train_arm, "rm": train_rm}


# --- the base the guides share --------------------------------------------------------------------------------------
def tokenizer_identity(tokenizer) -> dict:
    """What a guide's token ids mean: vocabulary size, a sha256 of the token -> id map, and the pad/eos ids."""
    import hashlib
    import json

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"tokens": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def check_base(guides_dir: str | Path, tokenizer) -> None:
    """Raise ConfigError (one line) unless the guides in `guides_dir` were trained for `tokenizer`'s vocabulary
    (base.json); a run without base.json (trained before it existed) passes."""
    import json

    from alignment.config import ConfigError

    path = Path(guides_dir) / "base.json"
    if not path.is_file():
        return
    saved, ours = json.loads(path.read_text())["tokenizer"], tokenizer_identity(tokenizer)
    if saved != ours:
        raise ConfigError(f"{guides_dir}: guides trained for a {saved['tokens']}-token vocabulary "
                          f"(sha256 {saved['vocab_sha256'][:12]}), not this base's {ours['tokens']} tokens "
                          f"({ours['vocab_sha256'][:12]}); train the guides from this base (policy=)")


# --- entry point ----------------------------------------------------------------------------------------------------
def check_config(cfg: GuidesConfig) -> None:
    """Refuse, before anything is built, unknown guides and real pairs without a pretrained policy."""
    from alignment.config import ConfigError

    unknown = sorted(set(cfg.train) - set(TRAINERS))
    if unknown:
        raise ValueError(f"train: unknown guides {unknown} (known: {', '.join(TRAINERS)})")
    if cfg.pairs is not None and not cfg.policy:
        raise ConfigError("policy: guides on real pairs start from a pretrained policy (policy=smollm2-135m-instruct);"
                          " the default SFT policy is the world's")


def main(cfg: GuidesConfig) -> Path:
    import json

    from alignment.files import write_json
    from alignment.models import load_tokenizer, save_model
    from alignment.policy import starting_policy
    from alignment.runs import Run, seed_everything
    from alignment.world import load_world, world_artifact

    check_config(cfg)
    # --- setup
    run = Run.start(cfg, "guides", runs_dir=cfg.runs_dir, name=cfg.name, resume=cfg.resume)
    seed_everything(cfg.seed)
    world = None if cfg.pairs is not None else load_world(cfg.data or world_artifact(cfg.world, cfg.runs_dir))
    policy = starting_policy(cfg.policy, cfg.sft, cfg.world, cfg.runs_dir, data=cfg.data)
    tokenizer = load_tokenizer(policy)
    if world is None:
        log.info(WORLD_BOUND)
        data = adapter_data(cfg, tokenizer)
        source = {"pairs": f"{cfg.pairs.adapter}:{cfg.pairs.source}"}
    else:
        data, source = world_data(cfg, world), {"world": str(world["path"])}
    run.add_meta("inputs", {**source, "policy": str(policy)})
    check_base(run.dir, tokenizer)  # a resumed run keeps guides only for the same base
    write_json(run.path("base.json"), {"policy": str(policy), "tokenizer": tokenizer_identity(tokenizer)})
    rows = rows_per_forward(cfg.micro_batch, cfg.max_length, len(tokenizer))

    # --- train each guide (a resumed run keeps the ones already saved)
    results = {"policy": str(policy)}
    for name in cfg.train:
        out = run.path(name)
        if (out / "config.json").is_file():
            log.info("%s: kept from the resumed run", name)
            continue
        seed_everything(cfg.seed)
        model, stats = TRAINERS[name](cfg, data, tokenizer, policy, run, rows)
        save_model(model, tokenizer, out)
        results[name] = {**stats, "path": str(out)}
        print(f"guides/{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, float)))
    if world is not None or cfg.drift_prompts is not None:
        results["drift"] = drift_prompts(cfg.drift_prompts)
        run.path("drift.json").write_text(json.dumps(results["drift"], indent=1))
    run.finish(results)
    return run.dir


def guides_artifact(cfg: GuidesConfig) -> Path:
    """The guides for a config, trained once and cached under runs/cache/guides-<hash>/run (the training run itself);
    run fields (name, resume, runs_dir) do not enter the key."""
    from alignment.cache import cached_artifact
    from alignment.policy import starting_policy
    from alignment.world import world_artifact

    check_config(cfg)
    # Inputs resolve against the caller's runs_dir before the build, which runs inside the cache directory.
    world = cfg.data if cfg.pairs is not None else cfg.data or str(world_artifact(cfg.world, cfg.runs_dir))
    policy = str(starting_policy(cfg.policy, cfg.sft, cfg.world, cfg.runs_dir, data=cfg.data))
    key = replace(cfg, name=None, resume=False, runs_dir="")
    build = lambda out: main(replace(cfg, data=world, policy=policy, runs_dir=str(out), name="run", resume=False))
    return cached_artifact("guides", key, build, runs_dir=cfg.runs_dir) / "run"


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(GuidesConfig, main)
