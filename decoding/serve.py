"""The decode API: personalized generation over HTTP, OpenAI-compatible, many users batched together.

    python -m decoding.serve config=serve.yaml                           # the cached world SFT policy, 127.0.0.1:8000
    PERSONA_API_KEY=... python -m decoding.serve config=serve.yaml guides_dir=runs/cache/guides-<hash>/run
    python -m decoding.serve policy=<hf model or dir> port=8080
    python -m decoding.serve config=real/serve.yaml     # SmolLM2-135M-Instruct: none, prompt, self-guided pad,
                                                        # zero-shot drift, no world artifact; serving in ~10 s

Routes (research/ecosystem.md §8.2):

    POST /v1/completions, /v1/chat/completions   OpenAI request and response shapes: model, prompt | messages,
                                                max_tokens, temperature, top_p, n, stop, seed, stream (server-sent
                                                events ending in `data: [DONE]`), stream_options, usage
    GET  /v1/models, /v1/models/{id}, /health   a model's `personalization`: methods served, Drift's attributes
    PUT | PATCH | GET | DELETE /v1/users/{id}   user profiles: persona text, attribute weights, or labelled pairs
                                                from which Drift weights are fitted (decoding/profiles.py, SQLite)

Personalization rides in an extension object, which the `openai` client sends through `extra_body`:

    client.chat.completions.create(model=..., messages=[...], extra_body={"personalization":
        {"method": "pad", "user_id": "u1", "strength": 1.0}})

(method none | prompt | pad | drift | genarm | args; decoding/personalization.py says what each reads). Responses
echo the resolved personalization beside `usage`. Without `guides_dir`, `pad_guide: base` serves self-guided PAD
and `drift_guide: base` with `drift_prompts` zero-shot Drift; a guide whose vocabulary is not the base's is
refused at start-up in one line. Replies stop at every stop id of the model (`alignment.models.stop_ids`).

No generation logic here: requests become rows that join and leave `decoding/scheduler.py`'s running batch at every
step (continuous batching, guides included). Here: limits, profiles, routes; the wire format (request bodies, error
objects, response bodies, stream chunks) is decoding/api.py. Every bad request is a 4xx with an OpenAI error object
{"error": {"message", "type", "param", "code"}}: 400 invalid fields or limits, 401 a missing or wrong API key, 404
an unknown model, user or route, 408 a request past `request_timeout_s` or one (head and body) slower than
`read_timeout_s`, 413 a body over `max_body_bytes`, 429 a full queue, 503 past `max_connections`; a 500 names an
error id whose details are in the server log only (the socket- and framing-level defences are
decoding/http_limits.py). A profile's pair fit runs in chunks between decode steps, within `max_fit_s`. Binds
127.0.0.1 unless `host` says otherwise; another host needs an API key, from $PERSONA_API_KEY or `api_key_file`
(never the command line, so it reaches no file of the run and no `ps`), or `allow_unauthenticated=true`. SIGTERM
drains in-flight requests (at most `request_timeout_s`), closes the run and exits 0. Profiles (users.sqlite) are
owner-only.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures (local names) at definition time.
import asyncio
import json
import logging
import math
import os
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from alignment.config import ConfigError
from alignment.policy import SFTConfig
from decoding.api import (
    UINT64_MAX,
    USER_ID,
    APIError,
    ChatRequest,
    CompletionRequest,
    ProfileBody,
    Reply,
    Sampling,
    choice,
    usage,
    validation_error,
)
from decoding.http_limits import Gate, guarded_h11

log = logging.getLogger(__name__)

API_KEY_ENV = "PERSONA_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

@dataclass
class Strengths:
    pad: float = 1.0  # PAD's w when a request sets no strength
    drift: float = 1.0  # Drift's 1 / beta
    genarm: float = 1.0  # GenARM's alpha
    args: float = 1.0  # ARGS's w


@dataclass
class ServeConfig:
    name: str | None = None  # run name (config and meta under runs_dir); default serve-<timestamp>
    runs_dir: str = "runs"
    host: str = "127.0.0.1"  # bind address; another than loopback needs a key (or allow_unauthenticated)
    port: int = 8000
    api_key_file: str | None = None  # a file holding the API key (else $PERSONA_API_KEY); every route then needs it
    allow_unauthenticated: bool = False  # serve a non-loopback host without a key (refused otherwise)
    policy: str | None = None  # HF directory or hub id of the served model; default: the cached world SFT policy
    sft: SFTConfig = field(default_factory=SFTConfig)  # the default policy, built once and cached when missing
    model_name: str | None = None  # the id clients send as `model`; default: persona-world-sft or policy's name
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto: cuda if available, else cpu
    threads: int = 0  # torch intra-op threads (0: torch's default)
    guides_dir: str | None = None  # a `rewards.train kind=guides` run (pad/ arm/ rm/ drift.json); unset: none/prompt
    drift_guide: Literal["pad", "base"] = "pad"  # the small LM under Drift's attribute prompts (base: zero-shot)
    drift_prompts: str | None = None  # Drift's prompts JSON (e.g. real/drift_attributes.json); default guides_dir's
    pad_guide: Literal["pad", "base"] = "pad"  # PAD's personalized model; base: self-guided (base reads no persona)
    drift_fit: Literal["closed_form", "sparse"] = "closed_form"  # how profile pairs become Drift weights
    drift_sparsity: float = 0.25  # sparse fit: soft threshold as a share of the largest |mean Delta|
    strength: Strengths = field(default_factory=Strengths)
    pad_top_k: int = 10  # PAD's support: the base's top-k tokens
    args_top_k: int = 10  # ARGS's candidates: the base's top-k tokens
    db: str = "runs/serve/users.sqlite"  # user profiles (SQLite, WAL); kept across restarts
    max_batch_size: int = 32  # rows (choices) decoding together at most; a request's prompts x n must fit
    max_batch_tokens: int = 65536  # rows x (longest prompt + max_tokens) the running batch may hold
    prefill_chunk_tokens: int = 512  # rows x tokens of a joining prompt prefilled between two decode steps
    max_queue: int = 256  # requests waiting to join the batch; one more gets 429
    request_timeout_s: float = 120.0  # from arrival to last token; past it: 408 (a stream ends with an error event)
    max_prompt_tokens: int = 1024  # per prompt, as the base or a guide reads it
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64  # when a request gives none
    max_pairs: int = 500  # labelled pairs per profile
    max_body_bytes: int = 2_000_000
    read_timeout_s: float = 10.0  # a request, head and body, must arrive within this of its first byte; else 408
    write_timeout_s: float = 30.0  # a client that reads none of its response for this long is disconnected
    max_connections: int = 512  # open sockets; one beyond them gets 503 and is closed
    max_fit_s: float = 60.0  # model time a profile's pair fit may take; a longer one is refused (400)

    REMOVED: ClassVar[dict[str, str]] = {
        "api_key": f"a key given on the command line shows in ps and in the run's files: set the {API_KEY_ENV} "
                   "environment variable, or api_key_file=<a file holding the key>",
        "batch_wait_ms": "requests join the running batch at every step (continuous batching): there is no batch "
                         "to wait for; max_batch_size and max_batch_tokens bound the batch"}


# --- the server's state -------------------------------------------------------------------------------------------
@dataclass
class Server:
    """What the routes read: the config, models and rules (guidance), the batcher, the profile store."""

    cfg: ServeConfig
    guidance: Any  # decoding.personalization.Guidance
    engine: Any  # decoding.scheduler.Engine
    profiles: Any  # decoding.profiles.Profiles
    model_name: str
    context: int | None  # the base model's longest sequence (prompt + max_tokens), when its config says
    created: int = field(default_factory=lambda: int(time.time()))
    api_key: str | None = field(default=None, repr=False)  # never in a config, a file of the run, or argv


def load_server(cfg: ServeConfig) -> Server:
    """Tokenizer, base model and whichever guides `guides_dir` holds; the batcher; the profile store."""

    import torch

    from alignment.config import ModelConfig
    from alignment.model_sources import is_source
    from alignment.models import load_causal_lm, load_tokenizer, stop_ids
    from alignment.policy import starting_policy
    from decoding.drift import load_attribute_prompts
    from decoding.personalization import Guidance
    from decoding.profiles import Profiles
    from decoding.scheduler import Engine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy = str(starting_policy(cfg.policy, cfg.sft, cfg.sft.world, cfg.runs_dir))
    tokenizer = load_tokenizer(policy)
    base = load_causal_lm(ModelConfig(name_or_path=policy, dtype=cfg.dtype, device=cfg.device), tokenizer)
    guides, drift = load_guides_dir(cfg, tokenizer) if cfg.guides_dir else ({}, None)
    if cfg.drift_prompts:
        drift = load_attribute_prompts(cfg.drift_prompts)
    s = cfg.strength
    guidance = Guidance(tokenizer, base, guides, drift, cfg.drift_guide,
                        {"pad": s.pad, "drift": s.drift, "genarm": s.genarm, "args": s.args},
                        cfg.pad_top_k, cfg.args_top_k, cfg.guides_dir, pad_guide=cfg.pad_guide)
    engine = Engine(guidance, max_batch_size=cfg.max_batch_size, max_batch_tokens=cfg.max_batch_tokens,
                    max_queue=cfg.max_queue, prefill_chunk=cfg.prefill_chunk_tokens, eos_ids=stop_ids(base, tokenizer))
    name = cfg.model_name or ("persona-world-sft" if cfg.policy is None
                              else cfg.policy if is_source(cfg.policy) else Path(policy.rstrip("/")).name)
    log.info("methods served: %s", ", ".join(guidance.served()))
    return Server(cfg, guidance, engine, Profiles(cfg.db), name, getattr(base.config, "max_position_embeddings", None))


def load_guides_dir(cfg: ServeConfig, tokenizer) -> tuple[dict, dict | None]:
    """The pad / arm / rm guides and drift.json that `guides_dir` holds; a guide whose vocabulary is not the base's
    is refused in one line (decoding.guides.load_guide)."""
    from decoding.guides import load_guide

    root = Path(cfg.guides_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"guides_dir: {root} is not a directory")
    guides, drift = {}, None
    for name in ("pad", "arm", "rm"):
        if (root / name / "config.json").is_file():
            guides[name] = load_guide(root / name, tokenizer, reward=name == "rm", dtype=cfg.dtype, device=cfg.device)
    if (root / "drift.json").is_file():
        drift = json.loads((root / "drift.json").read_text())
    log.info("guides from %s: %s%s", root, ", ".join(guides) or "none", " + drift.json" if drift else "")
    return guides, drift


# --- requests -> rows -----------------------------------------------------------------------------------------------
def check_text(value: Any, param: str) -> None:
    """Strings that are not encodable (lone surrogates from JSON escapes) are a 400, not a tokenizer crash."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{param}: not valid Unicode text (lone surrogate)", param) from None
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_text(v, f"{param}.{i}")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, param)
            check_text(v, f"{param}.{k}")


def personalization_of(server: Server, body: Sampling):
    from decoding.personalization import PersonalizationError, resolve

    p = body.personalization.model_dump() if body.personalization else None
    profile = None
    if p and p.get("user_id"):
        profile = server.profiles.get(p["user_id"])
        if profile is None:
            raise APIError(404, f"no user profile {p['user_id']!r}; create it with PUT /v1/users/{p['user_id']}",
                           "personalization.user_id", "user_not_found")
    try:
        return resolve(p, profile, server.guidance)
    except PersonalizationError as exc:
        raise APIError(exc.status, exc.message, exc.param, exc.code) from None


def make_rows(server: Server, body: Sampling, prompts: list, max_tokens: int) -> list:
    """One scheduler Row per (prompt, choice), prompt-major like OpenAI's choice indices, with limits checked."""
    from decoding.personalization import encode_rows
    from decoding.scheduler import Row

    cfg, n = server.cfg, body.n or 1
    if len(prompts) * n > cfg.max_batch_size:
        raise APIError(400, f"{len(prompts)} prompts x n={n} = {len(prompts) * n} choices exceed the server's "
                       f"max_batch_size {cfg.max_batch_size}", "n")
    if max_tokens > cfg.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} exceeds the server's limit {cfg.max_tokens}", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "stop")
    resolved = personalization_of(server, body)
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    rows = []
    for prompt in prompts:
        tokens = encode_rows(server.guidance, prompt, resolved)
        longest = max(len(t) for t in [tokens.base, *tokens.contexts])
        if longest > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt is {longest} tokens (with the personalization's context); the limit is "
                           f"{cfg.max_prompt_tokens}", "messages" if isinstance(prompt, list) else "prompt",
                           "context_length_exceeded")
        if server.context is not None and longest + max_tokens > server.context:
            raise APIError(400, f"{longest} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
                           f"{server.context} tokens", "max_tokens", "context_length_exceeded")
        if len(prompts) * n * (longest + max_tokens) > cfg.max_batch_tokens:
            raise APIError(400, f"{len(prompts) * n} choices x ({longest} prompt tokens + max_tokens {max_tokens}) "
                           f"exceed the server's max_batch_tokens {cfg.max_batch_tokens}", "max_tokens",
                           "context_length_exceeded")
        for _ in range(n):
            rows.append(Row(resolved, tokens, max_tokens, 1.0 if body.temperature is None else body.temperature,
                            1.0 if body.top_p is None else body.top_p, (seed + len(rows)) % (UINT64_MAX + 1), stop))
    return rows


def chat_prompt(server: Server, body: ChatRequest) -> list[dict]:
    if server.guidance.tokenizer.chat_template is None:
        raise APIError(400, f"model {server.model_name!r} has no chat template; use /v1/completions", "messages")
    out = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


# --- waiting for a job ---------------------------------------------------------------------------------------------
async def wait_disconnect(request) -> None:
    """Returns when the client has gone (ASGI http.disconnect); the request body has been read already."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(server: Server, job, request) -> None:
    """Wait for a submitted non-streaming job to end; cancels it when the client leaves or time runs out."""
    deadline = time.monotonic() + server.cfg.request_timeout_s
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({event, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if event not in done:
                event.cancel()
                job.cancel("disconnected" if gone in done else "timeout")
                if gone in done:
                    return
                raise APIError(408, f"the request took longer than {server.cfg.request_timeout_s} s", None, "timeout")
            kind, _, detail = event.result()
            if kind == "end":
                return
            if kind == "error":
                raise APIError(500, f"generation failed: {detail}", None, "generation_failed")
    finally:
        gone.cancel()


async def stream_events(server: Server, job, reply: Reply, n_rows: int, n: int, include_usage: bool):
    """Server-sent events: one chunk per text delta and per finished choice, usage when asked, then [DONE]."""
    deadline, ended = time.monotonic() + server.cfg.request_timeout_s, False
    try:
        if reply.chat:
            yield reply.chunk([choice(True, i, "", None, stream=True, first=True) for i in range(n_rows)])
        while True:
            try:
                kind, index, detail = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                job.cancel("timeout")
                err = APIError(408, f"the request took longer than {server.cfg.request_timeout_s} s", None, "timeout")
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            if kind == "delta":
                yield reply.chunk([choice(reply.chat, index, detail, None, stream=True)])
            elif kind == "finish":
                yield reply.chunk([choice(reply.chat, index, "", detail, stream=True)])
            elif kind == "error":
                yield f"data: {json.dumps(APIError(500, f'generation failed: {detail}').body())}\n\n"
                break
            else:
                if include_usage:
                    yield reply.chunk([], usage=usage(job.rows, n), personalization=reply.personalization)
                break
        ended = True
        yield "data: [DONE]\n\n"
    finally:
        if not ended:  # the client went away mid-stream: its rows stop at the next step
            job.cancel("disconnected")


async def generate_response(server: Server, request, body: Sampling, prompts: list, chat: bool):
    from fastapi.responses import JSONResponse, StreamingResponse

    from decoding.scheduler import Job, QueueFull

    if body.model != server.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {server.model_name!r}",
                       "model", "model_not_found")
    check_text(prompts, "messages" if chat else "prompt")
    check_text(body.stop, "stop")
    if body.personalization:
        check_text(body.personalization.model_dump(), "personalization")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or server.cfg.default_max_tokens
    rows = make_rows(server, body, prompts, max_tokens)
    reply = Reply(server.model_name, chat, rows[0].personalization.echo(server.guidance.attributes))
    job = Job(rows, stream=bool(body.stream))
    try:
        server.engine.submit(job)
    except QueueFull as exc:
        raise APIError(429, str(exc), None, "queue_full") from None
    n = body.n or 1
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(server, job, reply, len(rows), n, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await collect(server, job, request)
    return JSONResponse(reply.body(rows, n))


# --- profiles -------------------------------------------------------------------------------------------------------
def profile_out(p: dict) -> dict:
    return {"id": p["user_id"], "object": "user", "persona": p.get("persona"),
            "attribute_weights": p.get("attribute_weights"), "pairs": len(p.get("pairs") or []),
            "fit": p.get("fit"), "created": p["created"], "updated": p["updated"]}


def profile_change(server: Server, body: ProfileBody) -> dict:
    """The fields a PUT or PATCH sets, checked (attribute weights: known names, bounded values; pairs: refit into
    Drift weights), before any profile is read, so the store's transaction holds no model work."""
    from decoding.personalization import PersonalizationError, weight_vector

    given = body.model_dump(exclude_unset=True)
    check_text(given, "body")
    if given.get("pairs") is not None and given.get("attribute_weights") is not None:
        raise APIError(400, "give attribute_weights or pairs (to fit them from), not both", "pairs")
    try:
        if given.get("attribute_weights") is not None:
            weight_vector(given["attribute_weights"], server.guidance.attributes, "attribute_weights")
            given["fit"] = None
        if given.get("pairs") is not None:
            if len(given["pairs"]) > server.cfg.max_pairs:
                raise APIError(400, f"{len(given['pairs'])} pairs exceed the limit {server.cfg.max_pairs}", "pairs")
            given["attribute_weights"] = fit_pairs(server, given["pairs"])
            given["fit"] = {"method": server.cfg.drift_fit, "pairs": len(given["pairs"]),
                            "guide": server.cfg.drift_guide}
    except PersonalizationError as exc:
        raise APIError(exc.status, exc.message, exc.param, exc.code) from None
    return given


FIT_CHUNK_PAIRS = 8  # pairs scored per turn on the worker: 2 (1 + m) 8 sequences, so a decode step waits for so few


def fit_pairs(server: Server, pairs: list[dict]) -> dict[str, float]:
    """Drift weights from labelled pairs, as decoding.personalization.fit_profile_weights, but scored in chunks on
    the batcher's worker between its steps (decoding waits for one chunk at most, not the whole fit), and
    refused (400 fit_too_long) as soon as the chunks' model time projects past `max_fit_s`."""
    import numpy as np

    from decoding.drift import attribute_rewards, fit_weights
    from decoding.personalization import drift_pair_rows

    g, cfg = server.guidance, server.cfg
    rows, texts = drift_pair_rows(g, pairs)  # a server that cannot fit is refused here, in one line

    def score(chunk: list[dict]) -> tuple[float, np.ndarray]:
        start = time.monotonic()
        first, second = attribute_rewards(g.drift_model(), g.tokenizer, chunk, texts)
        return time.monotonic() - start, first - second

    spent, deltas = 0.0, []
    for s in range(0, len(rows), FIT_CHUNK_PAIRS):
        seconds, delta = server.engine.between_steps(lambda s=s: score(rows[s:s + FIT_CHUNK_PAIRS]))
        spent += seconds
        deltas.append(delta)
        done = s + len(delta)
        if spent * len(rows) / done > cfg.max_fit_s:
            raise APIError(400, f"fitting {len(rows)} pairs would take ~{spent * len(rows) / done:.1f} s of model "
                           f"time, over the server's max_fit_s {cfg.max_fit_s}; send fewer pairs", "pairs",
                           "fit_too_long")
    p = fit_weights(np.concatenate(deltas), cfg.drift_fit, cfg.drift_sparsity)
    return dict(zip(g.attributes, (float(x) for x in p), strict=True))


def merged(old: dict | None, change: dict) -> dict:
    """The stored document: the old one's fields overridden by the change's."""
    return {**{k: v for k, v in (old or {}).items() if k not in ("user_id", "created", "updated")}, **change}


# --- the app --------------------------------------------------------------------------------------------------------
def build_app(server: Server):
    """The FastAPI app over a loaded `Server`; its lifespan starts and stops the batcher's worker."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="persona-alignment decode API", lifespan=lifespan)
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, lambda request, exc: validation_error(exc).response())
    app.add_exception_handler(
        HTTPException, lambda request, exc: APIError(exc.status_code if exc.status_code < 500 else 500,
                                                     str(exc.detail), None, None).response())

    def unexpected(request, exc):  # a bug: a logged 500 with an OpenAI body, and the server keeps serving
        error_id = uuid.uuid4().hex[:12]  # the details stay in the log, under this id
        log.exception("unhandled error on %s %s (error id %s)", request.method, request.url.path, error_id,
                      exc_info=exc)
        return APIError(500, f"internal error (error id {error_id}; the details are in the server log)", None,
                        "internal_error").response()

    app.add_exception_handler(Exception, unexpected)
    uid = Annotated[str, PathParam(pattern=USER_ID)]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": server.model_name, "engine": server.engine.health(),
                "users": server.profiles.count(), "guides": sorted(server.guidance.guides),
                "drift": server.guidance.drift_prompts is not None}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    def model(model_id: Annotated[str, PathParam(max_length=256)]) -> dict:
        if model_id != server.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return model_card()

    def model_card() -> dict:
        g = server.guidance
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "persona-alignment",
                "max_model_len": server.context,
                "personalization": {"methods": g.served(), "drift_attributes": g.attributes if "drift" in g.served()
                                    else [], "pad_guide": g.pad_guide if "pad" in g.served() else None,
                                    "drift_guide": g.drift_guide if "drift" in g.served() else None,
                                    "strength": {m: v for m, v in g.strengths.items() if m in g.served()}}}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        return await generate_response(server, request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await generate_response(server, request, body, [chat_prompt(server, body)], chat=True)

    @app.get("/v1/users/{user_id}")
    def get_user(user_id: uid) -> dict:
        p = server.profiles.get(user_id)
        if p is None:
            raise APIError(404, f"no user profile {user_id!r}", "user_id", "user_not_found")
        return profile_out(p)

    @app.put("/v1/users/{user_id}")
    def put_user(user_id: uid, body: ProfileBody):
        from fastapi.responses import JSONResponse

        stored, created = server.profiles.put(user_id, merged(None, profile_change(server, body)))
        return JSONResponse(profile_out(stored), status_code=201 if created else 200)

    @app.patch("/v1/users/{user_id}")
    def patch_user(user_id: uid, body: ProfileBody) -> dict:
        change = profile_change(server, body)

        def apply(old: dict | None) -> dict:
            if old is None:
                raise APIError(404, f"no user profile {user_id!r}; create it with PUT", "user_id", "user_not_found")
            return merged(old, change)

        return profile_out(server.profiles.update(user_id, apply)[0])  # read and write in one transaction

    @app.delete("/v1/users/{user_id}")
    def delete_user(user_id: uid) -> dict:
        if not server.profiles.delete(user_id):
            raise APIError(404, f"no user profile {user_id!r}", "user_id", "user_not_found")
        return {"id": user_id, "object": "user", "deleted": True}

    return Gate(app, server.api_key, server.cfg.max_body_bytes, server.cfg.read_timeout_s)


# --- main -----------------------------------------------------------------------------------------------------------
def main(cfg: ServeConfig) -> Path:
    import uvicorn

    from alignment.runs import Run

    for key in ("request_timeout_s", "read_timeout_s", "write_timeout_s", "max_fit_s", "max_connections"):
        if not math.isfinite(getattr(cfg, key)) or getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {getattr(cfg, key)}")
    api_key = read_api_key(cfg)
    if cfg.host not in LOOPBACK and api_key is None and not cfg.allow_unauthenticated:
        raise ConfigError(f"host={cfg.host} serves beyond this machine: set {API_KEY_ENV} or api_key_file=<file>, "
                          "or allow_unauthenticated=true to serve it without a key")
    run = Run.start(cfg, "serve", runs_dir=cfg.runs_dir, name=cfg.name)
    server = load_server(cfg)
    server.api_key = api_key
    run.add_meta("inputs", {"model": server.model_name, "guides": cfg.guides_dir, "db": str(Path(cfg.db).absolute()),
                            "pid": os.getpid()})
    log.info("serving %r on http://%s:%d (guides: %s)", server.model_name, cfg.host, cfg.port,
             ", ".join(server.guidance.guides) or "none")
    # uvicorn drains on SIGTERM / SIGINT (in-flight requests finish, for at most request_timeout_s), then re-raises
    # the signal to the handler it found: a handler that only logs lets this function close the run and exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("%s: the server drained; closing the run",
                                                          signal.Signals(signum).name))
    uvicorn.run(build_app(server), host=cfg.host, port=cfg.port, log_level="warning",
                timeout_graceful_shutdown=math.ceil(cfg.request_timeout_s),
                http=guarded_h11(cfg.read_timeout_s, cfg.write_timeout_s), limit_concurrency=cfg.max_connections)
    run.finish({"engine": server.engine.health()})
    server.profiles.close()
    return run.dir


def read_api_key(cfg: ServeConfig) -> str | None:
    """The API key from $PERSONA_API_KEY or from the file `api_key_file` (one of the two), None when neither."""
    from_env = os.environ.get(API_KEY_ENV) or None
    if cfg.api_key_file is None:
        return from_env
    if from_env is not None:
        raise ConfigError(f"api_key_file: {API_KEY_ENV} is set too; give the key one way")
    try:
        key = Path(cfg.api_key_file).expanduser().read_text().strip()
    except OSError as exc:
        raise ConfigError(f"api_key_file: cannot read {cfg.api_key_file}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"api_key_file: {cfg.api_key_file} is empty")
    return key


if __name__ == "__main__":
    from alignment.config import run_cli

    run_cli(ServeConfig, main)
