"""Benchmark: guided decoding (decoding/) against plain generation and against PAD's released serving loop.

Everything runs in one process, on two models each built from a config with random weights (random weights change
nothing about the cost of a forward; EOS is banned so every row generates exactly --new-tokens tokens):

    world   the tiny world policy's shape (3 layers x 128, ~0.7M parameters; its trained weights when cached)
    bench   a ~25M-parameter Llama (6 layers x 512, vocabulary 8192), big enough that compute, not Python
            overhead, dominates a step

and for each, 16 users with prompts of ~48 tokens and 128 new tokens each, greedy:

    plain             HF `model.generate` (the baseline of every ratio) and our loop without guidance
    pad, genarm       with a same-size guide and with a guide 1/8 the size: cost = time / plain time
    heterogeneity     16 users with 16 different preferences in one batch vs the same 16 users all given one
                      preference (PAD: preference texts of different lengths; Drift: per-row weights over 7
                      attribute prompts on the small guide); and --sample-users users one at a time vs the same
                      users batched
    released          PAD as released (zjuruizhechen/PAD inference/PAD.py): one user at a time, no KV cache, base
                      and guide recomputed over the whole prefix at every token, against ours (cached, batched) on
                      the same --sample-users users, unscaled
Every ratio between two decodings that must write the same greedy tokens is printed only when they agree on at
least AGREEMENT (99%) of the tokens; otherwise the line says how far they agree and the JSON ratio is null.

    real    SmolLM2-135M-Instruct (`--models smollm2-135m-instruct`, alignment/model_sources.py): 16 users with
            English chat prompts and personas, 32 new tokens; PAD self-guided (the base model itself reads the
            user's persona in its system turn; the base reads the prompt without it) against plain decoding, and
            16 different personas against 16 users sharing one; our loop against HF generate (greedy tokens)

    python bench/decode.py                      # ~11 min on the 2-core CPU
    python bench/decode.py --models smollm2-135m-instruct   # the real model's rows alone
    python bench/decode.py --models bench --repeats 5 --threads 2
    python bench/decode.py --device cuda --dtype bfloat16   # on a GPU (every step synchronized before its clock stops)

Prints ratios; throughput is generated tokens per second; each figure is the median of --repeats runs. The last
line is one JSON object with every figure, the load average before and after, and the thread count.

The measured figures (CPU and H100) are in docs/experiments/decoding_bench.md.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decoding import combiners
from decoding.guides import Guide, left_pad
from decoding.loop import decode_steps
from decoding.processors import RuleProcessor, drift_rule, genarm_rule, pad_rule

EOS, PAD = 2, 0
REAL = "smollm2-135m-instruct"
# A ratio between two decodings is printed only when their greedy tokens agree on this share (fp32: batched users
# get the tokens of each user alone, and PAD's released loop ours), as bench/apc_score.py refuses unequal scores.
AGREEMENT = 0.99
SHAPES = {  # (hidden, layers, heads, intermediate, vocab) of the base; the small guide is ~1/8 of its parameters
    "world": {"base": (128, 3, 4, 384, 512), "small": (32, 2, 2, 96, 512)},
    "bench": {"base": (512, 6, 8, 1024, 8192), "small": (160, 2, 5, 320, 8192)},
}


def build(shape, seed: int) -> LlamaForCausalLM:
    hidden, layers, heads, inter, vocab = shape
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=512,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def world_policy_or_random():
    """The cached default world SFT policy when it exists (no training here), else a random model of its shape."""
    from alignment.policy import cached_policy

    if (cached := cached_policy(Path(__file__).resolve().parent.parent / "runs")) is not None:
        return LlamaForCausalLM.from_pretrained(cached, dtype=torch.float32).eval(), "trained world SFT policy"
    return build(SHAPES["world"]["base"], 0), "random weights, world policy shape"


# --- workload -------------------------------------------------------------------------------------------------------
def workload(vocab: int, users: int, seed: int = 0) -> dict:
    """Per user: a base prompt (~48 tokens), a preference text (4-24 tokens: different preferences, different
    lengths), Drift weights over 7 attributes; plus 7 attribute texts and a neutral one."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (int(n),), generator=g).tolist()
    return {"prompts": [ids(40 + torch.randint(17, (1,), generator=g)) for _ in range(users)],
            "preferences": [ids(4 + torch.randint(21, (1,), generator=g)) for _ in range(users)],
            "weights": torch.randn(users, 7, generator=g),
            "attributes": [ids(6 + 2 * i) for i in range(8)]}  # index 0: the neutral prompt


def homogeneous(w: dict) -> dict:
    """The same users (same prompts) all given user 0's preference."""
    n = len(w["prompts"])
    return {**w, "preferences": [w["preferences"][0]] * n, "weights": w["weights"][:1].expand(n, -1).clone()}


def first(w: dict, n: int) -> dict:
    """The workload of its first `n` users."""
    return {**w, "prompts": w["prompts"][:n], "preferences": w["preferences"][:n], "weights": w["weights"][:n]}


def only(w: dict, u: int) -> dict:
    return {**w, "prompts": w["prompts"][u:u + 1], "preferences": w["preferences"][u:u + 1],
            "weights": w["weights"][u:u + 1]}


def rules(models: dict, w: dict, method: str, guide: str):
    """A fresh rule for the workload's users (build = prefill of the guide, timed with the decoding)."""
    prompted = [p + q for p, q in zip(w["prompts"], w["preferences"], strict=True)]
    if method == "pad":
        return pad_rule(Guide(models[guide], *left_pad(prompted, PAD)), 1.0, 10)
    if method == "genarm":
        return genarm_rule(Guide(models[guide], *left_pad(prompted, PAD)), 1.0)
    contexts = [a + p for p in w["prompts"] for a in w["attributes"]]  # attribute prompt before the user's prompt
    return drift_rule(Guide(models[guide], *left_pad(contexts, PAD)), w["weights"], 1.0)


# --- the timed runs -------------------------------------------------------------------------------------------------
def hf_plain(models, w, n):
    ids, mask = left_pad(w["prompts"], PAD, models["base"].device)
    with torch.inference_mode():
        return models["base"].generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS)[:, ids.shape[1]:]


def hf_guided(models, w, n, method, guide):
    ids, mask = left_pad(w["prompts"], PAD, models["base"].device)
    processor = RuleProcessor(rules(models, w, method, guide), len(ids))
    with torch.inference_mode():
        return models["base"].generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS,
                                       logits_processor=[processor])[:, ids.shape[1]:]


def ours(models, w, n, method=None, guide=None):
    """Our decoding as a generator of steps; the rule (the guide's prefill) is built inside the first step."""
    rule = rules(models, w, method, guide) if method else None
    yield from decode_steps(models["base"], *left_pad(w["prompts"], PAD), rule, max_new_tokens=n, min_new_tokens=n,
                            eos_token_id=EOS, pad_token_id=PAD)


def one_at_a_time(models, w, n, method, guide, users: int):
    for u in range(users):
        yield from ours(models, only(w, u), n, method, guide)


@torch.inference_mode()
def released_pad(models, w, n, users: int, guide: str = "guide"):
    """PAD.py's loop: per user, per token, full-prefix forwards of base and guide (no cache), top-10 rule."""
    device = models["base"].device
    for u in range(users):
        base_ids = torch.tensor([w["prompts"][u]], device=device)
        guide_ids = torch.tensor([w["prompts"][u] + w["preferences"][u]], device=device)
        for _ in range(n):
            zb = models["base"](input_ids=base_ids).logits[:, -1].float()
            zg = models[guide](input_ids=guide_ids).logits[:, -1].float()
            zb[:, EOS] = float("-inf")  # EOS ignored, as in the other runs
            scores = combiners.keep_masked(zb, combiners.pad_scores(zb, zg, torch.ones(1, device=device), 10))
            token = scores.argmax(-1, keepdim=True)
            base_ids, guide_ids = torch.cat([base_ids, token], 1), torch.cat([guide_ids, token], 1)
            yield token[:, 0]


# --- measurement ----------------------------------------------------------------------------------------------------
def sync() -> None:
    """Wait for the GPU's queued work, so a step's clock stops when its kernels are done (a no-op on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(candidate, baseline, steps_per_run: int) -> dict:
    """Run two decodings step by step in alternation, timing each step, so that load that comes and goes on a
    shared machine hits both alike. The candidate runs once; the baseline restarts whenever it finishes, and its
    time is reported per run of `steps_per_run` steps. ratio = candidate time / baseline time per run."""
    runs, t, steps = {"c": candidate(), "b": baseline()}, {"c": 0.0, "b": 0.0}, {"c": 0, "b": 0}
    out = {"c": [], "b": []}
    while runs["c"] is not None:
        for k in ("c", "b"):
            t0 = time.perf_counter()
            try:
                token = next(runs[k])
            except StopIteration:
                if k == "c":
                    runs["c"] = None
                    break
                runs["b"], token = baseline(), None
            sync()
            t[k] += time.perf_counter() - t0
            if token is not None:
                steps[k] += 1
                out[k].append(token)
    per_run = t["b"] / steps["b"] * steps_per_run
    return {"candidate_s": t["c"], "baseline_s": per_run, "ratio": t["c"] / per_run,
            "candidate_tokens": out["c"], "baseline_tokens": out["b"][:steps_per_run]}


def measure(candidate, baseline, steps_per_run: int, repeats: int) -> dict:
    """`interleaved` `repeats` times; medians, plus the share of equal tokens where the two must agree."""
    rs = [interleaved(candidate, baseline, steps_per_run) for _ in range(repeats)]
    ratios = [r["ratio"] for r in rs]
    return {"ratio": statistics.median(ratios), "ratios": ratios,
            "candidate_s": statistics.median(r["candidate_s"] for r in rs),
            "baseline_s": statistics.median(r["baseline_s"] for r in rs), "last": rs[-1]}


def agreement(sequential: list[torch.Tensor], batched: list[torch.Tensor], users: int) -> float:
    """Share of equal tokens between a one-user-at-a-time run (steps of user 0, then user 1, ...) and the first
    `users` rows of a batched run (one (B,) tensor per step)."""
    a = torch.cat(sequential).view(users, -1)
    b = torch.stack(batched, 1)[:users]
    return float((a == b).float().mean()) if a.shape == b.shape else 0.0


def whole_runs(models, w, n, repeats: int) -> dict:
    """HF generate plain, our plain loop, and PAD as a LogitsProcessor inside HF generate, whole runs alternated
    (HF's loop cannot be stepped from outside); ratios against HF plain."""
    runs = {"hf": lambda: hf_plain(models, w, n), "ours": lambda: torch.stack(list(ours(models, w, n)), 1),
            "pad_processor": lambda: hf_guided(models, w, n, "pad", "guide")}
    seconds, tokens = {k: [] for k in runs}, {}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            tokens[k] = fn()
            sync()
            seconds[k].append(time.perf_counter() - t0)
    ratio = lambda k: statistics.median(x / h for x, h in zip(seconds[k], seconds["hf"], strict=True))
    return {"hf_s": statistics.median(seconds["hf"]), "ours_vs_hf": ratio("ours"),
            "pad_processor_vs_hf": ratio("pad_processor"),
            "same_tokens": float((tokens["hf"] == tokens["ours"]).float().mean())}


def suite(models: dict, users: int, n: int, repeats: int, sample_users: int) -> dict:
    """Every comparison interleaved step by step against its baseline; ratio = candidate / baseline time."""
    w = workload(models["base"].config.vocab_size, users)
    plain = lambda: ours(models, w, n)
    c = {}
    for method in ("pad", "genarm"):
        for guide in ("guide", "small"):
            c[f"{method}_{guide}"] = measure(lambda m=method, g=guide: ours(models, w, n, m, g), plain, n, repeats)
    few = first(w, sample_users)  # one user at a time and PAD's released loop: timed on the same users as ours
    for method, guide in (("pad", "guide"), ("drift", "small")):
        hetero = lambda m=method, g=guide: ours(models, w, n, m, g)
        c[f"{method}_homo_vs_hetero"] = measure(lambda m=method, g=guide: ours(models, homogeneous(w), n, m, g),
                                                hetero, n, repeats)
        c[f"{method}_alone_vs_batched"] = measure(
            lambda m=method, g=guide: one_at_a_time(models, few, n, m, g, sample_users),
            lambda m=method, g=guide: ours(models, few, n, m, g), n, repeats)
    c["released_vs_ours"] = measure(lambda: released_pad(models, few, n, sample_users),
                                    lambda: ours(models, few, n, "pad", "guide"), n, repeats)
    same = {k: agreement(c[k]["last"]["candidate_tokens"], c[k]["last"]["baseline_tokens"], sample_users)
            for k in ("pad_alone_vs_batched", "drift_alone_vs_batched", "released_vs_ours")}
    for k, share in same.items():  # a ratio of two decodings that write different tokens compares nothing
        if share < AGREEMENT:
            c[k]["ratio"] = None
    hf = whole_runs(models, w, n, repeats)
    same["ours_vs_hf_plain"] = hf.pop("same_tokens")
    for r in c.values():
        del r["last"]
    tokens = users * n
    tps = {"plain_hf": tokens / hf["hf_s"], "plain_ours": tokens / c["pad_guide"]["baseline_s"],
           "pad_guide": tokens / c["pad_guide"]["candidate_s"],
           "genarm_guide": tokens / c["genarm_guide"]["candidate_s"]}
    return {"params": {k: params(m) for k, m in models.items()}, "comparisons": c, "hf_whole_runs": hf,
            "tokens_per_second": tps, "same_tokens": same}


# --- the real model: self-guided PAD on English chat prompts ---------------------------------------------------------
QUESTIONS = ["How do I boil an egg?", "What is a good way to learn a new language?", "Why is the sky blue?",
             "How can I sleep better?", "What should I pack for a weekend trip?", "How does a bicycle stay up?",
             "What is compound interest?", "How do I start running?", "Why do cats purr?",
             "How can I focus while studying?", "What is a healthy breakfast?", "How do plants make food?",
             "How do I write a thank-you note?", "What causes rain?", "How do I keep basil alive?",
             "What is the difference between weather and climate?"]
PERSONAS = ["I like short answers.", "Please answer in bullet points, I skim.",
            "I am a retired engineer who enjoys technical detail and precise numbers in every answer.",
            "Be enthusiastic!", "I prefer a formal tone.", "Give me one concrete example every time.",
            "I am ten years old, so please use very simple words and short sentences.",
            "End with a question to me.", "No lists, please; write flowing prose.", "Keep it casual and friendly.",
            "I am a busy doctor; one sentence is all I have time to read, so get to the point quickly.",
            "I love jokes.", "Use headings.", "I am learning English; avoid idioms.",
            "Explain like a patient teacher who checks that I understood each step before moving on.",
            "Just the facts."]


def real_workload(tokenizer, users: int, shared: bool) -> dict:
    """Token rows of the base (the question, the model's default system turn) and of the self-guide (the same
    question with the user's persona as the system turn); `shared`: every user given the persona of median token
    length (so that the shared run is neither the shortest nor the longest of the mixed run's personas)."""
    from alignment.sampling import render_prompt

    encode = lambda messages: tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    questions = [QUESTIONS[u % len(QUESTIONS)] for u in range(users)]
    mixed = [PERSONAS[u % len(PERSONAS)] for u in range(users)]
    median = sorted(mixed, key=lambda p: len(tokenizer(p)["input_ids"]))[len(mixed) // 2]
    personas = [median] * users if shared else mixed
    return {"base": [encode([{"role": "user", "content": q}]) for q in questions],
            "guide": [encode([{"role": "system", "content": p}, {"role": "user", "content": q}])
                      for p, q in zip(personas, questions, strict=True)]}


def real_steps(model, tokenizer, stops, w: dict, n: int, pad: bool):
    """Our loop on the real model; `pad`: the self-guided PAD rule (w = 1, top-10) built in the first step."""
    device = model.device
    rule = pad_rule(Guide(model, *left_pad(w["guide"], tokenizer.pad_token_id, device)), 1.0, 10) if pad else None
    yield from decode_steps(model, *left_pad(w["base"], tokenizer.pad_token_id, device), rule, max_new_tokens=n,
                            min_new_tokens=n, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)


def real_suite(device: str, dtype: str, users: int, n: int, repeats: int) -> dict:
    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm, load_tokenizer, stop_ids

    tokenizer = load_tokenizer(REAL)
    model = load_causal_lm(ModelConfig(preset=REAL, device=device, dtype=dtype), tokenizer)
    stops = stop_ids(model, tokenizer)
    mixed, shared = real_workload(tokenizer, users, False), real_workload(tokenizer, users, True)
    plain = lambda: real_steps(model, tokenizer, stops, mixed, n, pad=False)
    c = {"pad_vs_plain": measure(lambda: real_steps(model, tokenizer, stops, mixed, n, pad=True), plain, n, repeats),
         "mixed_vs_shared": measure(lambda: real_steps(model, tokenizer, stops, shared, n, pad=True),
                                    lambda: real_steps(model, tokenizer, stops, mixed, n, pad=True), n, repeats)}
    ours = torch.stack(c["pad_vs_plain"]["last"]["baseline_tokens"], 1)
    ids, mask = left_pad(mixed["base"], tokenizer.pad_token_id, device)
    with torch.inference_mode():
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    for r in c.values():
        del r["last"]
    return {"params": params(model), "comparisons": c, "same_tokens": {"ours_vs_hf_plain": float((hf == ours)
            .float().mean())}, "tokens_per_second": {"plain_ours": users * n / c["pad_vs_plain"]["baseline_s"],
                                                      "pad_self": users * n / c["pad_vs_plain"]["candidate_s"]}}


def report_real(r: dict, users: int, n: int) -> None:
    c, tps = r["comparisons"], r["tokens_per_second"]
    print(f"\n== {REAL} ({r['params'] / 1e6:.1f}M, Q4_1-dequantized weights); {users} users x {n} new tokens")
    print(f"plain: our loop {tps['plain_ours']:.0f} tok/s; self-guided PAD {tps['pad_self']:.0f} tok/s = "
          f"{c['pad_vs_plain']['ratio']:.2f}x the time of plain (the guide is the same model: twice the compute)")
    print(f"pad: {users} different personas reach {c['mixed_vs_shared']['ratio']:.1%} of the throughput of "
          f"{users} users sharing one")
    print(f"same tokens, our plain loop vs HF generate (greedy): {r['same_tokens']['ours_vs_hf_plain']:.1%}")


def report(name: str, r: dict, users: int, n: int, sample_users: int) -> None:
    p, c, tps, hf = r["params"], r["comparisons"], r["tokens_per_second"], r["hf_whole_runs"]
    x = {k: v["ratio"] for k, v in c.items()}
    print(f"\n== {name}: base {p['base'] / 1e6:.2f}M, small guide {p['small'] / 1e6:.2f}M parameters "
          f"({p['small'] / p['base']:.2f}x); {users} users x {n} new tokens")
    print(f"plain: our loop {tps['plain_ours']:.0f} tok/s; HF generate {tps['plain_hf']:.0f} tok/s (whole runs: our "
          f"loop takes {hf['ours_vs_hf']:.2f}x its time; PAD as a LogitsProcessor in HF generate "
          f"{hf['pad_processor_vs_hf']:.2f}x)")
    for m in ("pad", "genarm"):
        print(f"{m}: same-size guide {x[f'{m}_guide']:.2f}x plain, 1/8-size guide {x[f'{m}_small']:.2f}x")
    agree = r["same_tokens"]
    shown = lambda k, f: f"{x[k]:{f}}x" if x[k] is not None else f"no ratio (tokens agree on {agree[k]:.1%})"
    for m in ("pad", "drift"):
        print(f"{m}: {users} different preferences reach {x[f'{m}_homo_vs_hetero']:.1%} of the throughput of one "
              f"shared preference; {sample_users} users one at a time take "
              f"{shown(f'{m}_alone_vs_batched', '.1f')} the time of the same {sample_users} batched")
    print(f"PAD's released loop (one user at a time, no cache) on {sample_users} users takes "
          f"{shown('released_vs_ours', '.1f')} the time of ours (cached, batched) on the same users")
    print("same tokens where the paths must agree (greedy): " + ", ".join(
        f"{k} {v:.1%}" for k, v in r["same_tokens"].items()))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=f"world,bench,{REAL}", help=f"comma-separated: world, bench, {REAL}")
    parser.add_argument("--real-new-tokens", type=int, default=32, help=f"new tokens per user on {REAL}")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-users", type=int, default=4,
                        help="users timed one at a time and in PAD's released loop, against ours on the same users")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of every model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    figures = {"users": args.users, "new_tokens": args.new_tokens, "real_new_tokens": args.real_new_tokens,
               "repeats": args.repeats, "threads": args.threads,
               "device": args.device, "dtype": args.dtype}
    for name in args.models.split(","):
        if name == REAL:
            r = real_suite(args.device, args.dtype, args.users, args.real_new_tokens, args.repeats)
            report_real(r, args.users, args.real_new_tokens)
            figures[name] = r
            figures["real_pad_vs_plain"] = r["comparisons"]["pad_vs_plain"]["ratio"]
            figures["real_mixed_vs_shared"] = r["comparisons"]["mixed_vs_shared"]["ratio"]
            continue
        if name == "world":
            base, source = world_policy_or_random()
            shape = SHAPES["world"]["small"][:-1] + (base.config.vocab_size,)
            models = {"base": base, "guide": build((base.config.hidden_size, base.config.num_hidden_layers,
                                                    base.config.num_attention_heads, base.config.intermediate_size,
                                                    base.config.vocab_size), 1), "small": build(shape, 2)}
        else:
            models, source = {k: build(s, i) for i, (k, s) in enumerate(SHAPES[name].items())}, "random weights"
            models["guide"] = build(SHAPES[name]["base"], 7)
        models = {k: m.to(args.device, getattr(torch, args.dtype)) for k, m in models.items()}
        r = suite(models, args.users, args.new_tokens, args.repeats, args.sample_users)
        report(f"{name} ({source})", r, args.users, args.new_tokens, args.sample_users)
        figures[name] = {**r, "weights": source}
    figures["load_average"] = {"before": load_before, "after": os.getloadavg()}
    after = figures["load_average"]["after"][0]
    print(f"\nload average {load_before[0]:.1f} -> {after:.1f} on {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s); {args.device}, {args.dtype}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
