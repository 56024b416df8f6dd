"""Which measurable attributes of SmolLM2-135M-Instruct's replies can an arm move? (issue 22, deliverable 1)

    OMP_NUM_THREADS=1 python bench/text_attribute_rates.py --prompts 24 --tokens 48 --base-samples 4
    OMP_NUM_THREADS=1 python bench/text_attribute_rates.py --place user --modes greedy

Samples `--prompts` everyday instructions (alignment/text_users.py, a seeded spread over topics and tasks) with no
instruction (the template's default system turn) and under one instruction per attribute, appended to the system
turn (or with `--place user` to the user's message), greedy and at T=0.7, top-p 0.9 (per-row seeds), through the
batched KV-cached loop of decoding/generate.py. For every condition it prints, per measure of
alignment/text_attributes.py, the share of replies where the measure is > 0 and its mean (the base condition is
the baseline every row is read against); and, for the base, the spread across `--base-samples` sampled replies per
prompt (mean per-prompt standard deviation, and the share of prompts whose samples disagree on "> 0"). Ends with
one JSON line. Figures: docs/experiments/text_users.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from alignment.config import ModelConfig
from alignment.models import load_causal_lm, load_tokenizer, stop_ids
from alignment.sampling import default_system, with_system_suffix
from alignment.text_attributes import MEASURES, measure_all
from alignment.text_users import prompt_texts
from decoding.loop import encode_prompts, generate

# One system instruction per attribute of text_attributes.MEASURES ("words" and "sentence_length" share one).
INSTRUCTIONS = {
    "list": "Answer with a bulleted list.",
    "formatting": "Use markdown headings and bold text.",
    "question": "End by asking me a question.",
    "example": "Give a concrete example.",
    "enthusiasm": "Answer with great enthusiasm and exclamation marks!",
    "casual": "Write casually, with contractions like don't and it's.",
    "greeting": "Start with a greeting and end with a sign-off.",
    "you": "Address me directly as you.",
    "short": "Answer in one short sentence.",
    "long": "Give a long, detailed answer.",
    "summary": "Start with a one-line summary, then the details.",
}


def decode(model, tok, chats, *, tokens, temperature, seeds, batch):
    out = []
    for i in range(0, len(chats), batch):
        ids, mask = encode_prompts(tok, chats[i:i + batch])
        rows = len(ids)
        top_p = torch.full((rows,), 0.9) if temperature > 0 else None
        new = generate(model, ids, mask, max_new_tokens=tokens, eos_token_id=stop_ids(model, tok),
                       pad_token_id=tok.pad_token_id, temperature=temperature, seeds=seeds[i:i + batch], top_p=top_p)
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def table(texts: list[str]) -> dict:
    m = np.array([[v for v in measure_all(t).values()] for t in texts])
    return {name: {"fires": float((m[:, k] > 0).mean()), "mean": float(m[:, k].mean())}
            for k, name in enumerate(MEASURES)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--base-samples", type=int, default=4)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--place", choices=["system", "user"], default="system",
                    help="append each instruction to the system turn (after the template's default) or the user turn")
    ap.add_argument("--modes", default="greedy,T0.7", help="comma-separated: greedy, T0.7")
    ap.add_argument("--out", default=None, help="write every reply and table here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = prompt_texts()
    pick = np.random.default_rng(0).choice(len(rows), size=args.prompts, replace=False)
    prompts = [[{"role": "user", "content": rows[i][1]}] for i in sorted(pick)]
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm(ModelConfig(preset="smollm2-135m-instruct", dtype="float32", device="cpu"), tok)
    default = default_system(tok)
    def instructed(p, s):
        if args.place == "user":
            return [{"role": "user", "content": f"{p[0]['content']} {s}"}]
        return with_system_suffix(p, s, default)

    conditions = {"base": prompts} | {name: [instructed(p, s) for p in prompts] for name, s in INSTRUCTIONS.items()}
    modes = [(m, {"greedy": 0.0, "T0.7": 0.7}[m]) for m in args.modes.split(",")]
    n = len(prompts)
    results, replies, start, tokens = {}, {}, time.perf_counter(), 0
    for name, chats in conditions.items():
        for mode, temperature in modes:
            copies = args.base_samples if (name == "base" and temperature > 0) else 1
            seeds = [1000 * c + j for c in range(copies) for j in range(n)]
            texts = decode(model, tok, chats * copies, tokens=args.tokens, temperature=temperature, seeds=seeds,
                           batch=args.batch)
            tokens += len(texts) * args.tokens
            replies[f"{name}/{mode}"] = texts
            results[f"{name}/{mode}"] = table(texts[:n])
            if copies > 1:
                m = np.array([[list(measure_all(t).values()) for t in texts[c * n:(c + 1) * n]]
                              for c in range(copies)])  # (copies, prompts, measures)
                results["base/spread"] = {name_: {"sd": float(m[:, :, k].std(0).mean()),
                                                  "disagree": float(((m[:, :, k] > 0).any(0)
                                                                     & ~(m[:, :, k] > 0).all(0)).mean()),
                                                  "fires_all": float((m[:, :, k] > 0).mean())}
                                          for k, name_ in enumerate(MEASURES)}
            print(f"{name:10s} {mode:6s} {time.perf_counter() - start:6.0f} s", flush=True)
    seconds = time.perf_counter() - start
    for key, tab in results.items():
        print(key, json.dumps({m: {k: round(v, 3) for k, v in d.items()} for m, d in tab.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "replies": replies}, f, indent=1)
    print(json.dumps({"seconds": round(seconds, 1), "tokens_budget": tokens, "prompts": n,
                      "results": results}))


if __name__ == "__main__":
    main()
