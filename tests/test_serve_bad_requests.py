"""The server against bad input: each kind of bad request gets its status code, an OpenAI-style error body and
never a stack trace, and the server keeps answering. In-process on loopback, on the tiny model."""

import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from decoder2vec import Encoder
from decoder2vec.serve import ServeConfig, create_app, serve_in_thread

KEY = "test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}
LIMITS = dict(max_inputs=8, max_chars=200, max_body_bytes=1_000_000, read_timeout=1.0, max_header_bytes=8192)


@pytest.fixture(scope="module")
def server(_tiny_llama_session):
    encoder = Encoder.from_pretrained(_tiny_llama_session, device="cpu")
    config = ServeConfig(api_key=KEY, model_name="tiny", max_wait_ms=2, **LIMITS)
    with serve_in_thread(create_app(encoder, config)) as url:
        yield url


def raw(text: str) -> bytes:
    return text.encode()


# (name, body: a JSON value to send or raw bytes, expected status, expected error param)
BODIES = [
    ("unterminated JSON", raw('{"input": ["unterminated'), 400, None),
    ("not JSON at all", raw("not json at all"), 400, None),
    ("empty body", b"", 400, None),
    ("JSON null", raw("null"), 422, None),
    ("JSON array instead of an object", raw('["a", "b"]'), 422, None),
    ("JSON string instead of an object", raw('"hello"'), 422, None),
    ("JSON number instead of an object", raw("42"), 422, None),
    ("input is a number", {"input": 5}, 422, "input"),
    ("input is a list of numbers", {"input": [1, 2]}, 422, "input"),
    ("input is null", {"input": None}, 422, "input"),
    ("input is a nested list", {"input": [["a"]]}, 422, "input"),
    ("input is an object", {"input": {"text": "a"}}, 422, "input"),
    ("input missing", {"model": "tiny"}, 422, "input"),
    ("unknown field", {"input": "hi", "temperature": 0.5}, 422, "temperature"),
    ("misspelt field", {"input": "hi", "dimension": 8}, 422, "dimension"),
    ("empty list", {"input": []}, 400, "input"),
    ("empty string", {"input": ""}, 400, "input"),
    ("empty string in a list", {"input": ["hi", ""]}, 400, "input"),
    ("too many inputs", {"input": ["hi"] * 9}, 413, "input"),
    ("input over max_chars", {"input": ["hi", "y" * 201]}, 400, "input"),
    ("combining marks over max_chars", {"input": "e" + "\u0301" * 200}, 400, "input"),
    ("instruction over max_chars", {"input": "hi", "instruction": "i" * 201}, 400, "instruction"),
    ("instruction is a list", {"input": "hi", "instruction": ["a"]}, 422, "instruction"),
    ("dimensions is a string", {"input": "hi", "dimensions": "eight"}, 422, "dimensions"),
    ("dimensions is zero", {"input": "hi", "dimensions": 0}, 422, "dimensions"),
    ("dimensions is negative", {"input": "hi", "dimensions": -5}, 422, "dimensions"),
    ("dimensions is fractional", {"input": "hi", "dimensions": 8.5}, 422, "dimensions"),
    ("dimensions over the model's", {"input": "hi", "dimensions": 33}, 400, "dimensions"),
    ("dimensions huge", {"input": "hi", "dimensions": 10**30}, 400, "dimensions"),
    ("dimensions infinite", raw('{"input": "hi", "dimensions": 1e999}'), 422, "dimensions"),
    ("dimensions NaN", raw('{"input": "hi", "dimensions": NaN}'), 422, "dimensions"),
    ("encoding_format unknown", {"input": "hi", "encoding_format": "hex"}, 422, "encoding_format"),
    ("precision unknown", {"input": "hi", "precision": "int4"}, 422, "precision"),
    ("normalize is not a boolean", {"input": "hi", "normalize": "maybe"}, 422, "normalize"),
    ("model is a number", {"input": "hi", "model": 5}, 422, "model"),
    ("duplicate keys, the last one wrong", raw('{"input": "hi", "input": 5}'), 422, "input"),
    ("raw NUL byte inside a string", b'{"input": "a\x00b"}', 400, None),
    ("invalid UTF-8", b'{"input": "\xff\xfe"}', 400, None),
    ("lone surrogate", raw('{"input": "a\\ud800b"}'), 400, "input"),
    ("lone low surrogate in a list", raw('{"input": ["ok", "\\udc00"]}'), 400, "input"),
    ("lone surrogate in the instruction", raw('{"input": "hi", "instruction": "\\ud83d"}'), 400, "instruction"),
    ("nested 100,000 deep", raw('{"input": ' + "[" * 100_000 + "]" * 100_000 + "}"), 400, None),
    ("body over max_body_bytes (10 MB)", raw('{"input": "' + "a" * 10_000_000 + '"}'), 413, None),
    # accepted: odd but valid text is embedded like any other
    ("escaped NUL character", {"input": "a\u0000b"}, 200, None),
    ("right-to-left text with bidi overrides", {"input": "\u202eשלום עולם\u202c مرحبا"}, 200, None),
    ("combining marks", {"input": "e" + "\u0301" * 150}, 200, None),
    ("emoji ZWJ sequences and astral letters", {"input": "👩\u200d👩\u200d👧 🏳️\u200d🌈 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"}, 200, None),
    ("whitespace only", {"input": " \n\t "}, 200, None),
    ("UTF-8 byte order mark before the JSON", b'\xef\xbb\xbf{"input": "hi"}', 200, None),
    ("a long but allowed user field", {"input": "hi", "user": "u" * 100_000}, 200, None),
]


def _check_error_body(response, param):
    assert "Traceback" not in response.text and 'File "' not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


@pytest.mark.parametrize("body, status, param", [case[1:] for case in BODIES], ids=[case[0] for case in BODIES])
def test_bad_body(server, body, status, param):
    if isinstance(body, bytes):
        response = httpx.post(server + "/v1/embeddings", content=body, headers={**AUTH, **JSON}, timeout=60)
    else:
        response = httpx.post(server + "/v1/embeddings", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text[:500]
    if status == 200:
        vectors = np.array([d["embedding"] for d in response.json()["data"]])
        assert vectors.shape == (1, 32) and np.isfinite(vectors).all()
    else:
        _check_error_body(response, param)


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"authorization": "Bearer wrong-key"}, 401),
        ({"authorization": f"Bearer {KEY}x"}, 401),  # a longer key with the right prefix
        ({"authorization": f"bearer {KEY}"}, 401),  # the scheme is case-sensitive here
        ({"authorization": "Basic dGVzdDprZXk="}, 401),
        ({"authorization": KEY}, 401),  # the key without "Bearer"
    ],
    ids=["no key", "wrong key", "longer key", "lowercase scheme", "basic auth", "no scheme"],
)
def test_bad_api_key(server, headers, status):
    response = httpx.post(server + "/v1/embeddings", json={"input": "hi"}, headers=headers, timeout=30)
    assert response.status_code == status
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_wrong_method_and_path(server):
    response = httpx.get(server + "/v1/embeddings", headers=AUTH, timeout=30)
    assert response.status_code == 405
    _check_error_body(response, None)
    response = httpx.post(server + "/v1/embeddingz", json={"input": "hi"}, headers=AUTH, timeout=30)
    assert response.status_code == 404
    _check_error_body(response, None)


def test_wrong_content_type(server):
    body = json.dumps({"input": "hi"})
    response = httpx.post(
        server + "/v1/embeddings", content=body, headers={**AUTH, "content-type": "text/plain"}, timeout=30
    )
    assert response.status_code == 422
    _check_error_body(response, None)


def test_chunked_body_over_the_limit(server):
    def chunks():  # no Content-Length: the server counts what arrives
        yield b'{"input": "'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"}'

    response = httpx.post(server + "/v1/embeddings", content=chunks(), headers={**AUTH, **JSON}, timeout=60)
    assert response.status_code == 413
    _check_error_body(response, None)


# ---------------------------------------------------------------------- raw sockets: slow and oversized headers
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(connection: socket.socket) -> bytes:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def _read_response(connection: socket.socket) -> bytes:
    """One whole response on a kept-alive connection: its headers, then content-length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def test_slow_loris_headers_get_408_and_the_connection_closes(server):
    started = time.monotonic()
    with _connect(server) as connection:
        for line in (b"POST /v1/embeddings HTTP/1.1\r\n", b"Host: x\r\n", f"Authorization: Bearer {KEY}\r\n".encode()):
            connection.sendall(line)
            time.sleep(0.4)  # 1.2 s for three header lines: over read_timeout (1 s)
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "read_timeout"
    assert time.monotonic() - started < 5


def test_a_connection_that_sends_nothing_is_closed(server):
    with _connect(server) as connection:
        answer = _read_all(connection)  # returns once the server closes the connection
    assert answer.startswith(b"HTTP/1.1 408")


def test_slow_body_gets_408(server):
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with _connect(server) as connection:
        connection.sendall(head.encode() + b'{"input": ')  # then nothing more
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_content_length_over_the_limit_with_a_short_body_gets_413(server):
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    with _connect(server) as connection:
        connection.sendall(head.encode() + b'{"input": "hi"}')
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_endless_headers_get_431(server):
    with _connect(server) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(100):  # 100 KB of headers, over max_header_bytes (8 KB)
                connection.sendall(f"X-Filler-{i}: {'f' * 1000}\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_garbage_request_line_gets_400(server):
    with _connect(server) as connection:
        connection.sendall(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")  # e.g. a TLS client hello
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 400")


def test_keep_alive_connection_with_slow_second_request(server):
    """A well-behaved first request, then a second one whose headers never finish: 408 for the second."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(server) as connection:
        connection.sendall(request)
        assert _read_response(connection).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle between requests is fine (keep-alive is 60 s) ...
        connection.sendall(b"GET /health HTTP/1.1\r\n")  # ... but a started request must finish within 1 s
        answer = _read_all(connection)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_many_bad_requests_at_once_then_the_server_still_answers(server):
    bad = [b"not json", b'{"input": 5}', b'{"input": ""}', raw('{"input": "\\ud800"}'), b"[" * 50_000]
    statuses = []

    def send(body):
        response = httpx.post(server + "/v1/embeddings", content=body, headers={**AUTH, **JSON}, timeout=60)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=send, args=(body,)) for body in bad * 6]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) == 30 and all(400 <= s < 500 for s in statuses), statuses
    response = httpx.post(server + "/v1/embeddings", json={"input": ["still", "here"]}, headers=AUTH, timeout=30)
    assert response.status_code == 200 and len(response.json()["data"]) == 2
    health = httpx.get(server + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["queued"] == 0
