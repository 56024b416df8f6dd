"""The decode API against hostile clients, over real sockets to a real `python -m decoding.serve` on loopback: slow
sockets (silent, headers one byte at a time, a body shorter than its Content-Length, a head and then a body each
just inside the read timeout) closed within the read timeout while normal clients are served, a client that never
reads its stream, body framing edge cases, ~50 malformed requests, the connection limit (on requests and on
accepted sockets), and a short load. Every refusal must be an OpenAI error object, no response a 5xx, no body a
stack trace.

The server runs with read_timeout_s=2, write_timeout_s=2 and max_connections=24; every socket here has a
client-side timeout, so the module stops by itself (about 50 s).
"""

import json
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_serve import ERROR_KEYS, MODEL, Process, write_artifacts

READ_TIMEOUT_S = 2.0
WRITE_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 24
COMPLETION = json.dumps({"model": MODEL, "prompt": "i live in", "max_tokens": 2, "temperature": 0}).encode()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    p = Process(write_artifacts(root / "models"), root, read_timeout_s=READ_TIMEOUT_S,
                write_timeout_s=WRITE_TIMEOUT_S, max_connections=MAX_CONNECTIONS).start()
    p.port = int(p.url.rsplit(":", 1)[1])
    yield p
    if p.proc.poll() is None:
        p.kill()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_until_closed(sock: socket.socket, limit_s: float = 15.0, answered: bool = False) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or, `answered`, until one whole response has arrived), or
    limit_s passes, and how long that took."""
    start, out = time.monotonic(), b""
    while time.monotonic() - start < limit_s:
        if answered and whole_response(out):
            break
        ready, _, _ = select.select([sock], [], [], 0.1)
        if ready:
            try:
                data = sock.recv(65536)
            except ConnectionError:
                break
            if not data:
                break
            out += data
    return out, time.monotonic() - start


def whole_response(data: bytes) -> bool:
    """A head and as many body bytes as its Content-Length says."""
    head, sep, body = data.partition(b"\r\n\r\n")
    length = [int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
              if k.strip().lower() == b"content-length"]
    return bool(sep and length and len(body) >= length[0])


def exchange(port: int, raw: bytes, limit_s: float = 15.0) -> tuple[int, dict | str, bytes]:
    """One raw request on its own connection (closed by the server or after the response): status, body, bytes."""
    with connect(port) as s:
        s.sendall(raw)
        data, _ = read_until_closed(s, limit_s, answered=True)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
    try:
        return status, json.loads(body), data
    except ValueError:
        return status, body.decode("latin-1"), data


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_error(status: int, body, expected: int) -> None:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body["error"]) == ERROR_KEYS, body


# --- slow sockets -------------------------------------------------------------------------------------------------
def silent(port: int) -> tuple[bytes, float]:
    with connect(port) as s:
        return read_until_closed(s)


def header_drip(port: int) -> tuple[bytes, float]:
    """Headers one byte every 0.1 s, never ending (a slowloris)."""
    head = post("/v1/completions", b"", "x-pad: " + "a" * 400)
    start = time.monotonic()
    with connect(port) as s:
        for byte in head[:-4]:
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            ready, _, _ = select.select([s], [], [], 0.1)
            if ready or time.monotonic() - start > 15:
                break
        data, _ = read_until_closed(s, 15 - (time.monotonic() - start))
    return data, time.monotonic() - start


def short_body(port: int) -> tuple[bytes, float]:
    """A body of 10 bytes under a Content-Length of 100."""
    with connect(port) as s:
        s.sendall(post("/v1/completions", COMPLETION[:10], "content-length: 100"))
        return read_until_closed(s)


def test_slow_sockets_are_closed_within_the_read_timeout_while_normal_clients_are_served(hostile):
    with ThreadPoolExecutor(3) as pool:
        slow = {f.__name__: pool.submit(f, hostile.port) for f in (silent, header_drip, short_body)}
        served = 0
        with httpx.Client(base_url=hostile.url, timeout=10) as client:
            while not all(f.done() for f in slow.values()):
                r = client.post("/v1/completions", content=COMPLETION, headers={"content-type": "application/json"})
                assert r.status_code == 200, r.text
                served += 1
    assert served >= 3  # the normal client was answered, again and again, while the slow ones were held
    for name, f in slow.items():
        data, seconds = f.result()
        assert seconds < 2 * READ_TIMEOUT_S + 3, (name, seconds)  # closed by the server, not by our 15 s
        if name != "silent":  # a client that has said nothing gets a close; one mid-request gets a 408
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), (name, data[:200])
            assert set(json.loads(body)["error"]) == ERROR_KEYS
    assert httpx.get(f"{hostile.url}/health", timeout=5).status_code == 200


def drip(sock: socket.socket, data: bytes, seconds: float, pieces: int = 20) -> bool:
    """Send `data` in `pieces` spread over `seconds`; False as soon as the server has answered or closed."""
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        if select.select([sock], [], [], seconds / pieces)[0]:
            return False
        sock.sendall(data[i:i + step])
    return True


def test_head_and_body_share_one_read_deadline(hostile):
    """A head and then a body, each arriving within the read timeout but not both: 408 at the one deadline."""
    start = time.monotonic()
    with connect(hostile.port) as s:
        head = post("/v1/completions", b"", f"content-length: {len(COMPLETION)}")
        if drip(s, head, 0.6 * READ_TIMEOUT_S):
            drip(s, COMPLETION, 0.6 * READ_TIMEOUT_S)
        data, _ = read_until_closed(s, 10, answered=True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert set(json.loads(body)["error"]) == ERROR_KEYS
    assert time.monotonic() - start < READ_TIMEOUT_S + 1.0  # not a deadline for the head and another for the body


def test_a_client_that_never_reads_its_stream_is_disconnected(hostile):
    """Two pipelined streams of 32 choices x 480 tokens (~6 MB of events, past the 4 MB a socket's send buffer may
    grow to) to a socket that reads nothing: the server's writes stall, and past write_timeout_s it drops the
    connection (and its rows) instead of holding it until the client reads (then both streams would end)."""
    def stream(*headers: str) -> bytes:
        body = json.dumps({"model": MODEL, "prompt": "i live in", "max_tokens": 480, "n": 32, "temperature": 0,
                           "stream": True}).encode()
        return post("/v1/completions", body, f"content-length: {len(body)}", *headers)

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", hostile.port))
    with s:
        s.sendall(stream() + stream("connection: close"))
        idle_since, end = None, time.monotonic() + 90
        while time.monotonic() < end:  # until the engine has been idle for write_timeout_s and then some
            engine = hostile.health()
            busy = engine["running_rows"] or engine["queued"]
            idle_since = None if busy else idle_since or time.monotonic()
            if idle_since and time.monotonic() - idle_since > WRITE_TIMEOUT_S + 2:
                break
            time.sleep(0.2)
        data, _ = read_until_closed(s, 60)
    ended = data.count(b"data: [DONE]")  # 2 (6 MB read) when the server waits for the reader instead
    assert data.startswith(b"HTTP/1.1 200") and ended < 2, (len(data), ended)
    assert httpx.get(f"{hostile.url}/health", timeout=5).status_code == 200


# --- body framing -------------------------------------------------------------------------------------------------
def chunked(body: bytes, size: int = 4096) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_body_framing_edge_cases_get_openai_errors(hostile):
    big = json.dumps({"model": MODEL, "prompt": "i " * 60_000}).encode()  # 120 kB > max_body_bytes 100 kB
    status, body, _ = exchange(hostile.port, post("/v1/completions", chunked(big), "transfer-encoding: chunked"))
    assert_error(status, body, 413)
    status, body, _ = exchange(hostile.port, post("/v1/completions", COMPLETION, "content-length: abc"))
    assert_error(status, body, 400)
    assert "content-length" in body["error"]["message"].lower()
    for payload in (chunked(COMPLETION), COMPLETION):
        status, body, _ = exchange(hostile.port, post("/v1/completions", payload, f"content-length: {len(COMPLETION)}",
                                                      "transfer-encoding: chunked"))
        assert_error(status, body, 400)
        assert "Transfer-Encoding" in body["error"]["message"] and "None" not in body["error"]["message"]
    status, body, _ = exchange(hostile.port, post("/v1/completions", b"", "content-length: 0"))
    assert_error(status, body, 400)
    assert "None" not in body["error"]["message"]
    assert httpx.get(f"{hostile.url}/health", timeout=5).status_code == 200


# --- malformed requests -------------------------------------------------------------------------------------------
def body_of(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "i live in", "max_tokens": 2, **fields}).encode()


BAD_BODIES = [
    b"{", b"[]", b"null", b"42", b'"text"', b"{\"model\": }", b"\xff\xfe\x00", b"{" * 5000, b"[" * 50_000,
    body_of(prompt=3), body_of(prompt=None), body_of(prompt=[]), body_of(prompt=[1, 2]), body_of(model=7),
    body_of(max_tokens="5"), body_of(max_tokens=-1), body_of(max_tokens=10**30), body_of(temperature="hot"),
    body_of(temperature=1e308), body_of(top_p=0), body_of(n=True), body_of(n=10**6), body_of(stop=[""]),
    body_of(stop=["a"] * 10), body_of(seed=2**70), body_of(stream="yes"), body_of(personalization=[]),
    body_of(personalization={"method": "magic"}), body_of(personalization={"user_id": "../etc"}),
    body_of(personalization={"method": "drift", "attribute_weights": {"cats": "x"}}),
    body_of(prompt="\ud800"), body_of(prompt="i " * 90_000), body_of(extra_field=1), body_of(model="x" * 5000),
    json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}).encode(),
    json.dumps({"model": MODEL, "messages": "hi"}).encode(),
]
BAD_RAW = [
    b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\nhost: x\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n",  # no host
    b"GET /health HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000,  # past h11's 16 KiB head: 431
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
]
BAD_ROUTES = [("GET", "/"), ("GET", "/v2/models"), ("DELETE", "/health"), ("PUT", "/v1/completions"),
              ("GET", "/v1/users/" + "x" * 300), ("GET", "/v1/users/%00"), ("GET", "/../../etc/passwd"),
              ("POST", "/v1/users/u1"), ("GET", "/v1/models/" + "m" * 300)]


def test_malformed_requests_get_4xx_error_objects_and_the_server_keeps_answering(hostile):
    cases = [post("/v1/completions", b, f"content-length: {len(b)}") for b in BAD_BODIES] + BAD_RAW + \
        [f"{m} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".encode() for m, path in BAD_ROUTES]
    assert len(cases) >= 50
    for raw in cases:
        status, body, data = exchange(hostile.port, raw)
        assert 400 <= status < 500, (raw[:80], status, data[:300])
        assert b"Traceback" not in data and b'File "' not in data, data[:300]
        assert isinstance(body, dict) and set(body["error"]) == ERROR_KEYS, (raw[:80], data[:300])
        assert httpx.get(f"{hostile.url}/health", timeout=5).status_code == 200
    log = (hostile.runs / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]


# --- limits and load ----------------------------------------------------------------------------------------------
def test_connections_past_the_limit_get_503_error_objects_until_the_idle_ones_are_closed(hostile):
    idle = [connect(hostile.port) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        status, body, _ = exchange(hostile.port, post("/v1/completions", COMPLETION,
                                                      f"content-length: {len(COMPLETION)}"))
        assert_error(status, body, 503)
        closed = [read_until_closed(s)[1] for s in idle]  # the read timeout frees the slots
        assert max(closed) < 2 * READ_TIMEOUT_S + 3
    finally:
        for s in idle:
            s.close()
    assert httpx.post(f"{hostile.url}/v1/completions", content=COMPLETION, timeout=10,
                      headers={"content-type": "application/json"}).status_code == 200


def test_a_socket_past_the_connection_limit_is_refused_as_it_is_accepted(hostile):
    """The limit counts sockets, not only requests: one more idle socket gets a 503 at once, not a silent slot."""
    idle = [connect(hostile.port) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with connect(hostile.port) as extra:
            data, seconds = read_until_closed(extra, 10)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), data[:200]
        assert set(json.loads(body)["error"]) == ERROR_KEYS and seconds < READ_TIMEOUT_S / 2
    finally:
        for s in idle:
            s.close()


def test_a_short_load_loses_nothing(hostile):
    def client(i: int) -> list[int]:
        with httpx.Client(base_url=hostile.url, timeout=30) as c:
            return [c.post("/v1/completions", json={"model": MODEL, "prompt": "i live in", "max_tokens": 4,
                                                    "temperature": 0, "seed": i}).json()["usage"]["completion_tokens"]
                    for _ in range(3)]

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(client, range(16)))
    assert tokens == [[4, 4, 4]] * 16
    assert hostile.health()["failures"] == 0
