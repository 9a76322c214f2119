"""The embeddings server, in-process on loopback: the official openai client, raw HTTP errors, dynamic batching."""

import base64
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import decoder2vec.serve as serve_module
from decoder2vec import Encoder
from decoder2vec.cli import main
from decoder2vec.serve import (
    DynamicBatcher,
    QueueFullError,
    ServeConfig,
    can_pack,
    create_app,
    display_name,
    encode_packed,
    serve_in_thread,
)

TEXTS = ["A man is playing a guitar.", "The cat sits on the mat.", "Paris is the capital of France.", "x"]
KEY = "test-key"


@pytest.fixture(scope="module")
def encoder(_tiny_llama_session):
    return Encoder.from_pretrained(_tiny_llama_session, device="cpu")


@pytest.fixture(scope="module")
def server(encoder):
    config = ServeConfig(api_key=KEY, model_name="tiny", max_inputs=8, max_chars=200, max_wait_ms=2)
    with serve_in_thread(create_app(encoder, config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _post(url, body=None, *, content=None, key=KEY, path="/v1/embeddings"):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["content-type"] = "application/json"
        return httpx.post(url + path, content=content, headers=headers, timeout=30)
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def test_openai_client_gets_our_vectors_in_both_encodings(client, encoder):
    expected = encoder.encode(TEXTS, normalize=True)
    for encoding_format in ("float", "base64"):
        response = client.embeddings.create(model="tiny", input=TEXTS, encoding_format=encoding_format)
        assert [d.index for d in response.data] == list(range(len(TEXTS)))
        if encoding_format == "base64":  # asked for explicitly, the client hands the string over as it is
            got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
        else:
            got = np.array([d.embedding for d in response.data], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert response.model == "tiny"
    tokens = sum(len(f.input_ids) for f in encoder.tokenize(TEXTS))
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens
    default = client.embeddings.create(model="tiny", input=TEXTS[0])  # the client asks for base64 by default
    np.testing.assert_allclose(default.data[0].embedding, expected[0], atol=1e-5)


def test_dimensions_instruction_and_precision(client, encoder):
    response = client.embeddings.create(model="tiny", input=TEXTS, dimensions=8)
    got = np.array([d.embedding for d in response.data])
    np.testing.assert_allclose(got, encoder.encode(TEXTS, normalize=True, dimensions=8), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    response = client.embeddings.create(
        model="tiny", input=TEXTS, encoding_format="float", extra_body={"instruction": "Find the answer"}
    )
    expected = encoder.encode(TEXTS, instruction="Find the answer", normalize=True)
    np.testing.assert_allclose([d.embedding for d in response.data], expected, atol=1e-5)

    response = client.embeddings.create(
        model="tiny", input=TEXTS, encoding_format="float", extra_body={"precision": "int8"}
    )
    as_int8 = np.array([d.embedding for d in response.data])
    assert np.abs(as_int8 - encoder.encode(TEXTS, precision="int8")).max() <= 1  # rounding at a .5 boundary


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["dim"] == 32 and health["model"] == "tiny"


def test_api_key_is_required_on_v1(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="tiny", input="hi")
    for key in (None, "wrong"):
        response = _post(server, {"input": "hi"}, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401


@pytest.mark.parametrize(
    "body, content, status, param",
    [
        (None, b'{"input": ["unterminated', 400, None),
        (None, b"not json at all", 400, None),
        ({"input": 5}, None, 422, "input"),
        ({"input": [1, 2]}, None, 422, "input"),
        ({"texts": ["hi"]}, None, 422, "input"),
        ({"input": "hi", "dimensions": "eight"}, None, 422, "dimensions"),
        ({"input": "hi", "dimensions": 0}, None, 422, "dimensions"),
        ({"input": "hi", "encoding_format": "hex"}, None, 422, "encoding_format"),
        ({"input": "hi", "precision": "int4"}, None, 422, "precision"),
        ({"input": []}, None, 400, "input"),
        ({"input": ["hi"] * 9}, None, 413, "input"),
        ({"input": ["hi", "y" * 201]}, None, 400, "input"),
        ({"input": "hi", "dimensions": 33}, None, 400, "dimensions"),
    ],
)
def test_bad_requests_get_openai_style_errors(server, body, content, status, param):
    response = _post(server, body, content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text


def test_unknown_route_and_method(server):
    assert httpx.get(server + "/v1/nothing", headers={"authorization": f"Bearer {KEY}"}).status_code == 404
    response = httpx.get(server + "/v1/embeddings", headers={"authorization": f"Bearer {KEY}"})
    assert response.status_code == 405 and "error" in response.json()


@pytest.mark.parametrize("pack_tokens", [512, 0])  # padding-free packs, and padded batches through encode
def test_concurrent_requests_are_batched_together(encoder, pack_tokens):
    config = ServeConfig(max_wait_ms=300, batch_size=64, pack_tokens=pack_tokens)
    app = create_app(encoder, config)
    texts = [f"sentence number {i} about a cat" for i in range(12)]
    results: dict[int, list[float]] = {}
    with serve_in_thread(app) as url:
        before = httpx.get(url + "/health").json()["batches"]

        def one(i):
            response = httpx.post(url + "/v1/embeddings", json={"input": texts[i]}, timeout=30)
            results[i] = response.json()["data"][0]["embedding"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        health = httpx.get(url + "/health").json()
        batches = health["batches"] - before
    assert health["busy_seconds"] > 0
    assert batches <= 3, f"{len(texts)} concurrent requests took {batches} encode calls"
    expected = encoder.encode(texts, normalize=True)
    np.testing.assert_allclose([results[i] for i in range(len(texts))], expected, atol=1e-5)


def test_batcher_stops_waiting_once_the_answered_clients_are_back(encoder):
    batcher = DynamicBatcher(encoder, batch_size=64, max_wait_ms=50, wait_fraction=0.0)
    try:
        first = [batcher.submit([("", f"first round {i}")]) for i in range(3)]
        for future in first:
            future.result(timeout=20)
        assert (batcher.batches, batcher.texts) == (1, 3)
        # Now a 60 s window: only the rule "as many texts as the last batch answered are back" lets the
        # second round finish within the 20 s allowed, and as one batch.
        batcher.max_wait = 60.0
        texts = [f"second round {i}" for i in range(3)]
        second = [batcher.submit([("", text)]) for text in texts]
        vectors = np.concatenate([future.result(timeout=20)[0].numpy() for future in second])
        assert (batcher.batches, batcher.texts) == (2, 6)
        np.testing.assert_allclose(vectors, encoder.encode(texts), atol=1e-5)
    finally:
        batcher.close()


# Run in a fresh interpreter: an OpenMP team formed earlier by a thread of this test process that has since
# exited still counts for libgomp, which would keep the sleep/wake cycle going whatever this test releases.
_OPENMP_PROBE = """
import sys, threading
from pathlib import Path
import torch
from decoder2vec.serve import release_openmp_threads

def switches():
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total

x = torch.ones(1 << 20)
torch.set_num_threads(int(sys.argv[1]))
torch.add(x, 1.0, out=x)  # 1M elements: the main thread's team of OpenMP threads now exists
if sys.argv[2] == "release" and not release_openmp_threads():
    print("unsupported")
    sys.exit()
counts = []

def work():  # like the batcher: another thread, with a team of its own
    torch.add(x, 1.0, out=x)
    start = switches()
    for _ in range(200):
        torch.add(x, 1.0, out=x)
    counts.append(switches() - start)

worker = threading.Thread(target=work)
worker.start()
worker.join()
print(counts[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP (torch's Linux wheels)")
def test_releasing_the_callers_openmp_team_stops_the_batcher_threads_sleep_wake_cycle():
    # libgomp stops spin-waiting between parallel regions once its threads outnumber the CPUs: with the
    # caller's team and the batcher's, every op then puts the batcher's team to sleep and wakes it again.
    cpus = os.cpu_count() or 1
    if cpus < 2:
        pytest.skip("needs at least two CPUs for a parallel team")

    def probe(mode: str) -> str:
        command = [sys.executable, "-c", _OPENMP_PROBE, str(cpus), mode]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout.strip()

    throttled = probe("keep")
    released = probe("release")
    if released == "unsupported":
        pytest.skip("no libgomp with omp_pause_resource_all in this process")
    assert int(throttled) > 100, f"expected the sleep/wake cycle with two teams, saw {throttled} switches"
    assert int(released) < int(throttled) / 5, (throttled, released)


def test_create_app_releases_the_callers_openmp_team(encoder, monkeypatch):
    calls = []
    monkeypatch.setattr(serve_module, "release_openmp_threads", lambda: calls.append(1) or True)
    create_app(encoder)
    assert calls == [1]


@pytest.mark.parametrize(
    "settings",
    [
        {"pooling": "mean"},
        {"pooling": "weighted_mean"},
        {"pooling": "last_token", "append_eos": True},
        {"pooling": "bos"},
        {"pooling": "mean", "bidirectional": False},
    ],
)
def test_padding_free_packs_give_the_padded_batch_vectors(_tiny_llama_session, settings):
    encoder = Encoder.from_pretrained(_tiny_llama_session, device="cpu", **settings)
    assert can_pack(encoder)
    texts = [*TEXTS, "", "A much longer text, with commas, numbers 1 2 3, and an emoji 🙂 at the end."] * 2
    pairs = [("Find the answer", t) if i % 3 == 0 else ("", t) for i, t in enumerate(texts)]
    packed = encode_packed(encoder, encoder.tokenize(pairs), max_tokens=40)  # several packs
    np.testing.assert_allclose(packed.numpy(), encoder.encode(pairs), atol=1e-5)


def test_encode_failure_answers_500_without_a_traceback(encoder, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    app = create_app(encoder)
    with serve_in_thread(app) as url:
        monkeypatch.setattr(encoder, "tokenize", broken)
        response = httpx.post(url + "/v1/embeddings", json={"input": "hi"}, timeout=30)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "Traceback" not in response.text


def test_only_loopback_unless_allowed():
    with pytest.raises(ValueError, match="loopback"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="::1").host == "::1"
    assert ServeConfig(host="0.0.0.0", allow_remote=True).allow_remote


def _idle_connection_survives(url: str, idle_seconds: float) -> bool:
    """Send a request on a raw keep-alive connection, idle, then see whether the server closed it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        assert b"200 OK" in connection.recv(65536)
        time.sleep(idle_seconds)
        connection.setblocking(False)
        try:
            return connection.recv(1) != b""  # b"": the server closed it
        except BlockingIOError:
            return True  # nothing to read: still open


def test_keep_alive_sets_how_long_idle_connections_stay_open(encoder):
    # uvicorn's own 5 s closes connections that a client's pool is about to reuse (the load bench saw all
    # 32 connections fail at once after a 5 s pause); the server keeps them for ServeConfig.keep_alive.
    with serve_in_thread(create_app(encoder), keep_alive=1) as url:
        assert not _idle_connection_survives(url, 2.0)
    with serve_in_thread(create_app(encoder), keep_alive=10) as url:
        assert _idle_connection_survives(url, 2.0)
    assert ServeConfig().keep_alive == 60
    with pytest.raises(ValueError, match="keep_alive"):
        ServeConfig(keep_alive=0)


def test_cli_serve(_tiny_llama_session, monkeypatch, capsys):
    answers = []

    def fake_run_server(app, host, port, keep_alive):  # serve on a free port instead, make one request, stop
        assert keep_alive == 60
        with serve_in_thread(app, host, keep_alive=keep_alive) as url:
            answers.append(
                httpx.post(url + "/v1/embeddings", json={"input": ["a", "b"]}, headers={"authorization": "Bearer k"})
            )

    monkeypatch.setattr(serve_module, "run_server", fake_run_server)
    assert main(["serve", "--model", str(_tiny_llama_session), "--api-key", "k", "--device", "cpu"]) == 0
    assert answers[0].status_code == 200 and len(answers[0].json()["data"]) == 2
    assert main(["serve", "--model", str(_tiny_llama_session), "--host", "10.1.2.3"]) == 1
    assert "loopback" in capsys.readouterr().err


# ---------------------------------------------------------------------- overload: queue, timeouts, fairness
class _Gate:
    """Stands in for encode_packed: blocks the batcher inside a batch until opened, and records every batch."""

    def __init__(self):
        self.entered, self.opened, self.batches = threading.Event(), threading.Event(), []

    def __call__(self, encoder, features, max_tokens=512):
        self.batches.append([encoder.tokenizer.decode(f.input_ids, skip_special_tokens=True) for f in features])
        self.entered.set()
        assert self.opened.wait(60), "the test never opened the gate"
        return encode_packed(encoder, features, max_tokens=max_tokens)


def _post_in_thread(url, body, answers, key):
    thread = threading.Thread(
        target=lambda: answers.__setitem__(key, httpx.post(url + "/v1/embeddings", json=body, timeout=60))
    )
    thread.start()
    return thread


def _wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_answers_429_with_retry_after(encoder, monkeypatch):
    gate = _Gate()
    monkeypatch.setattr(serve_module, "encode_packed", gate)
    config = ServeConfig(batch_size=1, max_queue=2, max_wait_ms=0)
    answers: dict = {}
    with serve_in_thread(create_app(encoder, config)) as url:
        threads = [_post_in_thread(url, {"input": "being encoded"}, answers, "a")]
        assert gate.entered.wait(30)  # request a is inside the model; the queue is empty
        threads += [_post_in_thread(url, {"input": f"queued {k}"}, answers, k) for k in ("b", "c")]
        _wait_for(lambda: httpx.get(url + "/health").json()["queued"] == 2)
        refused = httpx.post(url + "/v1/embeddings", json={"input": "one too many"}, timeout=30)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "queue_full"
        gate.opened.set()
        for thread in threads:
            thread.join()
        health = httpx.get(url + "/health").json()
    assert [answers[k].status_code for k in "abc"] == [200, 200, 200]
    assert health["rejected"] == 1 and health["queued"] == 0


def test_request_timeout_503_while_queued_504_while_encoded(encoder, monkeypatch):
    gate = _Gate()
    monkeypatch.setattr(serve_module, "encode_packed", gate)
    config = ServeConfig(batch_size=1, max_wait_ms=0, request_timeout=1.0)
    answers: dict = {}
    with serve_in_thread(create_app(encoder, config)) as url:
        threads = [_post_in_thread(url, {"input": "stuck in the model"}, answers, "encoding")]
        assert gate.entered.wait(30)
        threads.append(_post_in_thread(url, {"input": "stuck in the queue"}, answers, "queued"))
        for thread in threads:
            thread.join()
        gate.opened.set()
        after = httpx.post(url + "/v1/embeddings", json={"input": "after the jam"}, timeout=30)
        health = httpx.get(url + "/health").json()
    assert answers["encoding"].status_code == 504 and answers["encoding"].json()["error"]["code"] == "timeout"
    assert answers["queued"].status_code == 503 and answers["queued"].json()["error"]["code"] == "queue_timeout"
    assert int(answers["queued"].headers["retry-after"]) >= 1
    assert after.status_code == 200 and health["timeouts"] == 2 and health["queued"] == 0
    assert ["stuck in the queue"] not in gate.batches  # the text that timed out in the queue was never encoded


def test_a_large_request_does_not_hold_up_a_small_one(encoder, monkeypatch):
    """A large request is encoded batch_size texts at a time, and a small one that comes meanwhile goes next."""
    gate = _Gate()
    monkeypatch.setattr(serve_module, "encode_packed", gate)
    batcher = DynamicBatcher(encoder, batch_size=2, max_wait_ms=0)
    try:
        large = [f"large request text {i}" for i in range(7)]
        large_future = batcher.submit([("", text) for text in large])
        assert gate.entered.wait(30)  # its first two texts are in the model
        small_future = batcher.submit([("", "small request")])
        gate.opened.set()
        small_vectors, small_counts = small_future.result(timeout=60)
        large_vectors, large_counts = large_future.result(timeout=60)
    finally:
        batcher.close()
    assert gate.batches[:2] == [large[:2], ["small request", *large[2:3]]], gate.batches
    assert sum(len(b) for b in gate.batches) == 8 and max(len(b) for b in gate.batches) == 2
    np.testing.assert_allclose(large_vectors.numpy(), encoder.encode(large), atol=1e-5)  # chunks in order
    np.testing.assert_allclose(small_vectors.numpy(), encoder.encode(["small request"]), atol=1e-5)
    assert large_counts == [len(f.input_ids) for f in encoder.tokenize(large)] and len(small_counts) == 1


def test_batcher_queue_bound_admits_a_large_request_when_nothing_waits(encoder, monkeypatch):
    gate = _Gate()
    monkeypatch.setattr(serve_module, "encode_packed", gate)
    batcher = DynamicBatcher(encoder, batch_size=1, max_wait_ms=0, max_queue=3)
    try:
        first = batcher.submit([("", "first")])
        assert gate.entered.wait(30)
        large = batcher.submit([("", f"t{i}") for i in range(5)])  # over max_queue, but the queue is empty
        with pytest.raises(QueueFullError) as refused:
            batcher.submit([("", "more")])
        assert refused.value.queued == 5 and refused.value.retry_after >= 1
        gate.opened.set()
        first.result(timeout=60), large.result(timeout=60)
    finally:
        batcher.close()
    assert batcher.rejected == 1 and batcher.queued == 0


def test_tokenization_never_runs_on_the_batcher_thread(encoder, monkeypatch):
    threads = []
    tokenize = encoder.tokenize

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(encoder, "tokenize", recording)
    with serve_in_thread(create_app(encoder, ServeConfig(max_chars=100_000))) as url:
        small = httpx.post(url + "/v1/embeddings", json={"input": "a short text"}, timeout=60)
        large = httpx.post(url + "/v1/embeddings", json={"input": ["word " * 2000] * 2}, timeout=60)
    assert small.status_code == large.status_code == 200
    # short requests on the event loop (cheaper than a thread hop), long ones in a worker thread
    assert threads[0] == "decoder2vec-uvicorn" and threads[1] not in ("decoder2vec-uvicorn", "decoder2vec-batcher")


# ---------------------------------------------------------------------- API key and model name
def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DECODER2VEC_API_KEY", raising=False)
    assert ServeConfig().resolved_api_key() is None
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-file\n")
    assert ServeConfig(api_key_file=str(key_file)).resolved_api_key() == "s3cret-from-file"
    monkeypatch.setenv("DECODER2VEC_API_KEY", "s3cret-from-env")
    assert ServeConfig().resolved_api_key() == "s3cret-from-env"
    assert ServeConfig(api_key_file=str(key_file)).resolved_api_key() == "s3cret-from-file"  # the file wins
    with pytest.raises(ValueError, match="not both"):
        ServeConfig(api_key="k", api_key_file=str(key_file))
    with pytest.raises(ValueError, match="cannot read"):
        ServeConfig(api_key_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServeConfig(api_key_file=str(tmp_path / "empty"))


def test_cli_serve_with_a_key_file_and_no_local_path_shown(_tiny_llama_session, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DECODER2VEC_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-file")
    answers = []

    def fake_run_server(app, host, port, keep_alive):
        with serve_in_thread(app, host, keep_alive=keep_alive) as url:
            answers.append(httpx.post(url + "/v1/embeddings", json={"input": "a"}))
            answers.append(
                httpx.post(url + "/v1/embeddings", json={"input": "a"}, headers={"authorization": "Bearer from-file"})
            )
            answers.append(httpx.get(url + "/health"))
            answers.append(httpx.get(url + "/v1/models", headers={"authorization": "Bearer from-file"}))

    monkeypatch.setattr(serve_module, "run_server", fake_run_server)
    model = str(_tiny_llama_session)
    assert main(["serve", "--model", model, "--api-key-file", str(key_file), "--device", "cpu"]) == 0
    assert [a.status_code for a in answers] == [401, 200, 200, 200]
    name = _tiny_llama_session.name
    assert answers[1].json()["model"] == answers[2].json()["model"] == answers[3].json()["data"][0]["id"] == name
    for answer in answers:
        assert str(_tiny_llama_session.parent) not in answer.text
    assert str(_tiny_llama_session.parent) not in capsys.readouterr().out


def test_display_name_hides_local_paths(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert display_name(str(folder)) == "my-model"
    assert display_name("/models/private/llama.gguf") == "llama"
    assert display_name("./runs/final") == "final"
    assert display_name("smollm2-135m") == "smollm2-135m"
    assert display_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert display_name("") == "decoder2vec"


def test_limits_are_validated():
    for name in ("max_body_bytes", "max_queue", "max_header_bytes"):
        with pytest.raises(ValueError, match=name):
            ServeConfig(**{name: 0})
    for name in ("request_timeout", "read_timeout"):
        with pytest.raises(ValueError, match=name):
            ServeConfig(**{name: 0})
    defaults = ServeConfig()
    assert defaults.max_body_bytes == 8 * 1024 * 1024 and defaults.max_queue == 256
