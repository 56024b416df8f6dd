"""Chat prompts in, sampled responses out: the one place policies are rendered, tokenized and sampled.

Used by SFT evaluation, APC-DPO pair construction and every evaluation, so that all of them see the same prompt
text. Generation goes through transformers `model.generate` (left padding, KV cache).
"""

from __future__ import annotations

import numpy as np
import torch

from alignment.models import stop_ids


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text of `messages` followed by the assistant header (no special tokens added twice)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def default_system(tokenizer) -> str | None:
    """The system text the chat template writes when a chat has no system turn (SmolLM2: "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face"), or None when it writes none.

    Found by rendering one chat with a marker system turn and once without: the default sits where the marker was.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    marker, user = "\x00SYSTEM\x00", [{"role": "user", "content": "\x00USER\x00"}]
    render = lambda m: tokenizer.apply_chat_template(m, tokenize=False)  # noqa: E731
    before, _, after = render([{"role": "system", "content": marker}, *user]).partition(marker)
    bare = render(user)
    if not bare.startswith(before) or not bare.endswith(after) or len(bare) < len(before) + len(after):
        return None
    return bare[len(before):len(bare) - len(after)] or None


def with_system_suffix(messages: list[dict], suffix: str, default: str | None = None) -> list[dict]:
    """`messages` with `suffix` appended to the system turn (how the world writes stated preferences). A chat with
    no system turn gets one: `default` (the template's own system text, `default_system`) then the suffix, so the
    model keeps the system prompt it would have read."""
    out = [dict(m) for m in messages]
    if not suffix:
        return out
    if not out or out[0]["role"] != "system":
        return [{"role": "system", "content": f"{default} {suffix}" if default else suffix}, *out]
    out[0]["content"] = f"{out[0]['content']} {suffix}"
    return out


def encode_example(tokenizer, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS), tokenized separately so the boundary never merges."""
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response_ids


@torch.inference_mode()
def sample_responses(model, tokenizer, prompts: list[list[dict]], *, n: int = 1, temperature: float = 1.0,
                     max_new_tokens: int = 96, batch_size: int = 64, seed: int = 0) -> list[list[str]]:
    """Sample `n` responses per chat prompt; returns one list of `n` decoded strings per prompt.

    temperature 0 means greedy. Sampling is plain ancestral sampling (no top-k / top-p), seeded per call.
    """
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [render_prompt(tokenizer, p) for p in prompts for _ in range(n)]
    stops = stop_ids(model, tokenizer)  # chat models may end on several ids (generation_config's list)
    out: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
                else {"do_sample": False}
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops, **sampling)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [[t.strip() for t in out[i * n:(i + 1) * n]] for i in range(len(prompts))]


def sample_responses_by_length(model, tokenizer, prompts: list[list[dict]], **kw) -> list[list[str]]:
    """`sampling.sample_responses` on the prompts sorted by length, answers returned in the input order.

    Batches of similar length waste little left padding: few-shot prompts range from ~30 to ~1,250 tokens, and a
    random batch of 64 pads every row to about its longest."""
    order = np.argsort([len(render_prompt(tokenizer, p)) for p in prompts], kind="stable")
    out = sample_responses(model, tokenizer, [prompts[i] for i in order], **kw)
    answers: list[list[str]] = [[] for _ in prompts]
    for i, a in zip(order, out, strict=True):
        answers[i] = a
    return answers
