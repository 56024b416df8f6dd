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
                      attribute prompts on the small guide), and vs one user at a time
    released          PAD as released (zjuruizhechen/PAD inference/PAD.py): one user at a time, no KV cache, base
                      and guide recomputed over the whole prefix at every token; timed on --released-users users
                      and scaled linearly to 16 (the loop is sequential with identical work per user), against
                      ours (cached, 16 users batched). Both must emit the same tokens first.

    python bench/decode.py                      # ~10 min on a loaded 2-core CPU
    python bench/decode.py --models bench --repeats 5 --threads 2

Prints ratios; throughput is generated tokens per second; each figure is the median of --repeats runs. The last
line is one JSON object with every figure, the load average before and after, and the thread count.
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decoding import combiners
from decoding.generate import generate
from decoding.guides import Guide, left_pad
from decoding.processors import RuleProcessor, drift_rule, genarm_rule, pad_rule

EOS, PAD = 2, 0
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
    """The cached world SFT policy when it exists (no training here), else a random model of its shape."""
    from dataclasses import replace

    from alignment.cache import artifact_dir, is_complete
    from alignment.sft import SFTConfig, final_model

    cached = artifact_dir("sft", replace(SFTConfig(), runs_dir=""))
    if is_complete(cached):
        model = LlamaForCausalLM.from_pretrained(final_model(cached / "run"), dtype=torch.float32).eval()
        return model, "trained world SFT policy"
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
    ids, mask = left_pad(w["prompts"], PAD)
    with torch.inference_mode():
        return models["base"].generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS)[:, ids.shape[1]:]


def hf_guided(models, w, n, method, guide):
    ids, mask = left_pad(w["prompts"], PAD)
    processor = RuleProcessor(rules(models, w, method, guide), len(ids))
    with torch.inference_mode():
        return models["base"].generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS,
                                       logits_processor=[processor])[:, ids.shape[1]:]


def ours(models, w, n, method=None, guide=None):
    rule = rules(models, w, method, guide) if method else None
    return generate(models["base"], *left_pad(w["prompts"], PAD), rule, max_new_tokens=n, min_new_tokens=n,
                    eos_token_id=EOS, pad_token_id=PAD)


def one_at_a_time(models, w, n, method, guide):
    return torch.cat([ours(models, only(w, u), n, method, guide) for u in range(len(w["prompts"]))])


@torch.inference_mode()
def released_pad(models, w, n, users: int, guide: str = "guide"):
    """PAD.py's loop: per user, per token, full-prefix forwards of base and guide (no cache), top-10 rule."""
    out = []
    for u in range(users):
        base_ids = torch.tensor([w["prompts"][u]])
        guide_ids = torch.tensor([w["prompts"][u] + w["preferences"][u]])
        for _ in range(n):
            zb = models["base"](input_ids=base_ids).logits[:, -1].float()
            zg = models[guide](input_ids=guide_ids).logits[:, -1].float()
            zb[:, EOS] = float("-inf")  # EOS ignored, as in the other runs
            token = combiners.keep_masked(zb, combiners.pad_scores(zb, zg, torch.ones(1), 10)).argmax(-1, keepdim=True)
            base_ids, guide_ids = torch.cat([base_ids, token], 1), torch.cat([guide_ids, token], 1)
        out.append(base_ids[0, -n:])
    return torch.stack(out)


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def paired(baseline, candidate, repeats: int) -> dict:
    """Time two runs alternately (the order flips every repeat), so that load that comes and goes on a shared
    machine hits both: the ratio is the median of the per-repeat ratios candidate / baseline."""
    a, b, ratios = [], [], []
    for i in range(repeats):
        first, second = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        (t1, o1), (t2, o2) = timed(first), timed(second)
        (ta, out_a), (tb, out_b) = ((t1, o1), (t2, o2)) if i % 2 == 0 else ((t2, o2), (t1, o1))
        a.append(ta), b.append(tb), ratios.append(tb / ta)
    same = float((out_a == out_b).float().mean()) if out_a.shape == out_b.shape else 0.0
    return {"baseline_s": statistics.median(a), "candidate_s": statistics.median(b),
            "ratio": statistics.median(ratios), "ratios": ratios, "same_tokens": same}


def suite(models: dict, users: int, n: int, repeats: int, released_users: int) -> dict:
    """Every comparison as a paired measurement (see `paired`); ratio = candidate time / baseline time."""
    w = workload(models["base"].config.vocab_size, users)
    plain = lambda: hf_plain(models, w, n)
    c = {"ours_plain": paired(plain, lambda: ours(models, w, n), repeats)}
    for method in ("pad", "genarm"):
        for guide in ("guide", "small"):
            c[f"{method}_{guide}"] = paired(plain, lambda m=method, g=guide: ours(models, w, n, m, g), repeats)
    c["pad_processor"] = paired(plain, lambda: hf_guided(models, w, n, "pad", "guide"), repeats)
    for method, guide in (("pad", "guide"), ("drift", "small")):
        hetero = lambda m=method, g=guide: ours(models, w, n, m, g)
        c[f"{method}_homo_vs_hetero"] = paired(hetero, lambda m=method, g=guide: ours(models, homogeneous(w), n, m, g),
                                               repeats)
        c[f"{method}_alone_vs_batched"] = paired(hetero, lambda m=method, g=guide: one_at_a_time(models, w, n, m, g),
                                                 1)
    released = paired(lambda: ours(models, only_first(w, released_users), n, "pad", "guide"),
                      lambda: released_pad(models, w, n, released_users), 1)
    batched = c["pad_alone_vs_batched"]["baseline_s"]  # ours, all users batched, same rule
    released.update(scaled_s=released["candidate_s"] * users / released_users,
                    ratio=released["candidate_s"] * users / released_users / batched)
    c["released_vs_ours"] = released
    tokens = users * n
    tps = {"plain_hf": tokens / c["ours_plain"]["baseline_s"], "plain_ours": tokens / c["ours_plain"]["candidate_s"],
           "pad_guide": tokens / c["pad_guide"]["candidate_s"],
           "genarm_guide": tokens / c["genarm_guide"]["candidate_s"],
           "pad_batched": tokens / batched, "released_pad": tokens / released["scaled_s"]}
    return {"params": {k: params(m) for k, m in models.items()}, "comparisons": c, "tokens_per_second": tps}


def only_first(w: dict, k: int) -> dict:
    return {**w, "prompts": w["prompts"][:k], "preferences": w["preferences"][:k], "weights": w["weights"][:k]}


def report(name: str, r: dict, users: int, n: int, released_users: int) -> None:
    p, c, tps = r["params"], r["comparisons"], r["tokens_per_second"]
    x = {k: v["ratio"] for k, v in c.items()}
    print(f"\n== {name}: base {p['base'] / 1e6:.2f}M, small guide {p['small'] / 1e6:.2f}M parameters "
          f"({p['small'] / p['base']:.2f}x); {users} users x {n} new tokens")
    print(f"plain: HF generate {tps['plain_hf']:.0f} tok/s; our loop takes {x['ours_plain']:.2f}x its time")
    for m in ("pad", "genarm"):
        print(f"{m}: same-size guide {x[f'{m}_guide']:.2f}x plain, 1/8-size guide {x[f'{m}_small']:.2f}x")
    print(f"pad as a LogitsProcessor inside HF generate: {x['pad_processor']:.2f}x plain")
    for m in ("pad", "drift"):
        print(f"{m}: {users} different preferences reach {x[f'{m}_homo_vs_hetero']:.1%} of the throughput of one "
              f"shared preference; batched is {x[f'{m}_alone_vs_batched']:.1f}x faster than one user at a time")
    print(f"serving {users} users: ours (cached, batched) {x['released_vs_ours']:.1f}x faster than PAD's released "
          f"loop (measured on {released_users} user(s), scaled to {users})")
    print("same tokens where the paths must agree (greedy): " + ", ".join(
        f"{k} {c[k]['same_tokens']:.1%}" for k in ("ours_plain", "pad_alone_vs_batched", "drift_alone_vs_batched"))
          + f"; released vs ours (its users) {c['released_vs_ours']['same_tokens']:.1%}")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="world,bench", help="comma-separated: world, bench")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--released-users", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    figures = {"users": args.users, "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads}
    for name in args.models.split(","):
        if name == "world":
            base, source = world_policy_or_random()
            shape = SHAPES["world"]["small"][:-1] + (base.config.vocab_size,)
            models = {"base": base, "guide": build((base.config.hidden_size, base.config.num_hidden_layers,
                                                    base.config.num_attention_heads, base.config.intermediate_size,
                                                    base.config.vocab_size), 1), "small": build(shape, 2)}
        else:
            models, source = {k: build(s, i) for i, (k, s) in enumerate(SHAPES[name].items())}, "random weights"
            models["guide"] = build(SHAPES[name]["base"], 7)
        r = suite(models, args.users, args.new_tokens, args.repeats, args.released_users)
        report(f"{name} ({source})", r, args.users, args.new_tokens, args.released_users)
        figures[name] = {**r, "weights": source}
    figures["load_average"] = {"before": load_before, "after": os.getloadavg()}
    after = figures["load_average"]["after"][0]
    print(f"\nload average {load_before[0]:.1f} -> {after:.1f} on {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s)")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
