"""The decode API on a real pretrained chat model: `python -m decoding.serve config=real/serve.yaml` (SmolLM2-135M-
Instruct, no world artifact) in a subprocess on a loopback port, driven by the official `openai` client: the model
card says what may be asked for, the chat template is applied, replies stop at the model's EOS, stream, and are
steered by prompt, self-guided PAD and zero-shot Drift; a greedy reply equals offline decoding (the same
`decoding.generate` loop, in this process, on the conftest `real_lm`) for the same prompt and method.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from alignment.config import load_config
from alignment.models import stop_ids
from decoding.drift import load_attribute_prompts
from decoding.guides import left_pad
from decoding.loop import generate
from decoding.personalization import Guidance, build_rule, encode_rows, resolve
from decoding.serve import ServeConfig
from tests.test_serve import free_port

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).parent.parent
COOK = [{"role": "user", "content": "What should I cook tonight?"}]
PIRATE = "The user is a pirate and wants every answer written in pirate speak."
ATTRIBUTES = list(load_attribute_prompts("real/drift_attributes.json")["attributes"])
METHODS = {"none": {"method": "none"}, "prompt": {"method": "prompt", "persona": PIRATE},
           "pad": {"method": "pad", "persona": PIRATE},
           "drift": {"method": "drift", "attribute_weights": {"enthusiastic": 1.0, "bullets": 1.0}, "strength": 2.0}}
ENGLISH = {"the", "a", "i", "you", "to", "and", "is", "of", "for", "ye", "your", "some", "cook", "what", "should"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real config's server; starting it (model cached by conftest's real_dir) must take well under 2 min."""
    runs = tmp_path_factory.mktemp("real-serve")
    port = free_port()
    args = ["config=real/serve.yaml", f"port={port}", f"db={runs / 'users.sqlite'}", f"runs_dir={runs}", "threads=1",
            "max_tokens=64"]
    log = open(runs / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "decoding.serve", *args], stdout=subprocess.DEVNULL, stderr=log,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        assert proc.poll() is None, (runs / "server.log").read_text()[-2000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "the real server did not come up in 120 s"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, method: str, messages=COOK, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                          extra_body={"personalization": METHODS[method]}, **kw)


@pytest.mark.slow
def test_the_model_card_lists_the_methods_served_and_drifts_attributes(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = httpx.get(f"{server}/v1/models/{MODEL}", timeout=10).json()["personalization"]
    assert card["methods"] == ["none", "prompt", "pad", "drift"]  # no world guide: no genarm, no args
    assert card["drift_attributes"] == ATTRIBUTES and card["pad_guide"] == "base" and card["drift_guide"] == "base"
    bad = httpx.post(f"{server}/v1/chat/completions", timeout=10, json={
        "model": MODEL, "messages": COOK, "personalization": {"method": "genarm", "persona": PIRATE}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "guide_not_configured"


@pytest.mark.slow
def test_openai_client_gets_english_that_stops_at_eos_streams_and_is_personalized(client):
    short = client.chat.completions.create(model=MODEL, max_tokens=32, temperature=0, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 32  # EOS, not the limit
    assert "Paris" in short.choices[0].message.content
    replies = {m: ask(client, m).choices[0].message.content for m in METHODS}
    for method, text in replies.items():
        assert set(text.lower().replace(",", " ").replace(".", " ").split()) & ENGLISH, (method, text)
    assert replies["pad"] != replies["none"] and replies["drift"] != replies["none"]
    assert replies["pad"] != replies["prompt"]  # self-guided PAD is not prompting
    chunks = list(ask(client, "pad", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == replies["pad"]
    assert chunks[-1].usage.completion_tokens == 24


def offline(real_lm, method: str) -> str:
    """The same request decoded in this process by `decoding.loop.generate` with the real config's settings."""
    model, tok = real_lm
    cfg = load_config(ServeConfig, ["config=real/serve.yaml"])
    g = Guidance(tok, model, {}, load_attribute_prompts(cfg.drift_prompts), cfg.drift_guide,
                 {"pad": cfg.strength.pad, "drift": cfg.strength.drift}, cfg.pad_top_k, cfg.args_top_k, None,
                 pad_guide=cfg.pad_guide)
    p = resolve(METHODS[method], None, g)
    rows = encode_rows(g, COOK, p)
    with torch.inference_mode():
        new = generate(model, *left_pad([rows.base], tok.pad_token_id), build_rule(g, [(p, rows)]),
                       max_new_tokens=24, eos_token_id=stop_ids(model, tok), pad_token_id=tok.pad_token_id)
    return tok.decode(new[0], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "pad", "drift"])
def test_a_greedy_reply_equals_offline_decoding_of_the_same_prompt_and_method(client, real_lm, method):
    assert ask(client, method).choices[0].message.content == offline(real_lm, method)
