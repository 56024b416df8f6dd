"""APC discriminators: the relevance and NLI sequence classifiers behind the APC score, distilled from the world.

    python -m rewards.train config=apc_discriminators.yaml            # both sets, from the world's SFT policy
    python -m rewards.train config=apc_discriminators.yaml init=model # tiny Llamas from random weights
    python -m rewards.train config=apc_discriminators.yaml init=model model.preset=null \
        model.name_or_path=<hf encoder> lr=5e-5                       # a pretrained encoder, e.g. MiniLM

APC (Peng & Shang, NeurIPS 2024, arXiv:2405.07726 §3, App. C-D) scores a response with two small classifiers:
relevance P_g(s, q) over (statement, query) with labels (no, yes), and NLI over (statement, query, response) with
labels (contradicted, neutral, entailed) (`rewards/apc.py` turns them into V_APC and ΔAPC). The paper distils
DeBERTa students from GPT-4 labels of synthesized queries and responses. Here the persona world's oracle plays the
teacher: `language.relevant` labels relevance (the query asks about the statement's slot), `language.nli_label` of
the parsed response labels NLI, and responses come from the world's own sampler (`people.sample_content`,
`people.sample_style`), so the labels are exact and free.

Initialization (`init=policy`, the default): both classifiers start from the world's SFT policy with a new head.
Relevance and NLI need a model that reads the language and can match a value in the response against the one in
the statement; the SFT policy (`alignment/policy.py`) has learned to copy a statement's value into its answer.

The NLI classifier has to learn a comparison (does the response assert the statement's slot, with the same
value?); what made it learn that instead of shortcuts: no query in its input; statements with any value of the
slot; minimal triples in both directions (`rewards.apc_data`); the distribution APC scores in the training data
(`natural_train`); batches of whole triples (`batch_indices`). Whether a try leaves the slot-only plateau still
depends on the seed: `seed_tries`, `gate_step` and `gate_recall` (`train_best_of_seeds`). The measurements behind
each choice and what did not work: docs/experiments/apc_discriminators.md.

Differences from the paper: two sets on disjoint characters, `reward/` (what APC-DPO optimizes) and `evaluator/`
(what reports ΔAPC; the paper's script reuses one checkpoint); class-balanced training data with hard negatives,
plus `natural_train`; recall per class measured on split == "holdout" characters never trained on (target >= 0.9
for every class) and, for NLI, on the natural distribution with the phantom contradictions per response (neutral
statements read as contradicted, each a passive penalty); inputs in the world's chat markup with the shared part
first (`world_relevance_text`: query, then statement; `world_nli_text`: statement, then response), read packed
(`rewards.packed`) at training and scoring time alike (`load_scorer`).

Output: runs/<name>/{reward,evaluator}/{relevance,nli}/, each a Hugging Face classifier directory with its tokenizer
and config.id2label in the order of RELEVANCE_LABELS / NLI_LABELS. `discriminators_artifact(cfg)` builds it once
under runs/cache/ for APC-DPO; `load_scorer(path, "reward")` returns a ready `rewards.apc.APCScorer`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from alignment.config import ConfigError, ModelConfig
from alignment.language import NLI_LABELS, RELEVANCE_LABELS
from alignment.policy import SFTConfig
from alignment.world import WorldSpec
from rewards.apc_data import make_examples, natural_nli_examples
from rewards.packed import Packed

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SETS = ("reward", "evaluator")  # character split each set is trained on; `holdout` characters are for evaluation
CLASSIFIERS = {"relevance": RELEVANCE_LABELS, "nli": NLI_LABELS}
TARGET_RECALL = 0.9


@dataclass
class DiscriminatorConfig:
    kind: Literal["apc_discriminators"] = "apc_discriminators"  # picks this module in `python -m rewards.train`
    seed: int = 0
    name: str | None = None  # run name; default discriminators-<timestamp>
    resume: bool = False  # continue the run `name`: classifiers already saved there are loaded, not retrained
    runs_dir: str = "runs"
    world: WorldSpec = field(default_factory=WorldSpec)  # built and cached under runs/cache/ if missing
    data: str | None = None  # an existing world directory to train on instead of `world`
    init: Literal["policy", "model"] = "policy"  # policy: start from the world's SFT policy; model: from `model`
    policy: str | None = None  # init=policy: HF directory of the LM to start from; default the cached SFT policy
    sft: SFTConfig = field(default_factory=SFTConfig)  # init=policy: how that policy is trained when `policy` is unset
    model: ModelConfig = field(default_factory=lambda: ModelConfig(  # init=model: preset or pretrained encoder
        preset="llama", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_positions=128))
    relevance_steps: int = 300
    nli_steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3  # peak; linear warmup then cosine decay (pretrained encoders: ~5e-5)
    warmup: int = 30
    train_examples: int = 4000  # per class and classifier, drawn from the set's characters
    eval_examples: int = 300  # per class and classifier, drawn from the holdout characters
    natural_responses: int = 100  # holdout responses whose every (statement, response) pair the NLI also scores
    # Responses of the set's own characters whose every (statement, response) pair joins the NLI training data: the
    # distribution APC scores, mostly neutral. World seed 1: 200 cut the neutral statements read as contradicted per
    # response from 1.1 to 0.1 (natural neutral recall 0.953 -> 0.995), balanced recall still >= 0.9.
    natural_train: int = 200
    # Training seeds tried per classifier (seed, seed + 1, ...; see `train_best_of_seeds`): a try whose mean
    # validation recall over the classes is below gate_recall at gate_step is abandoned, a finished one whose lowest
    # recall is below TARGET_RECALL is followed by the next seed, and the best on validation is kept. The last seed is
    # never abandoned.
    seed_tries: int = 2
    gate_step: int = 600
    gate_recall: float = 0.75
    val_examples: int = 200  # per class, fresh draws from the set's own characters (validation, for the seed tries)
    # Batches (`batch_indices`): whole minimal groups (relevance pairs, NLI triples), and this share of each NLI batch
    # from `natural_train` examples (30-41% of the NLI training data in the main-job worlds, so of a random batch).
    natural_batch_share: float = 0.15
    micro_batches: int = 4  # length-sorted parts per batch: the same step, less padding (0.76x the time, 2 threads)
    max_length: int = 128  # tokens; world inputs are <= ~75
    log_every: int = 25


Config = DiscriminatorConfig  # the name `rewards.train` dispatches to


# --- input formats ------------------------------------------------------------------------------------------------
# One string each, in the world's chat markup: the role tokens are single ids of the world tokenizer and separate
# the parts for a causal classifier that reads the last token. The character name is not used: in the world the
# name is itself a statement. Any tokenizer reads the same strings (a BERT one splits "<|user|>" into word pieces).

def world_relevance_text(character: str, statement: str, query: str) -> Packed:
    """'<|user|> where do you live ? <|end|>' + ' <|system|> i live in lyon . <|end|>': the query is the prefix
    that all of a character's statements share, so the scorer reads them all in one forward (`rewards.packed`)."""
    return Packed(f"<|user|> {query} <|end|>", f" <|system|> {statement} <|end|>")


def world_nli_text(character: str, statement: str, query: str, response: str) -> Packed:
    """'<|system|> i live in lyon .' + ' <|assistant|> hey ! i live in rome ! <|end|>': the statement is the prefix
    that all responses scored against it share (`rewards.packed`).

    Statement first: the SFT policy the classifier starts from has learned to copy a value from its system turn
    into its answer, which is the comparison NLI needs; response first (each statement a block after the response,
    so one sequence per response) did not learn it (world seed 0, reward set, 2026-12-04: recall contradicted /
    neutral / entailed 0.46/1.00/0.58 after 1200 steps, the first seed abandoned at step 600). The query is left
    out: a world response states its fact in full, so the label never depends on the query, and with it in the input
    the classifier confuses the query's slot words with the response's (docs/experiments/apc_discriminators.md)."""
    return Packed(f"<|system|> {statement}", f" <|assistant|> {response} <|end|>")


FORMATS = {"relevance": world_relevance_text, "nli": world_nli_text}
# Part of the cache name of `discriminators_artifact`: bump it when the formats or the example builders change, so
# that classifiers trained on the old ones are not reused (v2: the NLI input lost the query, minimal triples; v3:
# relevance reads the query first, packed).
FORMAT_VERSION = 3


def natural_nli_metrics(model, tokenizer, groups: list[list[tuple[tuple, int]]], max_length: int) -> dict:
    """Recall per class on `natural_nli_examples`, and the mean number of statements per response that are neutral
    but read as contradicted (each one costs ΔAPC up to 1 in the passive penalty)."""
    texts = [world_nli_text(*args) for group in groups for args, _ in group]
    labels = [y for group in groups for _, y in group]
    predicted = predict(model, tokenizer, texts, NLI_LABELS, max_length)
    metrics = recall_metrics(predicted, labels, NLI_LABELS)
    neutral, contradicted = NLI_LABELS.index("neutral"), NLI_LABELS.index("contradicted")
    phantom = sum(y == neutral and p == contradicted for y, p in zip(labels, predicted, strict=True))
    return {**metrics, "responses": len(groups), "phantom_contradictions_per_response": phantom / len(groups)}


# --- training and evaluation -------------------------------------------------------------------------------------
def batch_indices(grouped: int, group: int, loose: int, cfg: DiscriminatorConfig, generator) -> torch.Tensor:
    """The example indices of one training batch of cfg.batch_size: whole minimal groups (the first `grouped`
    examples, `group` consecutive ones each: a relevance pair, an NLI triple), and when `loose` examples follow them
    (`natural_train`), about cfg.natural_batch_share of the batch drawn from those. Why whole groups: the module
    docstring."""
    import torch

    n = (cfg.batch_size - (round(cfg.natural_batch_share * cfg.batch_size) if loose else 0)) // group
    whole = (group * torch.randint(grouped // group, (max(n, 1),), generator=generator)[:, None]
             + torch.arange(group)).flatten()
    if not loose:
        return whole
    return torch.cat([whole, grouped + torch.randint(loose, (cfg.batch_size - len(whole),), generator=generator)])


def train_classifier(model, tokenizer, texts: list, labels: list[int], group: int, grouped: int,
                     cfg: DiscriminatorConfig, steps: int, desc: str, run, seed: int, gate=None) -> dict:
    """Cross-entropy on batches of whole minimal groups (`batch_indices`: texts[:grouped] in groups of `group`, the
    rest loose; order from `seed`), each run as cfg.micro_batches length-sorted parts that add up to the batch's mean
    loss; AdamW with warmup + cosine decay. Returns the timing and last loss. `gate(model) -> bool` is asked at
    cfg.gate_step: on False training stops there ("abandoned_at")."""
    import inspect
    import itertools

    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from rewards.packed import flat, pack, packable, packed_logits, tokenize_packed

    y = torch.tensor(labels)
    if packable(model):  # the inputs of a batch that share a prefix (an NLI triple's response) share a sequence
        prefix_of, prefix_ids, block_ids = tokenize_packed(tokenizer, texts, desc)

        def parts(idx: list[int]):
            sequences = pack(idx, prefix_of, prefix_ids, block_ids, budget=4 * cfg.max_length)  # longest first
            bounds = [round(i * len(sequences) / cfg.micro_batches) for i in range(cfg.micro_batches + 1)]
            for chunk in (sequences[a:b] for a, b in itertools.pairwise(bounds)):
                if chunk:
                    logits, owners = packed_logits(model, chunk, tokenizer.pad_token_id)
                    yield logits, y[owners].to(model.device)
    else:  # encoders: one text per input, in length-sorted parts (padding to the longest wastes ~40%, 4 parts ~13%)
        accepts = set(inspect.signature(model.forward).parameters)  # Llama has no token_type_ids, BERT does
        whole = [flat(t) for t in texts]
        lengths = [len(ids) for ids in tokenizer(whole, truncation=True, max_length=cfg.max_length)["input_ids"]]

        def parts(idx: list[int]):
            for part in torch.tensor(sorted(idx, key=lambda i: lengths[i])).chunk(cfg.micro_batches):
                batch = tokenizer([whole[i] for i in part.tolist()], padding=True, truncation=True,
                                  max_length=cfg.max_length, return_tensors="pt")
                batch = {k: v.to(model.device) for k, v in batch.items() if k in accepts}
                yield model(**batch).logits, y[part].to(model.device)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup, steps)
    order = torch.Generator().manual_seed(seed)
    model.train()
    t0, loss, out = time.time(), torch.tensor(float("nan")), {"steps": steps}
    bar = tqdm(range(steps), desc=f"{desc} seed {seed}")
    for step in bar:
        idx = batch_indices(grouped, group, len(texts) - grouped, cfg, order).tolist()
        loss = torch.zeros(())
        for logits, targets in parts(idx):  # part losses add up to the batch's mean
            part_loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            (part_loss * len(targets) / len(idx)).backward()
            loss += part_loss.detach().cpu() * len(targets) / len(idx)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            run.log(step + 1, **{f"{desc}/loss": loss.item(), f"{desc}/lr": scheduler.get_last_lr()[0],
                                 f"{desc}/seed": seed})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if gate is not None and step + 1 == cfg.gate_step < steps:
            model.eval()
            passed = gate(model)
            model.train()
            if not passed:
                out = {"steps": step + 1, "abandoned_at": step + 1}
                break
    bar.close()
    seconds = time.time() - t0
    model.eval()
    return {**out, "train_seconds": seconds, "steps_per_second": out["steps"] / max(seconds, 1e-9),
            "final_loss": loss.item()}


def train_best_of_seeds(start: ModelConfig, tokenizer, names: tuple[str, ...], texts: list[str], labels: list[int],
                        grouped: int, val: tuple[list[str], list[int]], cfg: DiscriminatorConfig, steps: int,
                        desc: str, run):
    """Train one classifier (`train_classifier`; texts[:grouped] are minimal groups of len(names) examples) from
    seeds cfg.seed, cfg.seed + 1, ... (head initialization and batch order) until one reaches TARGET_RECALL on `val`
    (texts, labels: fresh draws from the set's own characters), at most cfg.seed_tries; returns the model best on
    `val` and a record per try.

    Why: from the policy, whether the NLI learns the value comparison still depends on the training seed with
    whole-triple batches (the module docstring): a stuck try reads a same-slot response as entailed or contradicted by
    a coin. The coin flips from one check to the next, so the lowest recall is a noisy signal; the mean recall over the
    classes is not (0.65-0.66 at steps 500-700 for a stuck try, 0.84-0.88 at step 600 for tries that learned, with
    random batches). A try whose mean validation recall is below cfg.gate_recall at cfg.gate_step is abandoned there;
    the last allowed try is never abandoned, so a model always comes out. Holdout characters are not looked at."""
    from alignment.models import load_sequence_classifier
    from alignment.runs import seed_everything

    def validate(model) -> dict:
        return evaluate_classifier(model, tokenizer, *val, names, cfg.max_length)

    def gate(model) -> bool:
        recall = validate(model)["recall"].values()
        return sum(recall) / len(recall) >= cfg.gate_recall

    best, tries = None, []
    for t in range(cfg.seed_tries):
        seed = cfg.seed + t
        seed_everything(seed)  # the head's initialization; same for both sets: they differ only by their characters
        model = load_sequence_classifier(start, tokenizer, list(names))
        last = t + 1 == cfg.seed_tries
        record = {"seed": seed, **train_classifier(model, tokenizer, texts, labels, len(names), grouped, cfg, steps,
                                                   desc, run, seed, gate=None if last else gate)}
        tries.append(record)
        if "abandoned_at" in record:
            log.info("%s: seed %d abandoned at step %d (mean validation recall below %.2f)", desc, seed,
                     record["steps"], cfg.gate_recall)
            continue
        record["validation"] = validate(model)
        if best is None or record["validation"]["min_recall"] > best[1]["validation"]["min_recall"]:
            best = (model, record)
        if record["validation"]["min_recall"] >= TARGET_RECALL:
            break
    model, chosen = best
    return model, {**chosen, "tries": tries, "train_seconds": sum(r["train_seconds"] for r in tries)}


def recall_metrics(predicted: list[int], labels: list[int], names: tuple[str, ...]) -> dict:
    """Accuracy and recall per class (share of each class's examples predicted as that class)."""
    recall = {}
    for k, name in enumerate(names):
        rows = [p for p, y in zip(predicted, labels, strict=True) if y == k]
        recall[name] = sum(p == k for p in rows) / max(len(rows), 1)
    accuracy = sum(p == y for p, y in zip(predicted, labels, strict=True)) / max(len(labels), 1)
    return {"accuracy": accuracy, "recall": recall, "min_recall": min(recall.values()), "examples": len(labels)}


def predict(model, tokenizer, texts: list[Packed], names: tuple[str, ...], max_length: int) -> list[int]:
    """The most probable label index (in the order of `names`) of each input, through the same packed forward the
    APC scorer uses."""
    from rewards.apc import Discriminator
    from rewards.packed import flat

    disc = Discriminator(model, tokenizer, names, "eval", batch_size=256, max_length=max_length)
    if disc.packable:
        return disc.packed_probs(texts)[0].argmax(-1).tolist()
    return disc.probs(disc.encode([flat(t) for t in texts], truncate=True)).argmax(-1).tolist()


def evaluate_classifier(model, tokenizer, texts: list, labels: list[int], names: tuple[str, ...],
                        max_length: int) -> dict:
    """Recall per class on held-out examples."""
    return recall_metrics(predict(model, tokenizer, texts, names, max_length), labels, names)


def start_model(cfg: DiscriminatorConfig) -> ModelConfig:
    """The model every classifier starts from: the SFT policy (init=policy; trained on the same world and cached,
    as `alignment.dpo` does, if `policy` is unset) or `cfg.model`."""
    if cfg.init == "model":
        return cfg.model
    from alignment.policy import starting_policy

    policy = starting_policy(cfg.policy, cfg.sft, cfg.world, cfg.runs_dir, data=cfg.data)
    return replace(cfg.model, name_or_path=str(policy), preset=None)


def load_saved(model: ModelConfig, tokenizer, names: tuple[str, ...], saved: Path):
    """The classifier saved at `saved` by an earlier attempt of a resumed run, or None."""
    from alignment.models import load_sequence_classifier

    if not (saved / "config.json").is_file():
        return None
    return load_sequence_classifier(replace(model, name_or_path=str(saved), preset=None, lora=None), tokenizer,
                                    list(names))


def main(cfg: DiscriminatorConfig) -> Path:
    import torch

    from alignment.models import load_tokenizer, pretrained_path, save_model
    from alignment.runs import Run
    from alignment.world import load_world, world_artifact

    # --- setup
    if cfg.seed_tries < 1:
        raise ConfigError(f"seed_tries: need at least 1 training seed per classifier, got {cfg.seed_tries}")
    if cfg.batch_size < len(NLI_LABELS) + 1:
        raise ConfigError(f"batch_size: need room for a whole NLI triple and a natural example (>= 4), got "
                          f"{cfg.batch_size}")
    if not 0 <= cfg.natural_batch_share < 1:
        raise ConfigError(f"natural_batch_share: need a share in [0, 1), got {cfg.natural_batch_share}")
    if cfg.micro_batches < 1:
        raise ConfigError(f"micro_batches: need at least 1, got {cfg.micro_batches}")
    run = Run.start(cfg, "discriminators", runs_dir=cfg.runs_dir, name=cfg.name, resume=cfg.resume)
    world_path = Path(cfg.data) if cfg.data else world_artifact(cfg.world, cfg.runs_dir)
    world = load_world(world_path)
    start = start_model(cfg)
    run.add_meta("data", {"world": str(world_path), "init": start.name_or_path or f"preset {start.preset}"})
    tokenizer = load_tokenizer(pretrained_path(start) or world_path / "tokenizer")
    # Batches of 64 short sequences: more threads than cores only add contention (2 cores here).
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    load_before = os.getloadavg()[0]

    # --- data: the holdout sets are shared by both sets, so their numbers compare
    data = {(split, what): make_examples(world, split, what, cfg.train_examples, cfg.seed + i)
            for i, (split, what) in enumerate((s, w) for s in SETS for w in CLASSIFIERS)}
    natural_train = {split: [e for group in natural_nli_examples(world, split, cfg.natural_train, cfg.seed + 300 + i)
                             for e in group]
                     for i, split in enumerate(SETS)}  # the distribution APC scores, mostly neutral
    # Validation, for picking the training seed: fresh draws from the same characters (like the holdout sets, they
    # share the grammar's sentences with training: ~50% of relevance inputs and ~3% of NLI inputs were seen).
    val = {}
    for i, (split, what) in enumerate((s, w) for s in SETS for w in CLASSIFIERS):
        drawn = make_examples(world, split, what, cfg.val_examples, cfg.seed + 400 + i)
        val[(split, what)] = ([FORMATS[what](*args) for args, _ in drawn], [y for _, y in drawn])
    holdout = {what: make_examples(world, "holdout", what, cfg.eval_examples, cfg.seed + 100 + i)
               for i, what in enumerate(CLASSIFIERS)}
    natural = natural_nli_examples(world, "holdout", cfg.natural_responses, cfg.seed + 200)

    # --- train and evaluate the four classifiers
    results: dict = {}
    steps = {"relevance": cfg.relevance_steps, "nli": cfg.nli_steps}
    for split in SETS:
        for what, names in CLASSIFIERS.items():
            out = run.path(f"{split}/{what}")
            fmt, test = FORMATS[what], holdout[what]
            train = data[(split, what)] + (natural_train[split] if what == "nli" else [])
            texts = [fmt(*args) for args, _ in train]
            model, training = load_saved(start, tokenizer, names, out), {}
            if model is None:
                model, training = train_best_of_seeds(start, tokenizer, names, texts, [y for _, y in train],
                                                      len(data[(split, what)]), val[(split, what)], cfg, steps[what],
                                                      f"{split}/{what}", run)
                save_model(model, tokenizer, out)
            metrics = evaluate_classifier(model, tokenizer, [fmt(*args) for args, _ in test], [y for _, y in test],
                                          names, cfg.max_length)
            # Holdout characters share the grammar's sentences: report how many inputs were seen verbatim.
            seen = set(texts)
            metrics["seen_in_training"] = sum(fmt(*args) in seen for args, _ in test) / len(test)
            if what == "nli":  # the distribution APC scores: all statements against one response, mostly neutral
                metrics["natural"] = natural_nli_metrics(model, tokenizer, natural, cfg.max_length)
            results.setdefault(split, {})[what] = {**metrics, **training, "path": str(out)}
            run.log(steps[what], **{f"{split}/{what}/eval/{k}": v for k, v in metrics.items()
                                    if k not in ("recall", "natural")},
                    **{f"{split}/{what}/eval/recall_{k}": v for k, v in metrics["recall"].items()})
            print(summary_line(f"{split}/{what}", results[split][what]))

    # --- summary
    load_after = os.getloadavg()[0]
    min_recall = min(r["min_recall"] for s in SETS for r in results[s].values())
    results.update({"target_recall": TARGET_RECALL, "min_recall": min_recall,
                    "meets_target": min_recall >= TARGET_RECALL,
                    "train_seconds": sum(r.get("train_seconds", 0.0) for s in SETS for r in results[s].values()),
                    "load_average": [load_before, load_after], "threads": torch.get_num_threads(),
                    "world": str(world_path), "init": start.name_or_path or f"preset {start.preset}"})
    print(f"discriminators: {results['train_seconds']:.0f}s training, min recall {min_recall:.3f} "
          f"(target {TARGET_RECALL}), load average {load_before:.1f} -> {load_after:.1f}; {run.dir}")
    run.finish(results)
    return run.dir


def summary_line(name: str, r: dict) -> str:
    recall = ", ".join(f"{k} {v:.3f}" for k, v in r["recall"].items())
    if "natural" in r:
        n = r["natural"]
        recall += (f"; all statements x {n['responses']} responses: recall "
                   + ", ".join(f"{k} {v:.3f}" for k, v in n["recall"].items())
                   + f", {n['phantom_contradictions_per_response']:.1f} neutral statements read as contradicted per "
                     "response")
    if "tries" in r:
        tries = ", ".join(f"seed {t['seed']} " + (f"abandoned at step {t['abandoned_at']}" if "abandoned_at" in t
                                                    else f"validation min recall {t['validation']['min_recall']:.2f}")
                          for t in r["tries"])
        timing = (f"; seed {r['seed']}, {r['steps']} steps at {r['steps_per_second']:.0f}/s, {r['train_seconds']:.1f}s"
                  f" in all ({tries})")
    else:
        timing = "; loaded from the resumed run"
    return (f"{name}: holdout accuracy {r['accuracy']:.3f}, recall {recall} ({r['examples']} examples, "
            f"{r['seen_in_training']:.0%} seen in training){timing}")


# --- for other stages ---------------------------------------------------------------------------------------------
def discriminators_artifact(cfg: DiscriminatorConfig) -> Path:
    """Both discriminator sets for a config, trained once and cached under runs/cache/apc-discriminators-<hash>/run/
    (the training run itself); run fields (name, resume, runs_dir) do not enter the key."""
    from alignment.cache import cached_artifact
    from alignment.world import world_artifact

    if cfg.init == "policy" and cfg.policy is None:  # the policy lives in runs_dir's cache, not in the artifact
        cfg = replace(cfg, policy=start_model(cfg).name_or_path)
    cfg = replace(cfg, data=cfg.data or str(world_artifact(cfg.world, cfg.runs_dir)))
    key = replace(cfg, name=None, resume=False, runs_dir="")
    build = lambda out: main(replace(cfg, runs_dir=str(out), name="run", resume=False))
    return cached_artifact(f"apc-discriminators-v{FORMAT_VERSION}", key, build, runs_dir=cfg.runs_dir) / "run"


def load_scorer(path: str | os.PathLike, set: Literal["reward", "evaluator"] = "reward", **kw):
    """A `rewards.apc.APCScorer` over the relevance and NLI classifiers of one set in a discriminators run
    directory, with the input formats they were trained on; `kw` goes to APCScorer (batch_size, device, ...)."""
    from alignment.models import load_sequence_classifier, load_tokenizer
    from rewards.apc import APCScorer

    if set not in SETS:
        raise ValueError(f"set must be one of {list(SETS)}, got {set!r}")
    models = []
    for what, names in CLASSIFIERS.items():
        directory = Path(path) / set / what
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory}: no classifier here; train one: python -m rewards.train "
                                    "config=apc_discriminators.yaml")
        tokenizer = load_tokenizer(directory)
        models += [load_sequence_classifier(ModelConfig(name_or_path=str(directory)), tokenizer, list(names)),
                   tokenizer]
    return APCScorer(*models, relevance_text=world_relevance_text, nli_text=world_nli_text, **kw)


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(DiscriminatorConfig, main)
