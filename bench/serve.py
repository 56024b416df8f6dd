"""Benchmark: the decode API (decoding/serve.py, continuous batching) under 1, 8 and 32 concurrent clients, at
temperature 0 and 1, on requests of mixed lengths, against serving them one at a time and against offline batched
generation of the same requests; and a 2-token request's latency beside 31 running ones against alone.

For each model, one real `python -m decoding.serve` process on a free loopback port, driven by HTTP clients
(threads; each sends its share of the requests one after another, a closed loop). Every mode serves the SAME
requests (chat prompts; max_tokens cycling through 8, 16, 32, 64; seed i for request i), after an untimed warm-up
at its own concurrency, timed `rounds` times in alternating order with the fastest kept:

    serial        1 client: every request decoded alone (the baseline of `*_vs_serial`)
    clients_8/32  8 / 32 clients at once: their rows join and leave the server's running batch at every step
    offline       `decoding.loop.decode_steps` in this process on the same requests, sorted by max_tokens into
                  batches of max_batch_size, each row stopped at its own max_tokens, same seeds and thread count:
                  no HTTP, no queue (run before and after the server; the faster kept); latency = from the start
                  until its batch ends (all requests there at once)
    short_beside_long   median latency of 20 sequential 2-token greedy requests beside 31 closed-loop clients
                  sending 64-token greedy requests, over the median of 20 alone on the idle server

Models: `world` (the trained world SFT policy when one is cached under runs/cache, else random weights of its
shape), `bench` (a ~25M-parameter Llama, random weights) and `smollm2-135m-instruct` (the real model, English
questions with its chat template). Random-weight models get a word-level tokenizer with a chat template and a
zeroed EOS row of lm_head, so no row stops before its max_tokens. Throughput is generated tokens
(`usage.completion_tokens`) per wall-clock second; p50 / p99 over the requests of a mode.

    OMP_NUM_THREADS=1 python bench/serve.py                 # all three models, ~10 min on the 2-core CPU
    python bench/serve.py --models world --rounds 1
    python bench/serve.py --models smollm2-135m-instruct --device cuda --dtype bfloat16 --threads 4

The last line is one JSON object: per model its modes, ratios and engine counters, the load average before and
after, and at the top level the world model's checked figures `sampled_32_vs_offline`, `sampled_32_vs_serial` and
`short_beside_long_vs_alone`. Measurements: docs/experiments/serving.md.
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
LENGTHS = [8, 16, 32, 64]  # max_tokens of request i: LENGTHS[i % 4]
# (requests per mode, timed rounds): the world model as the 32 clients x 5 requests; the 25M model is
# compute-bound on a CPU (~13 ms a step alone) and the real one (134.5M) decodes ~20 tokens/s alone on one thread,
# so fewer requests keep their serial modes near a minute.
WORKLOAD = {"world": (160, 2), "bench": (64, 1), REAL: (32, 1)}
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


def cached_world_policy() -> Path | None:
    """The default world SFT policy when cached (never trained here), else the newest complete cached one."""
    from alignment.cache import is_complete
    from alignment.policy import cached_policy
    from alignment.training import final_model

    if (exact := cached_policy(ROOT / "runs")) is not None:
        return exact
    cached = sorted((p for p in (ROOT / "runs" / "cache").glob("sft-v*") if p.is_dir() and is_complete(p)),
                    key=lambda p: p.stat().st_mtime)
    return final_model(cached[-1] / "run") if cached else None


def policy_dir(name: str, out: Path) -> tuple[Path, str]:
    """An HF directory the server can load: the real model, a cached world policy, or random weights."""
    from alignment.models import save_model

    if name == REAL:
        from alignment.model_sources import model_path

        return Path(model_path(REAL)), "SmolLM2-135M-Instruct, Q4_1-dequantized"
    if name == "world" and (cached := cached_world_policy()) is not None:
        return cached, f"trained world SFT policy ({cached.parents[3].name})"
    model = build(SHAPES[name]["base"], 0)
    with torch.no_grad():
        model.lm_head.weight[2] = 0.0  # EOS logit 0 against ~V signed logits: never the argmax
    save_model(model, word_tokenizer(model.config.vocab_size), out / name)
    return out / name, f"random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"


def requests_for(tokenizer, n: int, english: bool = False) -> list[dict]:
    """n chat requests: ~40 words of the tokenizer's vocabulary (ids >= 8: no specials), or `english`: the
    everyday questions of bench/decode.py; max_tokens LENGTHS[i % 4], seed i (temperature set per mode)."""
    if english:
        return [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                 "max_tokens": LENGTHS[i % 4], "seed": i} for i in range(n)]
    g = torch.Generator().manual_seed(0)
    vocab = [w for w, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if i >= 8 and w.isalnum()]
    out = []
    for i in range(n):
        words = [vocab[j] for j in torch.randint(len(vocab), (int(torch.randint(30, 50, (1,), generator=g)),),
                                                 generator=g).tolist()]
        out.append({"messages": [{"role": "system", "content": " ".join(words[:10])},
                                 {"role": "user", "content": " ".join(words[10:])}],
                    "max_tokens": LENGTHS[i % 4], "seed": i})
    return out


# --- the server and its clients -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(policy: Path, args, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "decoding.serve", f"policy={policy}", "model_name=bench", f"port={port}",
           f"threads={args.threads}", f"device={args.device}", f"dtype={args.dtype}", f"max_batch_size={args.batch}",
           f"max_tokens={max(LENGTHS)}", "max_queue=1024", f"runs_dir={work / 'runs'}", f"db={work / 'users.sqlite'}",
           "request_timeout_s=600"]
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


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[float, int]:
    """One chat request on a kept-alive connection: (seconds from send to last byte, completion tokens)."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "bench", **body}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{r.status} {data[:300]!r}")
    return time.perf_counter() - t0, json.loads(data)["usage"]["completion_tokens"]


def connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.connect()
    return conn


def drive(url: str, requests: list[dict], clients: int) -> dict:
    """`clients` closed-loop clients, one thread and one keep-alive connection each (stdlib http.client: ~5x less
    CPU per request than an asyncio httpx client, which shares this machine's cores with the server), share the
    requests: client c sends requests c, c + clients, ... one after another."""
    latencies, tokens, failures = [], [], []
    start = threading.Barrier(clients + 1)  # every client connected before the clock starts: they start together

    def client(mine: list[dict]) -> None:
        conn = connect(url)
        start.wait()
        try:
            for body in mine:
                seconds, n = post(conn, body)
                latencies.append(seconds)
                tokens.append(n)
        except RuntimeError as exc:
            failures.append(str(exc))
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
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "requests": len(latencies),
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * pick(0.99)}


def short_beside_long(url: str, short: dict, long: dict, reps: int = 20, background: int = 31) -> dict:
    """Median latency of `reps` sequential `short` requests alone, then beside `background` closed-loop clients
    sending `long` requests; the engine's mean rows per step while the short ones ran beside them."""
    conn = connect(url)
    alone = [post(conn, short)[0] for _ in range(reps)]
    stop, failures = threading.Event(), []

    def loop() -> None:
        c = connect(url)
        try:
            while not stop.is_set():
                post(c, long)
        except RuntimeError as exc:
            failures.append(str(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=loop) for _ in range(background)]
    for t in threads:
        t.start()
    end = time.monotonic() + 60
    while httpx.get(f"{url}/health", timeout=10).json()["engine"]["running_rows"] < 0.75 * background:
        assert time.monotonic() < end, "the background requests never all ran"
        time.sleep(0.01)
    before = httpx.get(f"{url}/health", timeout=10).json()["engine"]
    beside = [post(conn, short)[0] for _ in range(reps)]
    after = httpx.get(f"{url}/health", timeout=10).json()["engine"]
    stop.set()
    for t in threads:
        t.join()
    conn.close()
    if failures:
        raise RuntimeError(f"background requests failed, e.g. {failures[0]}")
    rows = (after["row_steps"] - before["row_steps"]) / max(1, after["steps"] - before["steps"])
    return {"alone_ms": 1000 * statistics.median(alone), "beside_ms": 1000 * statistics.median(beside),
            "ratio": statistics.median(beside) / statistics.median(alone), "mean_batch_rows_beside": rows}


@torch.inference_mode()
def offline(policy: Path, requests: list[dict], temperature: float, args) -> dict:
    """The same requests through `decode_steps` in this process: sorted by max_tokens into batches of args.batch,
    each row stopped at its own max_tokens (no HTTP, no queue)."""
    from alignment.config import ModelConfig
    from alignment.models import load_causal_lm, load_tokenizer, stop_ids
    from decoding.loop import decode_steps, encode_prompts

    tok = load_tokenizer(policy)
    model = load_causal_lm(ModelConfig(name_or_path=str(policy), dtype=args.dtype, device=args.device), tok)
    eos = stop_ids(model, tok)  # the server's stop tokens
    order = sorted(requests, key=lambda r: r["max_tokens"])
    tokens, latencies, t0 = 0, [], time.perf_counter()
    for s in range(-args.batch, len(order), args.batch):  # s < 0: an untimed warm-up batch
        chunk = order[max(s, 0):max(s, 0) + args.batch]
        ids, mask = encode_prompts(tok, [r["messages"] for r in chunk], model.device)
        limit = torch.tensor([r["max_tokens"] for r in chunk], device=model.device)
        steps = decode_steps(model, ids, mask, max_new_tokens=int(limit.max()), eos_token_id=eos,
                             pad_token_id=tok.pad_token_id, temperature=temperature, seeds=[r["seed"] for r in chunk])
        done, n, step = torch.zeros(len(chunk), dtype=torch.bool, device=model.device), 0, next(steps)
        for t in range(int(limit.max())):
            live = ~done & ~torch.isin(step, torch.tensor(eos, device=model.device))
            n += int(live.sum())
            done |= ~live | (limit <= t + 1)
            try:
                step = steps.send(done)
            except StopIteration:
                break
        if s < 0:
            t0 = time.perf_counter()
            continue
        tokens += n
        latencies += [time.perf_counter() - t0] * len(chunk)
    return summary(tokens, time.perf_counter() - t0, latencies)


def bench_model(name: str, args, work: Path) -> dict:
    from alignment.models import load_tokenizer

    n, rounds = args.requests or WORKLOAD[name][0], args.rounds or WORKLOAD[name][1]
    policy, source = policy_dir(name, work)
    base = requests_for(load_tokenizer(policy), n, english=name == REAL)
    temps = {"greedy": 0.0, "sampled": 1.0}
    workloads = {k: [{**r, "temperature": t} for r in base] for k, t in temps.items()}
    first = {k: offline(policy, workloads[k], temps[k], args) for k in temps}  # before and after the server
    (work / f"server-{name}").mkdir(parents=True, exist_ok=True)
    proc, url = start_server(policy, args, work / f"server-{name}")
    modes = {}
    try:
        levels = [1, *args.clients]
        for k in temps:
            for clients in levels:  # warm-up at each concurrency (untimed): first-call allocations
                drive(url, workloads[k][:clients], clients)
        runs = {}
        for r in range(rounds):  # rounds alternate the order of the modes, so that none always runs first
            for k in temps:
                for clients in (levels if r % 2 == 0 else levels[::-1]):
                    runs.setdefault((k, clients), []).append(drive(url, workloads[k], clients))
        for (k, clients), got in runs.items():
            modes[f"{k}_serial" if clients == 1 else f"{k}_{clients}"] = max(got, key=lambda m: m["tokens_per_s"])
        short = {**base[0], "max_tokens": 2, "temperature": 0.0}
        latency = short_beside_long(url, short, {**base[1], "max_tokens": 64, "temperature": 0.0},
                                    background=args.batch - 1)
        engine = httpx.get(f"{url}/health", timeout=10).json()["engine"]
    finally:
        proc.terminate()
        proc.wait(30)
    for k in temps:
        again = offline(policy, workloads[k], temps[k], args)
        modes[f"{k}_offline"] = max(first[k], again, key=lambda m: m["tokens_per_s"])
    top = max(args.clients)
    ratios = {f"{k}_{top}_vs_{base_mode}": modes[f"{k}_{top}"]["tokens_per_s"] / modes[f"{k}_{base_mode}"]
              ["tokens_per_s"] for k in temps for base_mode in ("offline", "serial")}
    ratios["short_beside_long_vs_alone"] = latency["ratio"]
    return {"weights": source, "requests": n, "rounds": rounds, "modes": modes, "ratios": ratios,
            "short_beside_long": latency,
            "engine": {k: engine[k] for k in ("admissions", "steps", "rows", "max_batch_rows", "mean_batch_rows",
                                               "prefill_s", "step_s", "failures")}}


def report(name: str, r: dict) -> None:
    print(f"\n{name} ({r['weights']}; {r['requests']} requests of max_tokens {LENGTHS} per mode)")
    print(f"  {'mode':<16} {'tokens/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'requests':>9}")
    for mode, m in r["modes"].items():
        print(f"  {mode:<16} {m['tokens_per_s']:>10.0f} {m['p50_ms']:>9.0f} {m['p99_ms']:>9.0f} {m['requests']:>9}")
    s = r["short_beside_long"]
    print(f"  2-token request: {s['alone_ms']:.0f} ms alone, {s['beside_ms']:.0f} ms beside 31 x 64-token requests "
          f"({s['mean_batch_rows_beside']:.1f} rows per step meanwhile)")
    for k, v in r["ratios"].items():
        print(f"  {k}: {v:.2f}x")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=f"world,bench,{REAL}")
    parser.add_argument("--requests", type=int, help="requests per mode (default per model)")
    parser.add_argument("--clients", default="8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--rounds", type=int, help="timed runs per mode, the fastest kept (default per model)")
    parser.add_argument("--batch", type=int, default=32, help="the server's max_batch_size and the offline batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and offline alike")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="server and offline alike")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    figures = {"threads": args.threads, "device": args.device, "dtype": args.dtype, "batch": args.batch,
               "lengths": LENGTHS}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for name in args.models.split(","):
            r = bench_model(name, args, Path(tmp))
            report(name, r)
            figures[name] = r
    checked = figures.get("world", figures[args.models.split(",")[0]])["ratios"]
    top = max(args.clients)
    figures.update(sampled_32_vs_offline=checked[f"sampled_{top}_vs_offline"],
                   sampled_32_vs_serial=checked[f"sampled_{top}_vs_serial"],
                   short_beside_long_vs_alone=checked["short_beside_long_vs_alone"])
    figures["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print(f"\nload average {load_before[0]:.1f} -> {figures['load_average']['after'][0]:.1f} on {os.cpu_count()} "
          f"cores, {args.threads} torch thread(s)")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
