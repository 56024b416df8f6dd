"""Benchmark: the batched APC scorer (rewards/apc.py) against the official one-statement-at-a-time loop.

The loop mirrors score_APC in KomeijiForce/Active_Passive_Constraint_Koishiday_2024 (score.py): for every response,
for every statement, one unbatched relevance forward and one unbatched NLI forward (2 * S * R forwards), then
rel[no] * (1 - nli[contradicted]) + rel[yes] * nli[entailed]. Both sides use the same discriminators, the same input
texts (the paper's templates) and the same device; the scorer's caches are cleared before every timed repeat.
The two must agree (max |V_APC difference|) before any speedup is printed.

Default discriminators: two 4-layer, 256-wide BERT (or Llama) sequence classifiers built from configs with RANDOM
weights, and a word-level tokenizer built here; random weights change nothing about the cost of a forward, so the
timings stand, but the scores themselves mean nothing. Pass --relevance-model/--nli-model for real checkpoints.

    python bench/apc_score.py                                  # |S| = 100, N = 4, CPU, 2 threads
    python bench/apc_score.py --arch llama --repeats 5
    python bench/apc_score.py --discriminators runs/cache/apc-discriminators-<hash>/run   # the pipeline's own
    python bench/apc_score.py --relevance-model DIR --nli-model DIR \
        --relevance-labels no,yes --nli-labels contradicted,neutral,entailed   # e.g. the released APC DeBERTas

With --discriminators, the scorer is the one APC-DPO uses (`rewards.discriminators.load_scorer`, reward set, world
input format) and the inputs come from that run's world: the holdout character with the most statements, one of its
queries, and N responses rendered by the world's sampler.

Ends with one JSON line of its figures.

What to expect (measured on 2 shared CPU cores, 2 threads, defaults): 1.9x and 3.4x with the machine's load average
near 3, 11.6x near 10. On a CPU one forward of a ~80-token input is already compute-bound, so batching saves mostly
the 300 repeated relevance forwards (63.2k -> 46.7k tokens) and the per-call overhead; contention inflates that
overhead for the loop's 800 small forwards far more than for 9 large ones. Per-call overhead dominates on a GPU,
where the gap is widest: one H100, fp32, defaults, median of 5: loop 2.256 s (800 forwards), batched 0.099 s (9
forwards), 22.8x, max |V_APC difference| 7.6e-6. With the pipeline's own world discriminators (--discriminators, 60
statements, 4 responses, 1 thread, CPU): loop 1.649 s (480 forwards), batched 0.446 s (5 forwards), 3.7x.
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from rewards.apc import FORMATS, APCScorer
from rewards.packed import Packed, flat

CHARACTER = "ada"
# A small world to draw statements, queries and responses from; ~10-word statements, 6-20-word responses.
SUBJECTS = ["cat", "sister", "brother", "teacher", "garden", "violin", "bakery", "boat", "library", "dog"]
VERBS = ["likes", "keeps", "visits", "paints", "repairs", "remembers", "sells", "collects", "fears", "shares"]
PLACES = ["lyon", "paris", "oslo", "lima", "cairo", "kyoto", "quebec", "porto", "dakar", "perth"]
TIMES = ["every morning", "on sundays", "in winter", "after work", "since childhood", "at night"]


def synthetic_persona(n_statements: int, n_responses: int, seed: int = 0) -> tuple[list[str], str, list[str]]:
    """Statements, one query and responses of varied length, seeded."""
    rng = random.Random(seed)
    statements = [f"{CHARACTER} {rng.choice(VERBS)} the {rng.choice(SUBJECTS)} in {rng.choice(PLACES)} "
                  f"{rng.choice(TIMES)} ." for _ in range(n_statements)]
    query = f"what do you do with the {rng.choice(SUBJECTS)} {rng.choice(TIMES)} ?"
    responses = [" ".join(f"i {rng.choice(VERBS)} the {rng.choice(SUBJECTS)} in {rng.choice(PLACES)} ,"
                          for _ in range(1 + 2 * k)) + " ." for k in range(n_responses)]
    return statements, query, responses


# Shared part first, for packed reading (--format packed, Llama only): the query (relevance) or the response (NLI)
# is the prefix, the statement the block.
PACKED = (lambda character, s, q: Packed(f"{q} [SEP]", f" {s} [SEP]"),
          lambda character, s, q, r: Packed(f"{r} [SEP]", f" {s} [SEP]"))


def word_tokenizer(texts: list[str], framed: bool = True):
    """A lowercase word-level tokenizer over `texts`, with BERT-style [CLS] ... [SEP] framing (unless `framed` is
    False: packed inputs need a tokenizer that adds nothing around an input) and [PAD] = 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text.lower())})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre
    if framed:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def random_classifier(arch: str, vocab_size: int, labels: list[str], seed: int):
    """A 4-layer, 256-wide classifier with random weights (about 3.2M parameters without embeddings)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=512, num_labels=len(labels),
                  id2label=dict(enumerate(labels)))
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(**common))
    return LlamaForSequenceClassification(LlamaConfig(**common, num_key_value_heads=4, pad_token_id=0))


def load_classifier(path: str, device: str):
    """A saved sequence classifier and its tokenizer, in float32 (v5 would otherwise keep the saved dtype)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    return model.to(device), AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def official_loop(scorer: APCScorer, statements: list[str], query: str, responses: list[str]) -> torch.Tensor:
    """V_APC per response, one statement and one forward at a time, relevance recomputed per response (R,)."""
    rel, nli = scorer.relevance, scorer.nli  # same models, tokenizers and label order as the scorer

    def probs(disc, text):
        text = flat(text)  # a Packed input is its whole text here
        args = text if isinstance(text, tuple) else (text,)  # a string or a (text, text_pair) format
        batch = disc.tokenizer(*args, return_tensors="pt", truncation=True, max_length=scorer.max_length)
        batch = {k: v.to(disc.model.device) for k, v in batch.items() if k in disc.accepts}
        return disc.model(**batch).logits[0].float().softmax(-1)[disc.index].cpu()

    totals = []
    for response in responses:
        total = torch.zeros(())
        for s in statements:
            p_rel = probs(rel, scorer.relevance_text(CHARACTER, s, query))  # [no, yes]
            p_nli = probs(nli, scorer.nli_text(CHARACTER, s, query, response))  # [contradicted, neutral, entailed]
            total += p_rel[0] * (1 - p_nli[0]) + p_rel[1] * p_nli[2]
        totals.append(total)
    return torch.stack(totals)


def world_persona(discriminators: str, n_responses: int, seed: int = 0) -> tuple[list[str], str, list[str], str]:
    """Statements, a query, responses and the character's name from the world a discriminators run trained on."""
    import numpy as np

    from alignment import language as lang
    from alignment import people
    from alignment.world import load_world

    world = load_world(json.loads((Path(discriminators) / "results.json").read_text())["world"])
    character = max((c for c in world["characters"] if c["split"] == "holdout"), key=lambda c: len(c["statements"]))
    query = next(q for q in world["queries"] if q["character_id"] == character["character_id"] and q["slot"])
    facts = [(s["slot"], s["value"]) for s in character["statements"]]
    rng = np.random.default_rng(seed)
    responses = []
    for _ in range(n_responses):
        fact, neutral = people.sample_content(rng, facts, query["slot"], (0.5, 0.2, 0.2, 0.1))
        responses.append(lang.render_response(fact, neutral, people.sample_style(rng)))
    return [s["text"] for s in character["statements"]], query["text"], responses, character["name"]


def batched(scorer: APCScorer, statements: list[str], query: str, responses: list[str],
            packed: bool = False) -> torch.Tensor:
    """V_APC by the scorer: one text per input in batches, or (packed) one sequence per shared prefix."""
    scorer.clear_cache()  # time the full work for a new query, not a cache hit
    scorer.packed = packed
    return scorer.score(statements, query, responses, character=CHARACTER).v_apc


def timed_pair(fns: dict, repeats: int, sync) -> tuple[dict, dict]:
    """Median wall time of each function over `repeats` rounds, and its last result.

    The functions alternate within each round, so a load spike on a shared machine hits both sides alike.
    """
    times, outs = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            outs[name] = fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def work(fn, models) -> dict:
    """Run `fn` once, counting the forwards of `models` and the tokens they saw, padding included."""
    counts = {"forwards": 0, "tokens": 0}

    def hook(module, args, kwargs):
        counts["forwards"] += 1
        counts["tokens"] += (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).numel()

    # On the classifiers' bodies: a packed forward calls the body and the score head, not the classifier.
    handles = [getattr(m, m.base_model_prefix).register_forward_pre_hook(hook, with_kwargs=True) for m in models]
    fn()
    for h in handles:
        h.remove()
    return counts


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--statements", type=int, default=100)
    parser.add_argument("--responses", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--arch", choices=["bert", "llama"], default="bert")
    parser.add_argument("--format", choices=[*FORMATS, "packed"], default="apc",
                        help="apc: the paper's templates (~65-120 tokens); pair: (statement, query + response); "
                             "packed: query / response first, each statement a block (Llama only)")
    parser.add_argument("--discriminators", help="a discriminators run directory (rewards.train): its reward set, "
                        "world format and world data; --statements is then the character's own count")
    parser.add_argument("--relevance-model", help="directory of a real relevance classifier")
    parser.add_argument("--nli-model", help="directory of a real NLI classifier")
    parser.add_argument("--relevance-labels", help="comma-separated label per output, for LABEL_0-style heads")
    parser.add_argument("--nli-labels", help="comma-separated label per output, for LABEL_0-style heads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    statements, query, responses = synthetic_persona(args.statements, args.responses)
    if args.discriminators:
        from rewards.discriminators import load_scorer

        statements, query, responses, _ = world_persona(args.discriminators, args.responses)  # no name in the format
        args.statements, args.format = len(statements), "world"
        scorer = load_scorer(args.discriminators, "reward", batch_size=args.batch_size, device=args.device)
        rel, nli = scorer.relevance.model, scorer.nli.model
        model_name = f"{args.discriminators} (reward set)"
    elif args.relevance_model and args.nli_model:
        rel, rel_tok = load_classifier(args.relevance_model, args.device)
        nli, nli_tok = load_classifier(args.nli_model, args.device)
        model_name = f"{args.relevance_model} + {args.nli_model}"
    else:
        if args.format == "packed" and args.arch != "llama":
            raise SystemExit("--format packed: needs --arch llama (an encoder reads no packed sequence)")
        templates = [FORMATS["apc"][0](CHARACTER, "", ""), FORMATS["apc"][1](CHARACTER, "", "", ""), "[SEP]"]
        rel_tok = nli_tok = word_tokenizer([*statements, query, *responses, *templates],
                                           framed=args.format != "packed")
        rel = random_classifier(args.arch, len(rel_tok), ["no", "yes"], 0).to(args.device)
        nli = random_classifier(args.arch, len(rel_tok), ["contradicted", "neutral", "entailed"], 1).to(args.device)
        model_name = f"{args.arch} 4 layers x 256, random weights"
    if not args.discriminators:
        labels = [x.split(",") if x else None for x in (args.relevance_labels, args.nli_labels)]
        formats = PACKED if args.format == "packed" else FORMATS[args.format]
        scorer = APCScorer(rel, rel_tok, nli, nli_tok, batch_size=args.batch_size, relevance_labels=labels[0],
                           nli_labels=labels[1], relevance_text=formats[0], nli_text=formats[1])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    fns = {"batched": lambda: batched(scorer, statements, query, responses),
           "loop": lambda: official_loop(scorer, statements, query, responses)}
    packs = isinstance(scorer.nli_text(CHARACTER, "", "", ""), Packed) and scorer.nli.packable
    if packs:  # the same scorer, reading every statement of a response (a query) in one sequence
        fns["packed"] = lambda: batched(scorer, statements, query, responses, packed=True)
    # One counted run of each, which also warms up allocations and lazy inits outside the timings.
    counts = {name: work(fn, [rel, nli]) for name, fn in fns.items()}
    medians, outs = timed_pair(fns, args.repeats, sync)
    loop_s, batched_s, v_loop, v_batched = medians["loop"], medians["batched"], outs["loop"], outs["batched"]

    max_abs_diff = max((outs[name] - v_loop).abs().max().item() for name in fns)
    print(f"discriminators: {model_name}; {args.format} format; device {args.device}, {args.threads} threads")
    print(f"|S| = {args.statements} statements, N = {args.responses} responses, median of {args.repeats}")
    print(f"V_APC loop    {[round(v, 4) for v in v_loop.tolist()]}")
    print(f"V_APC batched {[round(v, 4) for v in v_batched.tolist()]}")
    print(f"max |V_APC loop - {' / '.join(n for n in fns if n != 'loop')}| = {max_abs_diff:.2e}")
    if max_abs_diff > 1e-4:
        raise SystemExit(f"the scorers disagree by {max_abs_diff:.2e} > 1e-4; no speedup reported")
    print(f"loop     {loop_s:8.3f} s  ({counts['loop']['forwards']} forwards, {counts['loop']['tokens']} tokens)")
    print(f"batched  {batched_s:8.3f} s  ({counts['batched']['forwards']} forwards of up to {args.batch_size} inputs, "
          f"{counts['batched']['tokens']} tokens with padding)")
    print(f"speedup  {loop_s / batched_s:8.1f}x")
    if packs:
        packed_s = medians["packed"]
        print(f"packed   {packed_s:8.3f} s  ({counts['packed']['forwards']} forwards, {counts['packed']['tokens']} "
              f"tokens with padding): {loop_s / packed_s:.1f}x the loop, {batched_s / packed_s:.2f}x batched")
    figures = {"bench": "apc_score", "statements": args.statements, "responses": args.responses,
               "model": model_name, "format": args.format, "device": args.device, "threads": args.threads,
               "repeats": args.repeats,
               "loop_s": round(loop_s, 4), "batched_s": round(batched_s, 4),
               "speedup": round(loop_s / batched_s, 2), "max_abs_diff": max_abs_diff,
               "loop_forwards": counts["loop"]["forwards"], "batched_forwards": counts["batched"]["forwards"],
               "loop_tokens": counts["loop"]["tokens"], "batched_tokens": counts["batched"]["tokens"]}
    if packs:
        figures |= {"packed_s": round(medians["packed"], 4), "packed_speedup": round(loop_s / medians["packed"], 2),
                    "packed_vs_batched": round(batched_s / medians["packed"], 2),
                    "packed_forwards": counts["packed"]["forwards"], "packed_tokens": counts["packed"]["tokens"]}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
