"""The decode API's defences below the routes (decoding/serve.py): what a hostile or broken client can hold or send.

    Gate(app, api_key, max_body_bytes, read_timeout_s)     ASGI: the API key, the body's framing, size and deadline
    guarded_h11(read_timeout_s, write_timeout_s)           uvicorn `http=`: uvicorn's h11 protocol with deadlines on
                                                           the request and on a stalled reader, JSON errors, the
                                                           connection limit

uvicorn's h11 protocol times out only idle keep-alive connections: a client that connects and stays silent, or
sends its head one byte at a time, is held forever. One timer per connection, armed until the head has arrived,
is the least that closes those (a watchdog over all connections would poll). A request has ONE read deadline,
read_timeout_s from its first byte (or the connection's start) to its body's last: the protocol hands it to Gate
in the scope (`extensions["read_deadline"]`), whose `receive()` timeout answers through the app like any refusal.
A client that stops reading its response pauses the transport's writes; one that stays paused write_timeout_s is
aborted, which frees its connection and cancels its rows. Past `max_connections` open sockets, a new one is
answered 503 and closed as it is accepted. Every refusal is an OpenAI error object (decoding/api.py), including
h11's malformed-request 400 and the connection limit's 503, which uvicorn writes as plain text.
"""

import asyncio
import functools
import json
import secrets
import sys
import time
from http import HTTPStatus

from decoding.api import APIError


# --- the ASGI side: key, framing, body ----------------------------------------------------------------------------
class Gate:
    """ASGI middleware in front of every route: the API key (when configured), then the whole body read here,
    within `read_timeout_s` and `max_body_bytes` (chunked bodies too), and replayed to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, read_timeout_s: float = 10.0):
        self.app, self.api_key, self.max_body, self.read_timeout_s = app, api_key, max_body_bytes, read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.check_headers(dict(scope.get("headers") or []))
        if refusal is None:
            body = await self.read_body(receive, (scope.get("extensions") or {}).get("read_deadline"))
            if body is None:  # the client left before its body ended: nobody to answer
                return None
            if isinstance(body, APIError):
                refusal = body
        if refusal is not None:
            # the connection closes after a refusal: an unread body must not be parsed as the next request
            return await refusal.response(close=refusal.status != 401)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes

        return await self.app(scope, replay, send)

    def check_headers(self, headers: dict) -> APIError | None:
        if self.api_key is not None:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                why = "missing API key" if not given else "incorrect API key"
                return APIError(401, f"{why}: send `Authorization: Bearer <key>`", None, "invalid_api_key")
        if b"content-length" in headers and b"transfer-encoding" in headers:  # RFC 9112 §6.3: a smuggling vector
            return APIError(400, "the request has both Content-Length and Transfer-Encoding; send one",
                            None, "ambiguous_body_length")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():  # h11 refuses these first; another ASGI server may not
            return APIError(400, "bad Content-Length header", None, "bad_content_length")
        if int(length) > self.max_body:
            return APIError(413, f"the body exceeds {self.max_body} bytes", None, "body_too_large")
        return None

    async def read_body(self, receive, deadline: float | None = None) -> bytes | APIError | None:
        """The whole body by `deadline` (monotonic; the request's, else read_timeout_s from now), an APIError (413
        too large, 408 too slow), or None when the client disconnected."""
        deadline = time.monotonic() + self.read_timeout_s if deadline is None else deadline
        parts, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return APIError(408, f"the request did not arrive within {self.read_timeout_s} s", None,
                                "read_timeout")
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body:  # a chunked body, which has no Content-Length to refuse it by
                return APIError(413, f"the body exceeds {self.max_body} bytes", None, "body_too_large")
            if not message.get("more_body", False):
                return b"".join(parts)


# --- the protocol side: head deadline, h11's errors, connection limit ---------------------------------------------
def error_bytes(err: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying an error object, for the protocol to write where no app runs."""
    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def guarded_h11(read_timeout_s: float, write_timeout_s: float = 30.0):
    """What uvicorn's `Config(http=...)` calls once per connection (with config, server_state, app_state)."""
    return functools.partial(GuardedH11, read_timeout_s=read_timeout_s, write_timeout_s=write_timeout_s)


class GuardedH11(asyncio.Protocol):
    """uvicorn's H11Protocol, composed: a timer from the connection's start (or a kept-alive connection's first
    new byte) to the request head's end; at expiry a 408 error object when part of a head came, else a close; the
    same start's deadline for the body (Gate); a timer while writes are paused (a client not reading), at whose
    expiry the connection is aborted. The connection limit (uvicorn's `limit_concurrency`) is checked here, on
    every accepted socket and every request, so that its 503 is an error object."""

    def __init__(self, config, server_state, app_state, _loop=None, *, read_timeout_s: float,
                 write_timeout_s: float = 30.0):
        from uvicorn.protocols.http.h11_impl import H11Protocol

        self.inner = H11Protocol(config, server_state, app_state, _loop)
        self.inner.send_400_response = self.malformed  # uvicorn's answer to h11's RemoteProtocolError
        self.limit, self.inner.limit_concurrency = config.limit_concurrency, None
        self.inner.app = functools.partial(self.admit, self.inner.app)
        self.state, self.read_timeout_s, self.write_timeout_s = server_state, read_timeout_s, write_timeout_s
        self.transport, self.timer, self.stalled, self.started = None, None, None, time.monotonic()
        self.refused = False  # past the connection limit: answered 503, its bytes discarded until it closes

    # asyncio.Protocol, forwarded
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)
        if self.limit is not None and len(self.state.connections) > self.limit:  # this one counted
            # write, then half-close: closing outright with the client's request unread would send a reset,
            # which can destroy the 503 before the client reads it; a client that never closes is cut off
            self.refused = True
            transport.write(error_bytes(self.busy()))
            transport.write_eof()
            self.timer = asyncio.get_running_loop().call_later(1.0, transport.abort)
            return
        self.started = time.monotonic()
        self.timer = asyncio.get_running_loop().call_later(self.read_timeout_s, self.expire)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.timer is None and self.awaiting_head():  # the first byte of a kept-alive connection's next request
            self.started = time.monotonic()
            self.timer = asyncio.get_running_loop().call_later(self.read_timeout_s, self.expire)
        self.inner.data_received(data)
        if not self.awaiting_head():
            self.disarm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        if self.stalled is not None:
            self.stalled.cancel()
        self.inner.connection_lost(exc)

    def eof_received(self) -> None:
        if self.refused:
            self.transport.close()
            return
        self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()
        if self.stalled is None:
            self.stalled = asyncio.get_running_loop().call_later(self.write_timeout_s, self.transport.abort)

    def resume_writing(self) -> None:
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None
        self.inner.resume_writing()

    # the deadline
    def awaiting_head(self) -> bool:
        """No request in progress: before the first head, or between a response and the next head."""
        cycle = self.inner.cycle
        return cycle is None or cycle.response_complete

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self) -> None:
        self.timer = None
        if self.transport.is_closing() or not self.awaiting_head():
            return
        if self.inner.conn.trailing_data[0]:  # part of a head: tell the client why it is dropped
            self.transport.write(error_bytes(APIError(
                408, f"the request head did not arrive within {self.read_timeout_s} s", None, "read_timeout")))
        self.transport.close()

    # the errors uvicorn writes itself
    def malformed(self, _message: str) -> None:
        """h11 refused the bytes (bad request line, header or Content-Length, oversized head, bad chunk)."""
        exc = sys.exception()  # called inside uvicorn's `except h11.RemoteProtocolError`
        # h11's hints: 431 an oversized head, else 400 (its 501 for an unknown Transfer-Encoding too: the bytes are
        # the client's fault, and a 5xx here would read as the server failing)
        status = 431 if getattr(exc, "error_status_hint", 400) == 431 else 400
        cycle = self.inner.cycle
        if cycle is None or not cycle.response_started:
            why = str(exc)[:200] if exc is not None else "malformed request"
            self.transport.write(error_bytes(APIError(status, f"malformed HTTP request: {why}", None,
                                                      "malformed_request")))
        self.transport.close()

    async def admit(self, app, scope, receive, send):
        """The app, unless more than `limit` connections are open or requests running (this one counted)."""
        if self.limit is not None and scope["type"] == "http" and (
                len(self.state.connections) > self.limit or len(self.state.tasks) > self.limit):
            return await self.busy().response(close=True)(scope, receive, send)
        scope.setdefault("extensions", {})["read_deadline"] = self.started + self.read_timeout_s
        return await app(scope, receive, send)

    def busy(self) -> APIError:
        return APIError(503, f"the server is at its limit of {self.limit} connections; retry later", None,
                        "server_busy")
