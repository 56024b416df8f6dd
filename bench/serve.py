"""Benchmark: the decode API (decoding/serve.py) under 1, 8 and 32 concurrent clients, against serving the same
requests one at a time and against offline batched generation of the same requests.

For each model, one real `python -m decoding.serve` process on a free loopback port, driven by HTTP clients
(threads; each sends its share of the requests one after another, a closed loop); every mode serves the SAME
requests (chat prompts of ~40 random words, greedy; 128 requests x 128 new tokens on the world model, 128 x 32
on the bench model, `--requests` / `--new-tokens` to change), every mode after an untimed warm-up round at its
own concurrency, then timed `--rounds` times (default 2) in alternating order (1, 8, 32 clients, then 32, 8, 1,
so that no mode always meets the coldest server) with the fastest kept, as offline's best of two:

    one_at_a_time   1 client: every request decoded alone (the baseline of the ratios)
    clients_8/32    8 / 32 clients at once: the server batches what arrives together
    offline         `decoding.generate.generate` on the same prompts in batches of max_batch_size, in this process,
                    with no server running and the same thread count: the ceiling a server can approach (run
                    before and after the server; the faster of the two, so load that comes and goes on a shared
                    machine cannot flatter the server)

Models (the two of bench/decode.py, whose shapes are imported from there):

    world   the tiny world policy's shape (~0.7M parameters); its trained weights when the default world SFT
            policy is cached, else random weights
    bench   a ~25M-parameter Llama (6 layers x 512, vocabulary 8192), random weights
    smollm2-135m-instruct   the real model (`--models smollm2-135m-instruct`; alignment/model_sources.py): English
            questions with its chat template, greedy, stopping on its own EOS (every mode does the same work)

Random-weight models get a word-level tokenizer of their vocabulary with a chat template, and their EOS row of
lm_head is zeroed so that no row stops early (all modes then generate exactly the same tokens; bench/decode.py
bans EOS the same way through min_new_tokens). Throughput is generated tokens (`usage.completion_tokens`) per
wall-clock second; latency is per request, arrival to last byte; p50 / p99 over the requests of the mode.

    OMP_NUM_THREADS=1 python bench/serve.py                       # ~3 min on the 2-core CPU
    python bench/serve.py --models bench --requests 128 --threads 2 --device cuda --dtype bfloat16

The last line is one JSON object with every figure, the load average before and after, and the thread count.

Measured on the idle 2-core CPU (defaults: 1 torch thread, best of 2 rounds; 2:42 in all): the world model serves 32
clients at 4044 tok/s, 4.92x one-at-a-time and 0.83x offline (p50 245 ms, p99 351 ms); the bench model at 578
tok/s, 4.78x and 0.98x. On the world model the ~3-8 ms of HTTP and client work per request, paid while the worker
waits for the next round, is large next to its ~20 ms of decoding per request, so its ratio to offline is the
noisier one (0.61x-1.16x over five single-round runs on a loaded machine in an earlier session).

Real model (`--models smollm2-135m-instruct`, idle 2-core CPU, 1 thread, 32 requests x 32 tokens, greedy, 3:45 in
all): 32 clients 129 tok/s, 1.00x offline batched generation (129 tok/s) and 7.16x one at a time (18 tok/s); 8
clients 57 tok/s. No request stopped early (every reply used its 32 tokens), so every mode did the same work.

On one H100 (--device cuda --dtype bfloat16 --threads 4) a step is ~5 ms of kernel launches for either model, and
the first rounds after the server starts are slow (a timed round right after the one-batch warm-up: 1864 tok/s,
p99 6.0 s; the next round: 6512 tok/s, p99 0.67 s, against ~5700 offline; the cause, some first-use cost in the
worker thread, is not pinned down: a fresh thread running `generate` was 10x slower per step than the main thread,
every time). With one timed round: world 5.8x one-at-a-time and 0.25x offline, bench 9.4x and 0.34x; with the best
of 2 rounds (world, 64 requests, 32 clients): 4717 tok/s, 20.5x one-at-a-time, 0.66x of offline's 7127.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from decode import QUESTIONS, REAL, SHAPES, build  # noqa: E402  (bench/decode.py: the decoding bench's models)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# (requests per mode, new tokens per request): the world model as bench/decode.py (128 tokens); the 25M model is
# compute-bound on a CPU (~13 ms a step alone), so shorter requests keep its one-at-a-time run near a minute.
# 4 rounds of 32: a finite closed loop ends with one partial batch (clients that fell one request behind).
# The real model (134.5M) decodes ~20 tokens/s alone on one CPU thread: 32 requests of 32 tokens keep its
# one-at-a-time rounds near a minute.
WORKLOAD = {"world": (128, 128), "bench": (128, 32), REAL: (32, 32)}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer of exactly `vocab` ids (specials first: <pad> 0, <s> 1, </s> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))])}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def policy_dir(name: str, out: Path) -> tuple[Path, str]:
    """An HF directory the server can load: the cached world SFT policy, or a random model + word tokenizer."""
    from dataclasses import replace

    from alignment.cache import artifact_dir, is_complete
    from alignment.models import save_model
    from alignment.sft import SFTConfig, final_model

    if name == REAL:
        from alignment.model_sources import model_path

        return Path(model_path(REAL)), "SmolLM2-135M-Instruct, Q4_1-dequantized"
    if name == "world":
        cached = artifact_dir("sft", replace(SFTConfig(), runs_dir=""), runs_dir=ROOT / "runs")
        if is_complete(cached):
            return final_model(cached / "run"), "trained world SFT policy"
    model = build(SHAPES[name]["base"], 0)
    with torch.no_grad():
        model.lm_head.weight[2] = 0.0  # EOS logit 0 against ~V signed logits: never the argmax
    save_model(model, word_tokenizer(model.config.vocab_size), out / name)
    return out / name, f"random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"


def requests_for(tokenizer, n: int, new_tokens: int, seed: int = 0, english: bool = False) -> list[dict]:
    """n chat requests of ~40 words drawn from the tokenizer's vocabulary (ids >= 8: no specials); `english`: the
    everyday questions of bench/decode.py, with the model's default system turn."""
    if english:
        return [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": new_tokens,
                 "temperature": 0, "seed": i} for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    vocab = [w for w, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if i >= 8 and w.isalnum()]
    out = []
    for i in range(n):
        words = [vocab[j] for j in torch.randint(len(vocab), (int(torch.randint(30, 50, (1,), generator=g)),),
                                                 generator=g).tolist()]
        out.append({"messages": [{"role": "system", "content": " ".join(words[:10])},
                                 {"role": "user", "content": " ".join(words[10:])}],
                    "max_tokens": new_tokens, "temperature": 0, "seed": i})
    return out


# --- the server and its clients -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(policy: Path, args, new_tokens: int, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "decoding.serve", f"policy={policy}", "model_name=bench", f"port={port}",
           f"threads={args.threads}", f"device={args.device}", f"dtype={args.dtype}", f"max_batch_size={args.batch}",
           f"max_tokens={new_tokens}", "max_queue=1024",
           f"runs_dir={work / 'runs'}", f"db={work / 'users.sqlite'}", "request_timeout_s=600"]
    cmd += [f"batch_wait_ms={args.batch_wait_ms}"] if args.batch_wait_ms is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
        if time.monotonic() > end:
            raise RuntimeError("the server did not come up in 180 s")


def drive(url: str, requests: list[dict], clients: int) -> dict:
    """`clients` closed-loop clients, one thread and one keep-alive connection each (stdlib http.client: ~5x less
    CPU per request than an asyncio httpx client, which shares this machine's cores with the server), share the
    requests: client c sends requests c, c + clients, ... one after another."""
    host, port = url.removeprefix("http://").split(":")
    latencies, tokens, failures = [], [], []
    start = threading.Barrier(clients + 1)  # every client connected before the clock starts: they start together

    def client(mine: list[dict]) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.connect()
        start.wait()
        try:
            for body in mine:
                t0 = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", json.dumps({"model": "bench", **body}),
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                latencies.append(time.perf_counter() - t0)
                if r.status != 200:
                    failures.append(f"{r.status} {data[:300]!r}")
                    return
                tokens.append(json.loads(data)["usage"]["completion_tokens"])
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(requests[c::clients],)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return summary(sum(tokens), seconds, latencies)


def summary(tokens: int, seconds: float, latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "requests": len(latencies),
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * pick(0.99)}


def offline(policy: Path, requests: list[dict], new_tokens: int, args) -> dict:
    """The same prompts through `generate` directly, in batches of args.batch (no HTTP, no queue)."""
    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm, load_tokenizer, stop_ids
    from decoding.generate import encode_prompts, generate

    tok = load_tokenizer(policy)
    model = load_causal_lm(ModelConfig(name_or_path=str(policy), dtype=args.dtype, device=args.device), tok)
    eos = stop_ids(model, tok)  # the server's stop tokens
    ids, mask = encode_prompts(tok, [r["messages"] for r in requests[:args.batch]], model.device)
    generate(model, ids, mask, max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # warm
    tokens, latencies, t0 = 0, [], time.perf_counter()
    for s in range(0, len(requests), args.batch):
        chunk, b0 = requests[s:s + args.batch], time.perf_counter()
        ids, mask = encode_prompts(tok, [r["messages"] for r in chunk], model.device)
        new = generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        tokens += int(((new != tok.pad_token_id) & ~torch.isin(new, torch.tensor(eos, device=new.device))).sum())
        latencies += [time.perf_counter() - b0] * len(chunk)
    return summary(tokens, time.perf_counter() - t0, latencies)


def bench_model(name: str, args, work: Path) -> dict:
    from alignment.models import load_tokenizer

    n, new_tokens = args.requests or WORKLOAD[name][0], args.new_tokens or WORKLOAD[name][1]
    policy, source = policy_dir(name, work)
    requests = requests_for(load_tokenizer(policy), n, new_tokens, english=name == REAL)
    (work / f"server-{name}").mkdir(parents=True, exist_ok=True)
    first = offline(policy, requests, new_tokens, args)  # measured before and after the server, the best kept
    proc, url = start_server(policy, args, new_tokens, work / f"server-{name}")
    try:
        levels, runs = [1, *args.clients], {}
        for clients in levels:  # warm-up at each concurrency (untimed): first-call allocations, the batcher's demand
            drive(url, requests[:clients], clients)
        for r in range(args.rounds):  # rounds alternate the order of the modes, so that none always runs first
            for clients in (levels if r % 2 == 0 else levels[::-1]):
                runs.setdefault(clients, []).append(drive(url, requests, clients))
        modes = {"one_at_a_time" if c == 1 else f"clients_{c}": max(runs[c], key=lambda m: m["tokens_per_s"])
                 for c in levels}  # the best of each, as offline's
        engine = httpx.get(f"{url}/health", timeout=10).json()["engine"]
    finally:
        proc.terminate()
        proc.wait(30)
    modes["offline"] = max(first, offline(policy, requests, new_tokens, args), key=lambda m: m["tokens_per_s"])
    top = f"clients_{max(args.clients)}"
    ratios = {f"{top}_vs_one_at_a_time": modes[top]["tokens_per_s"] / modes["one_at_a_time"]["tokens_per_s"],
              f"{top}_vs_offline": modes[top]["tokens_per_s"] / modes["offline"]["tokens_per_s"]}
    return {"weights": source, "requests": n, "new_tokens": new_tokens, "modes": modes, "ratios": ratios,
            "engine": {k: engine[k] for k in ("batches", "rows", "max_batch_rows", "recent_batch_rows",
                                               "failed_batches")}}


def report(name: str, r: dict) -> None:
    print(f"\n{name} ({r['weights']})")
    print(f"  {'mode':<15} {'tokens/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'requests':>9}")
    for mode, m in r["modes"].items():
        print(f"  {mode:<15} {m['tokens_per_s']:>10.0f} {m['p50_ms']:>9.0f} {m['p99_ms']:>9.0f} {m['requests']:>9}")
    for k, v in r["ratios"].items():
        print(f"  {k}: {v:.2f}x")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=f"world,bench,{REAL}")
    parser.add_argument("--requests", type=int, help="requests per mode, a multiple of 32 (default per model)")
    parser.add_argument("--new-tokens", type=int, help="per request (default per model)")
    parser.add_argument("--clients", default="8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per mode; the fastest is kept")
    parser.add_argument("--batch", type=int, default=32, help="the server's max_batch_size and the offline batch")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="default: the server's (ServeConfig)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and offline alike")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="server and offline alike")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    figures = {"threads": args.threads, "device": args.device, "dtype": args.dtype, "batch": args.batch,
               "batch_wait_ms": args.batch_wait_ms}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for name in args.models.split(","):
            r = bench_model(name, args, Path(tmp))
            report(name, r)
            figures[name] = r
    if REAL in figures:
        figures["real_serve_32_vs_offline"] = figures[REAL]["ratios"].get("clients_32_vs_offline")
    figures["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print(f"\nload average {load_before[0]:.1f} -> {figures['load_average']['after'][0]:.1f} on {os.cpu_count()} "
          f"cores, {args.threads} torch thread(s)")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
