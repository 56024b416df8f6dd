"""The OpenAI wire format of the decode API (decoding/serve.py): request bodies, error objects, response bodies and
stream chunks. Pydantic models validate strictly (no silent "5" -> 5 or true -> 1, no NaN, unknown fields refused),
so a bad request is a 400 naming its field, e.g. `messages.0.role`.

    CompletionRequest / ChatRequest   OpenAI's fields (model, prompt | messages, max_tokens, temperature, top_p, n,
                                      stop, seed, stream, stream_options, user) + the `personalization` extension
    ProfileBody                       a user profile: persona, attribute_weights, or labelled pairs
    APIError                          {"error": {"message", "type", "param", "code"}} with an HTTP status
    Reply                             a completion / chat completion body, or its server-sent-event chunks
"""

import json
import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
USER_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"


# --- request bodies (pydantic; strict: no silent "5" -> 5, true -> 1) ------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


UserId = Annotated[str, Field(pattern=USER_ID)]
Text = Annotated[str, Field(max_length=200_000)]


class Personalization(Strict):
    method: Literal["none", "prompt", "pad", "drift", "genarm", "args"] = "none"
    user_id: UserId | None = None
    persona: Text | None = None
    attribute_weights: Annotated[dict[Annotated[str, Field(max_length=64)], float], Field(max_length=64)] | None = None
    strength: Annotated[float, Field(ge=0, le=100)] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """Fields shared by completions and chat completions (OpenAI names and ranges)."""

    model: Annotated[str, Field(max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1024)] | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # the end user, as OpenAI clients send it; unused
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    personalization: Personalization | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported; send 0 or leave the field out")
        return v


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1024)]
    logprobs: Literal[0] | None = None  # logprobs are not returned; 0 / null accepted for compatibility
    echo: Literal[False] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)]
    name: Annotated[str, Field(max_length=256)] | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None


class Pair(Strict):
    prompt: Text | Annotated[list[Message], Field(min_length=1, max_length=64)]
    chosen: Text
    rejected: Text


class ProfileBody(Strict):
    """PUT replaces the profile with these fields; PATCH changes only the fields given."""

    persona: Text | None = None
    attribute_weights: Annotated[dict[Annotated[str, Field(max_length=64)], float], Field(max_length=64)] | None = None
    pairs: Annotated[list[Pair], Field(min_length=1, max_length=100_000)] | None = None


# --- errors ---------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An OpenAI-style error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, close: bool = False):
        """The JSONResponse; `close` ends the connection after it (a refusal whose body was left unread)."""
        from fastapi.responses import JSONResponse

        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        return JSONResponse(self.body(), status_code=self.status, headers=headers | ({"Connection": "close"}
                                                                                    if close else {}))


def validation_error(exc) -> APIError:
    """FastAPI's validation errors (a list) as one 400 naming the first bad field, e.g. `messages.0.role`."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
    # loc: ("body", "stop", "list[constrained-str]", 0); union-member tags (with "[" or "-") are not fields
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")
           and (isinstance(p, int) or not set("[-") & set(str(p)))]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message, param = "the body is not valid JSON", None
    elif first.get("type") == "extra_forbidden":
        message = f"unknown parameter {param!r}"
    elif first.get("type") == "missing":
        message = f"missing required parameter {param!r}" if param else "the request has no body; send a JSON object"
    elif param:
        message = f"{param}: {message}"
    return APIError(400, message, param, first.get("type"))


# --- responses ------------------------------------------------------------------------------------------------------
def usage(rows: list, n: int) -> dict:
    prompt = sum(r.prompt_tokens for r in rows[::n])  # a prompt counts once, whatever n
    completion = sum(len(r.ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice(chat: bool, index: int, text: str, finish: str | None, stream: bool = False, first: bool = False) -> dict:
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if not stream:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


class Reply:
    """The envelope of one response: id, object names, model, created; builds bodies and stream chunks."""

    def __init__(self, model: str, chat: bool, personalization: dict):
        self.chat, self.model, self.personalization = chat, model, personalization
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def body(self, rows: list, n: int) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [choice(self.chat, i, r.text, r.finish_reason) for i, r in enumerate(rows)],
                "usage": usage(rows, n), "personalization": self.personalization}

    def chunk(self, choices: list[dict], **extra: Any) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
