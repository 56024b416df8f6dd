"""The decode API (decoding/serve.py): every route and error in-process, a real uvicorn process on loopback driven by
the official `openai` client, fuzzed request bodies, a 32-client load, and a profile that survives SIGKILL.

Models are tiny random Llamas on the 47-token test vocabulary (tests/conftest.py), saved as HF directories the
server loads like any checkpoint: a policy and the three guides (pad, arm, rm) plus a drift.json. The policy's
EOS row of lm_head is zero, so greedy decoding (whose other logits are random with both signs) practically never
stops early and token counts are exact. Behaviour, not quality: random guides still change the argmax.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignment.models import save_model
from decoding.serve import ServeConfig, build_app, load_server
from tests.conftest import WORDS, build_tiny_tokenizer

MODEL = "tiny"
DRIFT = {"neutral": "i like tea .", "attributes": {"cats": "i like cats .", "formal": "good day .",
                                                   "rain": "i dislike rain ."}}
CHAT = [{"role": "system", "content": "i live in lyon ."}, {"role": "user", "content": "where do you live ?"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def tiny_config(tokenizer, **kw) -> LlamaConfig:
    # initializer_range 0.2: peaked distributions, so batched and single-row argmaxes are never near-ties
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.2, **kw)


def tiny_lm(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer)).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0  # EOS logit 0: never the argmax of 47 signed logits
    return model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return write_artifacts(tmp_path_factory.mktemp("serve"))


def write_artifacts(root: Path) -> Path:
    """policy/ and guides/{pad,arm,rm,drift.json} under `root`."""
    tok = build_tiny_tokenizer()
    save_model(tiny_lm(tok, 1), tok, root / "policy")
    save_model(tiny_lm(tok, 2), tok, root / "guides" / "pad")
    save_model(tiny_lm(tok, 3), tok, root / "guides" / "arm")
    torch.manual_seed(4)
    rm = LlamaForSequenceClassification(tiny_config(tok, num_labels=1, id2label={0: "reward"},
                                                    label2id={"reward": 0})).eval()
    save_model(rm, tok, root / "guides" / "rm")
    (root / "guides" / "drift.json").write_text(json.dumps(DRIFT))
    return root


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The servers here run torch on 1 thread (ServeConfig.threads): with the 2 of conftest, a worker thread
    beside the test's request threads on a loaded 2-core machine made steps up to 100x slower (OpenMP waits)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def serve_config(root: Path, **kw) -> ServeConfig:
    base = dict(policy=str(root / "policy"), guides_dir=str(root / "guides"), db=str(root / "users.sqlite"),
                model_name=MODEL, device="cpu", threads=1, max_tokens=48, default_max_tokens=8, max_batch_size=8,
                max_queue=16, max_prompt_tokens=64, max_pairs=20, max_body_bytes=100_000)
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def server(artifacts):
    return load_server(serve_config(artifacts))


@pytest.fixture(scope="module")
def client(server):
    with TestClient(build_app(server)) as c:
        yield c


def chat(client, messages=CHAT, **kw):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0, **kw})


def complete(client, prompt="i live in", **kw):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "temperature": 0, **kw})


def sse(text: str) -> list:
    """The data lines of a server-sent-event body, JSON-decoded except the final [DONE]."""
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


# --- routes ---------------------------------------------------------------------------------------------------------
def test_completion_has_the_openai_shape_and_counts_its_tokens(client):
    r = complete(client, max_tokens=6)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    (c,) = body["choices"]
    assert c["index"] == 0 and c["finish_reason"] == "length" and c["text"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}  # "i live in": 3 words
    assert body["personalization"]["method"] == "none"


def test_chat_completion_has_the_openai_shape(client):
    body = chat(client, max_tokens=5).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (c,) = body["choices"]
    assert c["message"]["role"] == "assistant" and c["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["prompt_tokens"] > 10


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["engine"]["worker_alive"]
    assert health["guides"] == ["arm", "pad", "rm"] and health["drift"]


@pytest.mark.parametrize("route", ["chat", "completion"])
def test_stream_is_sse_ending_in_done_and_concatenates_to_the_plain_response(client, route):
    kw = {"max_tokens": 7, "seed": 3, "temperature": 0.8}
    call, path, body = (chat, "/v1/chat/completions", {"messages": CHAT}) if route == "chat" else \
        (complete, "/v1/completions", {"prompt": "i live in"})
    plain = call(client, **kw).json()
    with client.stream("POST", path, json={"model": MODEL, **body, **kw, "stream": True,
                                           "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r.read().decode())
    *content, last = chunks
    assert last["choices"] == [] and last["usage"] == plain["usage"]
    if route == "chat":
        assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
        expected = plain["choices"][0]["message"]["content"]
    else:
        text, expected = "".join(c["choices"][0]["text"] for c in content), plain["choices"][0]["text"]
    assert text == expected and len(content) > 3
    assert content[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_text_and_ends_the_row(client):
    full = complete(client, max_tokens=12).json()["choices"][0]["text"]
    word = full.split()[3]
    cut = complete(client, max_tokens=12, stop=[f" {word}"]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(f" {word}")]
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "i live in", "temperature": 0,
                                                          "max_tokens": 12, "stop": f" {word}", "stream": True}) as r:
        chunks = sse(r.read().decode())
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


def test_n_and_prompt_lists_give_prompt_major_choices_with_their_own_seeds(client):
    body = complete(client, prompt=["i live in", "you work as"], n=2, max_tokens=6, temperature=1.0, seed=11).json()
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 6  # a prompt counts once, whatever n
    finished = [c["finish_reason"] for c in body["choices"]]
    assert (body["usage"]["completion_tokens"] == 24) == (finished == ["length"] * 4)  # EOS is not counted
    again = complete(client, prompt=["i live in", "you work as"], n=2, max_tokens=6, temperature=1.0, seed=11).json()
    assert [c["text"] for c in again["choices"]] == texts  # a seed reproduces
    assert texts[0] != texts[1] and texts[2] != texts[3]  # ... but every choice has its own stream of noise


def test_top_p_near_zero_is_greedy(client):
    greedy = complete(client, max_tokens=8).json()["choices"][0]["text"]
    assert complete(client, max_tokens=8, temperature=1.5, top_p=1e-6, seed=5).json()["choices"][0]["text"] == greedy


METHODS = {"prompt": {"persona": "i like cats ."}, "pad": {"persona": "i like cats ."},
           "genarm": {"persona": "i like cats ."}, "args": {"persona": "i like cats ."},
           "drift": {"attribute_weights": {"cats": 1.0, "rain": -0.5}}}


@pytest.mark.parametrize("method", ["pad", "genarm", "args", "drift"])
def test_zero_strength_gives_the_tokens_of_the_prompt_the_method_reads(client, method):
    """pad/genarm/args with strength 0 decode the preference-prompted base; drift the plain one."""
    same = "none" if method == "drift" else "prompt"
    personal = lambda m, **kw: chat(client, max_tokens=10, personalization={"method": m, **METHODS[method], **kw})
    reference = personal(same).json()["choices"][0]["message"]["content"]
    assert personal(method, strength=0.0).json()["choices"][0]["message"]["content"] == reference
    guided = [personal(method, strength=s).json()["choices"][0]["message"]["content"] for s in (1.0, 4.0)]
    assert any(g != reference for g in guided)  # random guides move the argmax somewhere in 10 tokens


def _concurrently(client, bodies: list[dict], server) -> list[dict]:
    """POST every body at once (threads) while the worker is held, so that they all decode side by side."""
    engine = server.engine
    with ThreadPoolExecutor(len(bodies)) as pool:
        with engine.model_lock:
            submitted = engine.stats["requests"]
            futures = [pool.submit(client.post, "/v1/chat/completions", json=b) for b in bodies]
            _wait_for(lambda: engine.stats["requests"] == submitted + len(bodies))
        out = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in out), [r.json() for r in out]
    return [r.json() for r in out]


def test_greedy_request_gets_the_same_tokens_alone_as_batched_beside_other_users(client, server):
    me = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 16}
    alone = client.post("/v1/chat/completions", json=me).json()["choices"][0]["message"]["content"]
    others = [{"model": MODEL, "temperature": t, "max_tokens": 16 + 3 * i, "seed": i,
               "messages": [{"role": "user", "content": " ".join(WORDS[i:i + 3 + 2 * i])}],
               "personalization": {"method": m, **METHODS[m]}}
              for i, (m, t) in enumerate([("pad", 0.0), ("drift", 1.0), ("genarm", 0.0), ("args", 0.7),
                                          ("prompt", 1)])]
    server.engine.stats["max_batch_rows"] = 0
    results = _concurrently(client, [me, *others], server)
    assert server.engine.stats["max_batch_rows"] == 6  # all six decoded side by side
    assert results[0]["choices"][0]["message"]["content"] == alone
    # and every other user got what it gets alone (sampling too: per-row seeds, not a shared generator)
    for body, got in zip(others, results[1:], strict=True):
        solo = client.post("/v1/chat/completions", json=body).json()
        assert got["choices"][0]["message"]["content"] == solo["choices"][0]["message"]["content"]


# --- the hooks of decoding/generate.py the server decodes through ----------------------------------------------------
def test_nucleus_worked_example():
    from decoding.loop import nucleus

    scores = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(4, 3)  # mass above each token: 0, 0.5, 0.8
    kept = torch.isfinite(nucleus(scores, torch.tensor([0.5, 0.6, 0.81, 1.0])))
    assert kept.tolist() == [[True, False, False], [True, True, False], [True, True, True], [True, True, True]]


def test_per_row_temperature_samples_like_the_scalar_path_and_zero_rows_take_the_argmax():
    from decoding.loop import pick_tokens, seed_tensor, uniforms

    scores = torch.randn(3, 47, generator=torch.Generator().manual_seed(0))
    noise = uniforms(seed_tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long))
    scalar = pick_tokens(scores, 0.7, noise)
    assert torch.equal(pick_tokens(scores, torch.tensor([0.7, 0.7, 0.7]), noise), scalar)
    mixed = pick_tokens(scores, torch.tensor([0.0, 0.7, 0.0]), noise)
    assert mixed[0] == scores[0].argmax() and mixed[2] == scores[2].argmax() and mixed[1] == scalar[1]
    assert scalar[0] != scores[0].argmax() or scalar[2] != scores[2].argmax()  # T = 0.7 did sample somewhere


def test_sending_rows_to_decode_steps_finishes_them_and_leaves_the_others_alone(server):
    from decoding.guides import left_pad
    from decoding.loop import decode_steps, generate

    ids, mask = left_pad([[4, 5, 6], [7, 8], [9, 10, 11, 12]], 0)
    kw = dict(max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    plain = generate(server.guidance.base, ids, mask, **kw)
    steps, got = decode_steps(server.guidance.base, ids, mask, **kw), []
    got.append(next(steps))
    got.append(steps.send(torch.tensor([False, True, False])))  # row 1 stops after its first token
    got += list(steps)
    got = torch.stack(got, 1)
    assert got.shape == plain.shape and (plain[1, 1:] != 0).all()
    assert torch.equal(got[[0, 2]], plain[[0, 2]]) and got[1, 0] == plain[1, 0] and (got[1, 1:] == 0).all()


# --- queue, timeouts ------------------------------------------------------------------------------------------------
def _wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_full_queue_answers_429_and_the_queued_requests_still_complete(client, server):
    engine = server.engine
    engine.max_queue, old = 2, engine.max_queue
    try:
        with ThreadPoolExecutor(3) as pool, engine.model_lock:  # the worker stalls on its first batch
            submitted = engine.stats["requests"]
            running = pool.submit(complete, client, max_tokens=4)
            # submitted and no longer pending: the worker has collected it and waits for the model lock
            _wait_for(lambda: engine.stats["requests"] == submitted + 1 and not engine.pending)
            queued = [pool.submit(complete, client, max_tokens=4) for _ in range(2)]
            _wait_for(lambda: len(engine.pending) == 2)
            r = complete(client, max_tokens=4)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert set(r.json()["error"]) == ERROR_KEYS
        assert [f.result().status_code for f in [running, *queued]] == [200, 200, 200]
    finally:
        engine.max_queue = old


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_timeout_gets_408_and_is_never_decoded(client, server, stream):
    server.cfg.request_timeout_s, old = 0.2, server.cfg.request_timeout_s
    rows = server.engine.stats["rows"]
    try:
        with server.engine.model_lock:
            r = complete(client, max_tokens=4, stream=stream)
            time.sleep(0.1)
    finally:
        server.cfg.request_timeout_s = old
    if stream:
        assert r.status_code == 200  # the stream had started: its last event is the error
        events = sse(r.text)
        assert events[-1]["error"]["type"] == "timeout_error"
    else:
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
    _wait_for(lambda: not server.engine.pending)
    assert complete(client, max_tokens=2).status_code == 200
    assert server.engine.stats["rows"] == rows + 1  # the timed-out job was dropped from the queue, not decoded


# --- errors ---------------------------------------------------------------------------------------------------------
LONG = " ".join(["i"] * 70)
BAD = [  # (route, body, status, param)
    ("completions", {"prompt": "i"}, 400, "model"),
    ("completions", {"model": "gpt-4", "prompt": "i"}, 404, "model"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "i", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "i", "temperature": "0.5"}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "i", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "i", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "i", "max_tokens": 49}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "i", "n": 9}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": ["i"] * 5, "n": 2}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "i", "seed": 2**64}, 400, "seed"),
    ("completions", {"model": MODEL, "prompt": "i", "stop": ""}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": "i", "stop": ["a"] * 5}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": "i", "logprobs": 3}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "i", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {"model": MODEL, "prompt": "i", "best_of": 2}, 400, "best_of"),
    ("completions", {"model": MODEL, "prompt": "\ud800"}, 400, "prompt"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "i"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "personalization": {"method": "magic"}}, 400,
     "personalization.method"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "personalization": {"method": "pad"}}, 400,
     "personalization.persona"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "personalization": {"method": "drift"}}, 400,
     "personalization.attribute_weights"),
    ("chat/completions", {"model": MODEL, "messages": CHAT,
                          "personalization": {"method": "drift", "attribute_weights": {"jokes": 1}}}, 400,
     "personalization.attribute_weights"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "personalization": {"method": "pad", "user_id": "nobody"}},
     404, "personalization.user_id"),
    ("chat/completions", {"model": MODEL, "messages": CHAT,
                          "personalization": {"method": "pad", "persona": "i", "strength": -1}}, 400,
     "personalization.strength"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "personalization": {"method": "pad", "user_id": "a/b"}},
     400, "personalization.user_id"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_gets_a_4xx_with_an_openai_error_object(client, route, body, status, param):
    r = client.post(f"/v1/{route}", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.json()
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["param"] == param and error["message"]


def test_malformed_bodies_unknown_routes_and_huge_bodies_are_4xx(client):
    for r in [client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
              client.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}),
              client.get("/v1/nowhere"), client.delete("/v1/completions"),
              client.post("/v1/completions", content=b"x" * 200_000)]:
        assert 400 <= r.status_code < 500 and set(r.json()["error"]) == ERROR_KEYS
    assert client.post("/v1/completions", content=b"x" * 200_000).status_code == 413


@pytest.fixture(scope="module")
def bare(artifacts, tmp_path_factory):
    """A server with no guides_dir and an API key."""
    db = tmp_path_factory.mktemp("bare") / "users.sqlite"
    server = load_server(serve_config(artifacts, guides_dir=None, db=str(db)))
    server.api_key = "k3y"  # what main reads from $PERSONA_API_KEY or api_key_file
    with TestClient(build_app(server)) as c:
        yield c


@pytest.mark.parametrize("method", ["pad", "genarm", "args", "drift"])
def test_a_method_without_its_guide_gets_a_400_naming_it(bare, method):
    personalization = {"method": method, "persona": "i like cats .", "attribute_weights": {"cats": 1.0}}
    r = bare.post("/v1/chat/completions", headers={"authorization": "Bearer k3y"},
                  json={"model": MODEL, "messages": CHAT, "max_tokens": 2, "personalization": personalization})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "guide_not_configured" and "no guides_dir configured" in error["message"]
    assert f"'{method}'" in error["message"]


def test_api_key_is_required_on_every_route(bare):
    routes = [("GET", "/health"), ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("GET", "/v1/users/u"), ("PUT", "/v1/users/u"),
              ("PATCH", "/v1/users/u"), ("DELETE", "/v1/users/u"), ("GET", "/v1/nowhere")]
    for method, path in routes:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "k3y"}):
            r = bare.request(method, path, headers=headers, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path)
        assert bare.request(method, path, headers={"authorization": "Bearer k3y"}, json={}).status_code != 401
    ok = bare.post("/v1/completions", headers={"authorization": "Bearer k3y"},
                   json={"model": MODEL, "prompt": "i", "max_tokens": 2})
    assert ok.status_code == 200


# --- profiles -------------------------------------------------------------------------------------------------------
def test_profile_create_read_update_delete(client):
    assert client.put("/v1/users/ann", json={"persona": "i like cats ."}).status_code == 201
    assert client.put("/v1/users/ann", json={"persona": "i like dogs ."}).status_code == 200
    got = client.get("/v1/users/ann").json()
    assert got["persona"] == "i like dogs ." and got["attribute_weights"] is None and got["object"] == "user"
    patched = client.patch("/v1/users/ann", json={"attribute_weights": {"cats": 0.5}}).json()
    assert patched["persona"] == "i like dogs ." and patched["attribute_weights"] == {"cats": 0.5}
    body = chat(client, max_tokens=3, personalization={"method": "drift", "user_id": "ann"}).json()
    assert body["personalization"]["attribute_weights"] == {"cats": 0.5, "formal": 0.0, "rain": 0.0}
    assert body["personalization"]["user_id"] == "ann"
    assert client.delete("/v1/users/ann").json() == {"id": "ann", "object": "user", "deleted": True}
    for r in [client.get("/v1/users/ann"), client.delete("/v1/users/ann"), client.patch("/v1/users/ann", json={})]:
        assert r.status_code == 404 and r.json()["error"]["code"] == "user_not_found"


@pytest.mark.parametrize(("body", "param"), [
    ({"attribute_weights": {"jokes": 1.0}}, "attribute_weights"),
    ({"attribute_weights": {"cats": 1.0}, "pairs": [{"prompt": "i", "chosen": "a", "rejected": "b"}]}, "pairs"),
    ({"pairs": [{"prompt": "i", "chosen": "a", "rejected": "b"}] * 21}, "pairs"),
    ({"pairs": []}, "pairs"),
    ({"persona": 3}, "persona"),
    ({"nickname": "x"}, "nickname"),
])
def test_bad_profile_gets_a_400(client, body, param):
    r = client.put("/v1/users/bob", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert client.get("/v1/users/bob").status_code == 404


def test_bad_user_id_is_a_400_or_404(client):
    assert client.get("/v1/users/" + quote("-starts-with-dash")).status_code == 400
    assert client.get("/v1/users/" + "x" * 200).status_code == 400
    assert client.get("/v1/users/" + quote("a/b", safe="")).status_code == 404  # %2F is a path separator


def test_profile_pairs_fit_the_drift_weights_of_decoding_drift(client, server):
    """The server's fit equals decoding/drift.py's attribute_rewards + fit_weights on the same pairs and guide."""
    import numpy as np

    from decoding.drift import attribute_rewards, fit_weights

    pairs = [{"prompt": "where do you live ?", "chosen": "i live in lyon .", "rejected": "hey !"},
             {"prompt": [{"role": "user", "content": "what is your job ?"}],
              "chosen": "good day , i work as a nurse .", "rejected": "i like cats ."},
             {"prompt": "do you like rain ?", "chosen": "i dislike rain .", "rejected": "i like rain and tea ."}]
    got = client.put("/v1/users/carl", json={"pairs": pairs}).json()
    assert got["pairs"] == 3 and got["fit"]["method"] == "closed_form"
    rows = [{**p, "prompt": [{"role": "user", "content": p["prompt"]}] if isinstance(p["prompt"], str)
             else p["prompt"]} for p in pairs]
    first, second = attribute_rewards(server.guidance.guides["pad"], server.guidance.tokenizer, rows,
                                      [DRIFT["neutral"], *DRIFT["attributes"].values()])
    expected = fit_weights(first - second)
    assert np.allclose([got["attribute_weights"][a] for a in DRIFT["attributes"]], expected, atol=1e-6)
    assert abs(np.linalg.norm(expected) - 1) < 1e-6


# --- fuzzing --------------------------------------------------------------------------------------------------------
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)
words = st.lists(st.sampled_from([*WORDS, "<|end|>", "zebra", "\ud800", "😀", ""]), max_size=8).map(" ".join)


def maybe(s):
    return s | values


personalization = st.fixed_dictionaries({}, optional={
    "method": maybe(st.sampled_from(["none", "prompt", "pad", "drift", "genarm", "args", "x"])),
    "user_id": maybe(st.sampled_from(["u1", "nobody", "", "a b"])), "persona": maybe(words),
    "attribute_weights": maybe(st.dictionaries(st.sampled_from(["cats", "formal", "rain", "jokes"]),
                                               st.floats(-5, 5) | values, max_size=3)),
    "strength": maybe(st.floats(-1, 200))})
sampling = {"model": maybe(st.sampled_from([MODEL, "gpt-4"])), "max_tokens": maybe(st.integers(-2, 6)),
            "temperature": maybe(st.floats(-1, 3)), "top_p": maybe(st.floats(-0.5, 1.5)),
            "n": maybe(st.integers(-1, 10)), "stop": maybe(words | st.lists(words, max_size=5)),
            "seed": maybe(st.integers(-(2**65), 2**65)), "stream": maybe(st.booleans()),
            "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": maybe(st.booleans())})),
            "personalization": maybe(personalization), "frequency_penalty": maybe(st.floats(-1, 1)),
            "user": maybe(st.text(max_size=5))}
message = st.fixed_dictionaries({"role": maybe(st.sampled_from(["system", "user", "assistant", "tool"])),
                                 "content": maybe(words | st.lists(st.fixed_dictionaries(
                                     {"type": maybe(st.just("text")), "text": maybe(words)}), max_size=2))})
completion = st.fixed_dictionaries({"prompt": maybe(words | st.lists(words, max_size=3))}, optional=sampling)
chat_body = st.fixed_dictionaries({"messages": maybe(st.lists(message, max_size=3))}, optional=sampling)
profile = st.fixed_dictionaries({}, optional={
    "persona": maybe(words), "attribute_weights": maybe(st.dictionaries(st.sampled_from(["cats", "x"]), values)),
    "pairs": maybe(st.lists(st.fixed_dictionaries({"prompt": maybe(words), "chosen": maybe(words),
                                                   "rejected": maybe(words)}), max_size=2))})
# mostly valid bodies too, so that generation, streaming and every method run under the fuzzer
sane_words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
sane = {"max_tokens": st.integers(1, 3), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
        "n": st.integers(1, 3), "stop": sane_words | st.lists(sane_words, max_size=2), "seed": st.integers(0, 2**40),
        "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "personalization": st.fixed_dictionaries({"method": st.sampled_from(list(METHODS) + ["none"])}, optional={
            "persona": sane_words, "user_id": st.just("u1"), "strength": st.floats(0, 5),
            "attribute_weights": st.dictionaries(st.sampled_from(list(DRIFT["attributes"])), st.floats(-2, 2))})}
sane_completion = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": sane_words}, optional=sane)
sane_chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": sane_words}), min_size=1, max_size=3)},
    optional=sane)
user_id = st.sampled_from(["u1", "u2", "nobody"]) | st.text(max_size=10)
requests = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/completions"), sane_completion),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), sane_chat),
    st.tuples(st.just("POST"), st.just("/v1/completions"), completion | values),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat_body | values),
    st.tuples(st.sampled_from(["PUT", "PATCH"]), user_id.map(lambda u: f"/v1/users/{quote(u, safe='')}"),
              profile | values),
    st.tuples(st.sampled_from(["GET", "DELETE"]), user_id.map(lambda u: f"/v1/users/{quote(u, safe='')}"),
              st.none()),
    st.tuples(st.sampled_from(["POST", "GET"]), st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              st.binary(max_size=40)),
)
FUZZ_COUNT = {"requests": 0, "2xx": 0}


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_fuzzed_requests_never_get_a_5xx(fuzz_client, request):
    method, path, body = request
    if not isinstance(body, bytes | None):  # json.dumps writes lone surrogates as \ud800 and inf as Infinity
        body = json.dumps(body).encode()
    r = fuzz_client.request(method, path, content=body, headers={"content-type": "application/json"})
    FUZZ_COUNT["requests"] += 1
    FUZZ_COUNT["2xx"] += r.status_code < 300
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == ERROR_KEYS


@pytest.fixture(scope="module")
def fuzz_client(server, client):
    """The module's client with a stored user u1, and 2 new tokens by default (1,000 requests in ~10 s)."""
    client.put("/v1/users/u1", json={"persona": "i like cats .", "attribute_weights": {"cats": 1.0}})
    server.cfg.default_max_tokens, old = 2, server.cfg.default_max_tokens
    yield client
    server.cfg.default_max_tokens = old


def test_the_server_answers_after_the_fuzzing(client, server):
    assert FUZZ_COUNT["requests"] >= 1000 and FUZZ_COUNT["2xx"] >= 100, FUZZ_COUNT  # valid requests were generated
    assert client.get("/health").json()["engine"]["failures"] == 0
    assert complete(client, max_tokens=3).status_code == 200


# --- a real uvicorn process, the official openai client -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """`python -m decoding.serve` in a subprocess on a free loopback port; `start()` waits for /health."""

    def __init__(self, artifacts: Path, runs: Path, env: dict | None = None, **cfg):
        self.artifacts, self.runs, self.proc, self.url, self.env = artifacts, runs, None, None, env or {}
        self.cfg = cfg  # ServeConfig fields over the defaults below

    def start(self) -> "Process":
        port = free_port()
        cfg = serve_config(self.artifacts, **{"db": str(self.runs / "users.sqlite"), "max_tokens": 480,
                                              "max_batch_size": 32, "max_queue": 64,
                                              "threads": 1, **self.cfg})
        args = [f"{k}={v}" for k, v in vars(cfg).items() if v is not None and not hasattr(v, "__dataclass_fields__")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "decoding.serve", *args, f"port={port}",
                                      f"runs_dir={self.runs}"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.runs / "server.log", "a"), cwd=Path(__file__).parent.parent)
        self.url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, (self.runs / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code in (200, 401):
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server did not come up in 90 s"
            time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()["engine"]

    def kill(self, sig=signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)


@pytest.fixture(scope="module")
def process(artifacts, tmp_path_factory):
    p = Process(artifacts, tmp_path_factory.mktemp("runs")).start()
    yield p
    if p.proc.poll() is None:
        p.kill(signal.SIGTERM)


def test_openai_client_completion_chat_and_stream(process):
    import openai

    client = openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [MODEL]
    c = client.completions.create(model=MODEL, prompt="i live in", max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8 and c.choices[0].text
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
              extra_body={"personalization": {"method": "pad", "persona": "i like cats .", "strength": 2.0}})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 8
    assert r.model_extra["personalization"]["method"] == "pad"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="i live in", max_tokens=8, temperature=0, stream=True))
    assert text == c.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="i")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert bad.value.body["param"] == "temperature"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(process, stream):
    before = process.health()
    body = {"model": MODEL, "prompt": "i live in", "max_tokens": 480, "temperature": 0, "n": 4, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # the rows are decoding; leave
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{process.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.15))
    _wait_for(lambda: process.health()["running_rows"] == 0, timeout=20)
    after = process.health()
    assert after["cancelled_rows"] == before["cancelled_rows"] + 4
    assert after["completion_tokens"] - before["completion_tokens"] < 4 * 480  # they stopped early


def test_32_concurrent_clients_lose_no_request_and_share_batches(process):
    async def client_loop(http, i):
        out = []
        for k in range(2):
            r = await http.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 12, "temperature": 0.7, "seed": 100 * i + k,
                "messages": [{"role": "user", "content": " ".join(WORDS[i % 30:i % 30 + 4])}],
                "personalization": {"method": ["none", "pad", "drift", "prompt"][i % 4], "persona": "i like cats .",
                                    "attribute_weights": {"cats": 1.0}}})
            out.append(r)
        return out

    async def main():
        async with httpx.AsyncClient(base_url=process.url, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as http:
            return await asyncio.gather(*[client_loop(http, i) for i in range(32)])

    before = process.health()
    responses = [r for rs in asyncio.run(main()) for r in rs]
    assert len(responses) == 64 and all(r.status_code == 200 for r in responses)
    for r in responses:  # 12 tokens, or fewer when a sampled EOS ended the row
        (c,) = r.json()["choices"]
        assert (r.json()["usage"]["completion_tokens"] == 12) == (c["finish_reason"] == "length")
    after = process.health()
    assert after["rows"] - before["rows"] == 64 and after["cancelled_rows"] == before["cancelled_rows"]
    steps, row_steps = after["steps"] - before["steps"], after["row_steps"] - before["row_steps"]
    assert row_steps > 4 * steps  # decoded side by side: more than 4 rows per step on average
    assert after["max_batch_rows"] > 8


def test_a_user_profile_survives_sigkill_and_restart(process):
    profile = {"persona": "i like cats .", "attribute_weights": {"cats": 0.25, "rain": -1.0}}
    created = httpx.put(f"{process.url}/v1/users/zoe", json=profile, timeout=10)
    assert created.status_code == 201
    process.kill(signal.SIGKILL)
    process.start()
    got = httpx.get(f"{process.url}/v1/users/zoe", timeout=10)
    assert got.status_code == 200 and got.json() == created.json()
    r = httpx.post(f"{process.url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": CHAT, "max_tokens": 3, "personalization": {"method": "drift", "user_id": "zoe"}})
    assert r.status_code == 200 and r.json()["personalization"]["attribute_weights"]["rain"] == -1.0


def test_entry_point_help_and_a_bad_key_fail_in_one_line(capsys):
    from alignment.config import run_cli
    from decoding.serve import main

    with pytest.raises(SystemExit) as bad:
        run_cli(ServeConfig, main, ["prot=1"])
    assert bad.value.code == 2
    assert capsys.readouterr().err.strip() == "error: prot: unknown key for ServeConfig; did you mean 'port'?"
    with pytest.raises(SystemExit) as ok:
        run_cli(ServeConfig, main, ["config=serve.yaml", "help"])
    out = capsys.readouterr().out
    assert ok.value.code == 0 and "max_batch_size" in out and "127.0.0.1" in out


# --- hardening: secrets, refusals, shutdown, profiles ---------------------------------------------------------------
def test_api_key_on_the_command_line_is_refused_naming_the_two_ways_that_work():
    from alignment.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^api_key: no longer a key of ServeConfig; .*PERSONA_API_KEY.*"
                                          r"api_key_file="):
        load_config(ServeConfig, ["api_key=s3cret"])


def test_a_non_loopback_host_without_a_key_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from alignment.config import ConfigError
    from decoding.serve import main

    monkeypatch.delenv("PERSONA_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="host=0.0.0.0 serves beyond this machine.*allow_unauthenticated=true"):
        main(ServeConfig(host="0.0.0.0", runs_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []  # no run directory, no model loaded


def test_the_key_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from alignment.config import ConfigError
    from decoding.serve import read_api_key

    monkeypatch.delenv("PERSONA_API_KEY", raising=False)
    assert read_api_key(ServeConfig()) is None
    monkeypatch.setenv("PERSONA_API_KEY", "from-env")
    assert read_api_key(ServeConfig()) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    with pytest.raises(ConfigError, match="PERSONA_API_KEY is set too"):
        read_api_key(ServeConfig(api_key_file=str(tmp_path / "key")))
    monkeypatch.delenv("PERSONA_API_KEY")
    assert read_api_key(ServeConfig(api_key_file=str(tmp_path / "key"))) == "from-file"
    (tmp_path / "empty").write_text("\n")
    for name, why in (("empty", "is empty"), ("missing", "cannot read")):
        with pytest.raises(ConfigError, match=why):
            read_api_key(ServeConfig(api_key_file=str(tmp_path / name)))


@pytest.mark.slow
def test_the_key_reaches_no_file_nor_argv_and_sigterm_closes_the_run(artifacts, tmp_path):
    key = "k-" + os.urandom(8).hex()
    p = Process(artifacts, tmp_path, env={"PERSONA_API_KEY": key}).start()
    try:
        assert httpx.get(f"{p.url}/health", timeout=5).status_code == 401
        r = httpx.post(f"{p.url}/v1/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": MODEL, "prompt": "i live in", "max_tokens": 4})
        assert r.status_code == 200
        assert httpx.put(f"{p.url}/v1/users/ann", headers={"authorization": f"Bearer {key}"}, timeout=10,
                         json={"persona": "i like cats ."}).status_code == 201
    finally:
        p.proc.send_signal(signal.SIGTERM)
        code = p.proc.wait(60)
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
    (run,) = [d for d in tmp_path.iterdir() if d.name.startswith("serve-")]
    assert (run / "DONE").is_file()  # the run is closed, not left looking like a crash
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    meta = json.loads((run / "meta.json").read_text())
    assert key not in json.dumps(meta) and not any("api_key" in a for a in meta["argv"])
    assert (tmp_path / "users.sqlite").stat().st_mode & 0o777 == 0o600


def test_concurrent_profile_updates_lose_none(tmp_path):
    from decoding.profiles import Profiles

    store = Profiles(tmp_path / "users.sqlite")
    store.put("u", {"persona": "x"})

    def add(i):
        def change(old):
            time.sleep(0.002)  # a read-modify-write outside one transaction would lose updates in this window
            return {**old, f"k{i}": i}
        store.update("u", change)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(16)))
    assert {f"k{i}" for i in range(16)} <= set(store.get("u")) and store.get("u")["persona"] == "x"
    assert (tmp_path / "users.sqlite").stat().st_mode & 0o777 == 0o600


def test_attribute_weights_are_bounded_and_known(client, bare):
    for weights in ({"cats": 1e300}, {"cats": -101.0}, {"nope": 1.0}):
        r = client.put("/v1/users/w", json={"attribute_weights": weights})
        assert r.status_code == 400 and r.json()["error"]["param"] == "attribute_weights", weights
    assert client.put("/v1/users/w", json={"attribute_weights": {"cats": 100.0}}).status_code in (200, 201)
    r = bare.put("/v1/users/w", headers={"authorization": "Bearer k3y"}, json={"attribute_weights": {"cats": 1.0}})
    assert r.status_code == 400 and "serves no Drift attributes" in r.json()["error"]["message"]


def test_a_generation_error_reaches_the_client_as_an_error_id_only(client, server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /home/user/weights")

    monkeypatch.setattr(server.guidance.base, "forward", broken)
    with caplog.at_level("ERROR", logger="decoding.scheduler"):
        r = chat(client, max_tokens=2)
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert "secret detail" not in message and "error id" in message
    error_id = message.split("error id ")[1].split(";")[0]
    assert error_id in caplog.text and "secret detail" in caplog.text  # the details are in the log, under the id


def slow_drift_guide(server, monkeypatch, seconds: float) -> threading.Event:
    """Every forward of the Drift guide (the pad guide; plain completions never run it) takes `seconds` longer;
    the event is set at the first."""
    guide, started = server.guidance.drift_model(), threading.Event()
    forward = guide.forward

    def slow(*args, **kwargs):
        started.set()
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(guide, "forward", slow)
    return started


def test_decoding_is_served_between_the_chunks_of_a_large_pair_fit(client, server, monkeypatch):
    from decoding.serve import FIT_CHUNK_PAIRS

    pairs = [{"prompt": "where do you live ?", "chosen": "i live in lyon .", "rejected": "hey !"}] * 64
    monkeypatch.setattr(server.cfg, "max_pairs", 64)
    started = slow_drift_guide(server, monkeypatch, 0.05)  # 2 x 4 prompts x 8 chunks = 64 forwards: >= 3.2 s
    with ThreadPoolExecutor(1) as pool:
        fit = pool.submit(client.put, "/v1/users/big", json={"pairs": pairs})
        assert started.wait(10)
        finished = []
        while not fit.done():
            assert complete(client, max_tokens=2).status_code == 200
            finished.append(fit.done())
        assert fit.result().status_code == 201 and fit.result().json()["pairs"] == 64
    # completions were answered while the fit still ran: they waited for a chunk, never for all 64 / 8 of them
    assert finished.count(False) >= 64 // FIT_CHUNK_PAIRS // 2, finished


def test_a_fit_past_max_fit_s_is_refused_and_stores_nothing(client, server, monkeypatch):
    pairs = [{"prompt": "where do you live ?", "chosen": "i live in lyon .", "rejected": "hey !"}] * 20
    slow_drift_guide(server, monkeypatch, 0.02)  # the first chunk alone takes >= 0.16 s
    monkeypatch.setattr(server.cfg, "max_fit_s", 0.1)
    r = client.put("/v1/users/toolong", json={"pairs": pairs})
    assert r.status_code == 400 and set(r.json()["error"]) == ERROR_KEYS
    assert r.json()["error"]["code"] == "fit_too_long" and "max_fit_s" in r.json()["error"]["message"]
    assert client.get("/v1/users/toolong").status_code == 404
