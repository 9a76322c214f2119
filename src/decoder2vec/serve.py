"""An OpenAI-compatible embeddings server built around one Encoder, with dynamic batching.

Endpoints::

    POST /v1/embeddings   {"input": str | [str], "model": ..., "encoding_format": "float" | "base64",
                           "dimensions": N, "instruction": "...", "precision": "float32" | "int8" | "uint8" | "binary",
                           "normalize": true}
    GET  /v1/models       the one model served
    GET  /health          liveness, model, dimension, batches run

Concurrent requests are queued and encoded together: a worker thread takes the first waiting request and
collects more until as many texts wait as the last batch answered (those clients are back), or
``batch_size`` texts wait, or ``max_wait_ms`` (or ``wait_fraction`` of the last batch's encode time, when
longer) has passed, then encodes them together. A batch is encoded as padding-free packs (texts end to
end, each attending only to itself, see :mod:`decoder2vec.packing`), so short requests of mixed lengths cost no
padding; models with sliding-window attention use ``Encoder.encode``'s padded batches. Every error answers with an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``, never a stack trace.

Example::

    decoder2vec serve --model smollm2-135m --port 8080
    curl -s localhost:8080/v1/embeddings -H 'content-type: application/json' -d '{"input": "hello"}'

or in Python, ``run_server(create_app(encoder))`` (see :func:`serve_in_thread` for tests).
"""

# No `from __future__ import annotations`: FastAPI reads the request model from the endpoint's real annotation.
import asyncio
import base64
import contextlib
import ctypes
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .config import option
from .packing import can_pack, encode_packed
from .vectors import PRECISIONS, postprocess

__all__ = ["DynamicBatcher", "ServeConfig", "create_app", "encode_packed", "register", "run_server", "serve_in_thread"]

logger = logging.getLogger(__name__)


API_KEY_ENV = "DECODER2VEC_API_KEY"


@dataclass
class ServeConfig:
    """How the server listens, batches and limits requests."""

    host: str = option("127.0.0.1", help="address to listen on (loopback only unless --allow-remote)")
    port: int = option(8080, help="TCP port")
    api_key: str | None = option(
        None,
        help=f"require 'Authorization: Bearer KEY' on /v1 endpoints; visible in `ps`: prefer --api-key-file or ${API_KEY_ENV}",
    )
    api_key_file: str | None = option(None, help="read the API key from this file (its first line)")
    model_name: str | None = option(
        None, help="model name the API reports (default: the model's short name or hub id, never a local path)"
    )
    batch_size: int = option(32, help="most texts encoded in one forward pass")
    max_wait_ms: float = option(5.0, help="how long the batcher waits for more requests after the first one")
    wait_fraction: float = option(0.1, help="...or up to this fraction of the last batch's encode time, if longer")
    pack_tokens: int = option(512, help="encode a batch as padding-free packs of up to N tokens (0: padded batches)")
    max_inputs: int = option(2048, help="most inputs in one request (more: 413)")
    max_chars: int = option(32768, help="most characters in one input (more: 400)")
    max_body_bytes: int = option(8 * 1024 * 1024, help="largest request body in bytes (more: 413)")
    max_queue: int = option(
        256,
        help="most texts waiting to be encoded; a request that does not fit gets 429 with Retry-After "
        "(a larger one is taken when nothing waits)",
    )
    request_timeout: float = option(
        60.0, help="seconds a request may take: 503 if it is still queued then, 504 if it is being encoded"
    )
    read_timeout: float = option(10.0, help="seconds a client has to send a request's headers and its body (408)")
    max_header_bytes: int = option(64 * 1024, help="largest request line plus headers in bytes (more: 431)")
    keep_alive: int = option(
        60, help="seconds an idle keep-alive connection stays open (uvicorn's own default, 5, races clients' reuse)"
    )
    allow_remote: bool = option(False, help="allow a non-loopback host (put TLS and an API key in front)")

    def __post_init__(self):
        for name in (
            "batch_size",
            "max_inputs",
            "max_chars",
            "max_body_bytes",
            "max_queue",
            "max_header_bytes",
            "port",
            "pack_tokens",
            "keep_alive",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name in ("port", "pack_tokens") else 1):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.max_wait_ms < 0 or not 0 <= self.wait_fraction <= 1:
            raise ValueError(
                f"need max_wait_ms >= 0 and 0 <= wait_fraction <= 1 ({self.max_wait_ms}, {self.wait_fraction})"
            )
        for name in ("request_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {getattr(self, name)!r}")
        if not self.allow_remote and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address; the server listens on 127.0.0.1 or ::1 only "
                "unless you pass --allow-remote (then use --api-key-file and a TLS proxy)"
            )
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give the API key once: --api-key or --api-key-file, not both")
        self.resolved_api_key()  # an unreadable or empty key file fails here, before the model loads

    def resolved_api_key(self) -> str | None:
        """The key clients must send: ``api_key``, else the first line of ``api_key_file``, else $DECODER2VEC_API_KEY."""
        if self.api_key is not None:
            key = self.api_key
        elif self.api_key_file is not None:
            try:
                lines = open(self.api_key_file, encoding="utf-8").read().splitlines()  # noqa: SIM115
            except OSError as error:
                raise ValueError(f"cannot read the API key file {self.api_key_file!r}: {error.strerror}") from None
            key = lines[0].strip() if lines else ""
            if not key:
                raise ValueError(f"the API key file {self.api_key_file!r} is empty; write the key on its first line")
        else:
            key = os.environ.get(API_KEY_ENV) or None
        if key is not None and not key.isprintable():
            raise ValueError("the API key must be printable characters (no spaces or line breaks around it)")
        return key


def display_name(source: str) -> str:
    """The name the API shows for a model source: a short name or hub id as given; for a local folder or file
    only its last component (a path on this machine is nobody else's business)."""
    if not source:
        return "decoder2vec"
    path = Path(source).expanduser()
    if os.path.isabs(source) or source.startswith((".", "~")) or path.exists():
        name = path.name.removesuffix(".gguf")
        return name or "decoder2vec"
    return source


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- dynamic batching
class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue`` texts; the request may come back after ``retry_after`` seconds."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"{queued} texts are waiting to be encoded; try again in {retry_after} s")
        self.queued, self.retry_after = queued, retry_after


@dataclass(eq=False)
class _Job:
    features: list  # tokenized texts
    future: Future = field(default_factory=Future)
    taken: int = 0  # texts handed to a batch so far
    parts: list = field(default_factory=list)  # vectors of the chunks encoded so far, in order
    counts: list = field(default_factory=list)  # token counts of those chunks' texts

    @property
    def remaining(self) -> int:
        return len(self.features) - self.taken


class DynamicBatcher:
    """Collects concurrent requests and encodes them together, ``batch_size`` texts per forward pass.

    ``submit`` may be called from any thread: it tokenizes there (never on the batcher's thread, so one huge
    request does not hold up the others' batches) and returns a future of (vectors (n, dim) float32, token
    counts (n,)). One worker thread owns the encoder, so the model is never used concurrently. A request of
    more than ``batch_size`` texts is encoded ``batch_size`` texts at a time, its remainder queued behind the
    requests that arrived meanwhile, so small requests keep their latency next to a large one.
    At most ``max_queue`` texts wait (None: no bound): ``submit`` raises :class:`QueueFullError` beyond that,
    except when nothing waits.
    """

    def __init__(
        self,
        encoder,
        *,
        batch_size: int = 32,
        max_wait_ms: float = 5.0,
        wait_fraction: float = 0.1,
        pack_tokens: int = 512,
        max_queue: int | None = None,
    ):
        self.encoder = encoder
        self.batch_size = batch_size
        self.pack_tokens = pack_tokens if can_pack(encoder) else 0
        self.max_wait = max_wait_ms / 1000
        self.wait_fraction = wait_fraction
        self.max_queue = max_queue
        self._last_seconds = 0.0  # how long the last batch took to encode
        self._last_texts = 0  # how many texts it answered
        self.batches = 0  # encode calls so far
        self.texts = 0
        self.busy_seconds = 0.0  # time spent encoding: busy_seconds / uptime is the model's utilization
        self.rejected = 0  # requests refused because the queue was full
        self._jobs: deque[_Job] = deque()
        self._resume: list[_Job] = []  # jobs with texts left after the batch being encoded: queued again after it
        self._waiting = 0  # texts of the queued jobs not yet handed to a batch
        self._reserved = 0  # texts admitted and being tokenized
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decoder2vec-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Texts admitted and not yet in a batch (being tokenized or waiting)."""
        return self._waiting + self._reserved

    def submit(self, pairs: list[tuple[str, str]]) -> Future:
        """Queue (instruction, text) pairs: admitted or :class:`QueueFullError`, then tokenized in this thread."""
        with self._changed:
            queued = self._waiting + self._reserved
            if self.max_queue is not None and queued and queued + len(pairs) > self.max_queue:
                self.rejected += 1
                raise QueueFullError(queued, self._retry_after(queued))
            self._reserved += len(pairs)
        try:
            features = self.encoder.tokenize(pairs)
        except BaseException:
            with self._changed:
                self._reserved -= len(pairs)
            raise
        job = _Job(features)
        with self._changed:
            self._reserved -= len(pairs)
            self._waiting += len(pairs)
            self._jobs.append(job)
            self._changed.notify()
        return job.future

    def cancel(self, future: Future) -> bool:
        """Drop a request whose client stopped waiting; True when none of its texts had been encoded yet."""
        with self._changed:
            future.cancel()
            for jobs in (self._jobs, self._resume):
                for job in jobs:
                    if job.future is future:
                        jobs.remove(job)
                        self._waiting -= job.remaining
                        return job.taken == 0
        return False

    def close(self) -> None:
        """Encode what is queued, then stop the worker."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=30)

    def _retry_after(self, queued: int) -> int:
        """Seconds until ``queued`` texts are encoded at the last batch's pace (at least 1)."""
        per_text = self._last_seconds / self._last_texts if self._last_texts else 0.0
        return max(1, math.ceil(queued * per_text + self._last_seconds))

    def _run(self) -> None:
        while True:
            with self._changed:
                # a large request's remainder goes behind the requests that came while its last chunk was encoded
                self._jobs.extend(self._resume)
                self._resume.clear()
                while not self._jobs and not self._closed:
                    self._changed.wait()
                if not self._jobs:
                    return
                # Clients answered by the last batch come back a moment later (their responses are still being
                # written and read): wait for them within the window, but stop waiting once as many texts are
                # here as the last batch answered, since under steady load a longer wait only idles the model.
                # Texts already queued always join, up to batch_size.
                deadline = time.monotonic() + max(self.max_wait, min(self.wait_fraction * self._last_seconds, 0.25))
                enough = min(self.batch_size, self._last_texts) or self.batch_size
                while self._waiting < enough and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                chunks = self._take()
            if chunks:
                self._encode(chunks)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to batch_size texts from the queued jobs, oldest first: (job, start, end) slices of their texts."""
        chunks, room = [], self.batch_size
        while self._jobs and room > 0:
            job = self._jobs.popleft()
            if job.future.done():  # cancelled, or an earlier chunk failed
                self._waiting -= job.remaining
                continue
            count = min(job.remaining, room)
            chunks.append((job, job.taken, job.taken + count))
            job.taken += count
            self._waiting -= count
            room -= count
            if job.remaining:
                self._resume.append(job)
        return chunks

    def _encode(self, chunks: list[tuple[_Job, int, int]]) -> None:
        features = [f for job, start, end in chunks for f in job.features[start:end]]
        began = time.monotonic()
        try:
            if self.pack_tokens:
                vectors = encode_packed(self.encoder, features, max_tokens=self.pack_tokens)
            else:
                with torch.inference_mode():
                    vectors = self.encoder(self.encoder.collate(features)).float().cpu()
        except Exception as error:  # handed to each waiting request, which answers 500
            logger.exception("encoding a batch of %d texts failed", len(features))
            for job, _, _ in chunks:
                _settle(job.future, error=error)
            return
        self._last_seconds = time.monotonic() - began
        self._last_texts = len(features)
        self.batches += 1
        self.texts += len(features)
        self.busy_seconds += self._last_seconds
        offset = 0
        for job, start, end in chunks:
            job.parts.append(vectors[offset : offset + end - start])
            job.counts += [len(f.input_ids) for f in job.features[start:end]]
            offset += end - start
            if len(job.counts) == len(job.features):
                _settle(job.future, result=(torch.cat(job.parts), job.counts))


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a request's future unless its client gave up on it (then the future is cancelled)."""
    if future.cancelled():  # (set_result would still overwrite a cancelled concurrent Future)
        return
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def release_openmp_threads() -> bool:
    """Let go of the calling thread's idle OpenMP worker threads (GNU OpenMP, as in torch's Linux wheels).

    The batcher encodes in its own thread, which gets its own OpenMP team, while the thread that loaded the
    model keeps the team it used. libgomp counts both teams' threads, and once they outnumber the CPUs it
    stops spin-waiting between parallel regions: every torch op then puts the team to sleep and wakes it
    again. Measured on SmolLM2 with 2 threads on 2 cores: 1,600 voluntary context switches per forward pass
    of 16 texts instead of 6, and about 5-8% slower passes. The threads come back if this thread runs
    parallel torch code again. True when released; False where there is nothing to release this way
    (no libgomp loaded, or another OpenMP runtime).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)  # only the copy torch already loaded
    except OSError:
        return False
    pause = getattr(libgomp, "omp_pause_resource_all", None)  # OpenMP 5.0
    return pause is not None and pause(1) == 0  # 1: omp_pause_soft


# ---------------------------------------------------------------------- the app
def create_app(encoder, config: ServeConfig | None = None):
    """A FastAPI app serving ``encoder``; the batcher starts and stops with the app."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    release_openmp_threads()  # see there: the batcher's thread gets the CPUs' OpenMP threads to itself
    FastJSONResponse = _fast_json_response_class()
    model_id = config.model_name or display_name(encoder.source)
    created = int(time.time())
    state: dict = {"timeouts": 0}

    class EmbeddingRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored

        input: str | list[str] = Field(description="a text or a list of texts")
        model: str | None = None
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = Field(default=None, ge=1)
        instruction: str | None = Field(default=None, description="read before every input, not pooled (queries)")
        precision: Literal[PRECISIONS] = "float32"  # type: ignore[valid-type]
        normalize: bool = True
        user: str | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = DynamicBatcher(
            encoder,
            batch_size=config.batch_size,
            max_wait_ms=config.max_wait_ms,
            wait_fraction=config.wait_fraction,
            pack_tokens=config.pack_tokens,
            max_queue=config.max_queue,
        )
        try:
            yield
        finally:
            state.pop("batcher").close()

    app = FastAPI(title="decoder2vec embeddings", lifespan=lifespan)
    app.state.config = config

    error = _error_response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error(400, "the request body is not valid JSON", code="invalid_json")
        first = problems[0] if problems else {}
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return error(400, "the request body is empty; send a JSON object", code="empty_body")
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = where[0] if where else None
        detail = "; ".join(f"{_location(p)}: {p.get('msg')}" for p in problems[:5])
        code = "unknown_parameter" if first.get("type") == "extra_forbidden" else "invalid_value"
        return error(422, f"invalid request: {detail}", param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        return error(exc.status_code, str(exc.detail), kind=kinds.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    app.add_middleware(
        _Guard,
        key=config.resolved_api_key(),
        max_body_bytes=config.max_body_bytes,
        read_timeout=config.read_timeout,
    )

    @app.get("/health")
    async def health():
        batcher = state.get("batcher")
        return {
            "status": "ok",
            "model": model_id,
            "dim": encoder.dim,
            "batches": batcher.batches if batcher else 0,
            "texts": batcher.texts if batcher else 0,
            "busy_seconds": round(batcher.busy_seconds, 3) if batcher else 0.0,
            "queued": batcher.queued if batcher else 0,
            "rejected": batcher.rejected if batcher else 0,
            "timeouts": state["timeouts"],
        }

    @app.get("/v1/models")
    async def models():
        entry = {"id": model_id, "object": "model", "created": created, "owned_by": "decoder2vec"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        began = time.monotonic()
        texts = [body.input] if isinstance(body.input, str) else body.input
        problem = _check_texts(texts, body.instruction, config, encoder.dim, body.dimensions)
        if problem is not None:
            return error(*problem[:2], param=problem[2], code=problem[3])
        batcher = state["batcher"]
        pairs = [(body.instruction or "", text) for text in texts]
        try:  # admitted or refused at once, then tokenized here (short) or in a worker thread, never on the batcher's
            if sum(len(text) for text in texts) <= _INLINE_CHARS:
                future = batcher.submit(pairs)
            else:
                future = await run_in_threadpool(batcher.submit, pairs)
        except QueueFullError as full:
            return error(
                429,
                f"the server is busy ({full.queued} texts waiting); retry after {full.retry_after} s",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(full.retry_after)},
            )
        waiting = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({waiting}, timeout=max(0.0, config.request_timeout - (time.monotonic() - began)))
        if not done:
            state["timeouts"] += 1
            if batcher.cancel(future):  # never reached the model: the queue is too long for this timeout
                return error(
                    503,
                    f"the request waited {config.request_timeout:g} s in the queue without being encoded",
                    kind="server_error",
                    code="queue_timeout",
                    headers={"Retry-After": str(batcher._retry_after(batcher.queued))},
                )
            return error(
                504, f"encoding took longer than {config.request_timeout:g} s", kind="server_error", code="timeout"
            )
        vectors, counts = waiting.result()  # an encoding error propagates: 500 without a traceback
        out = postprocess(vectors, normalize=body.normalize, dimensions=body.dimensions, precision=body.precision)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(row, body.encoding_format)}
            for i, row in enumerate(out)
        ]
        tokens = int(sum(counts))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return FastJSONResponse({"object": "list", "data": data, "model": model_id, "usage": usage})

    return app


_INLINE_CHARS = 4096  # requests up to this size are tokenized on the event loop (< 1 ms; a thread hop costs more)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can escape a lone one ("\\ud800"), but UTF-8 cannot encode it


def _check_texts(texts: list[str], instruction: str | None, config: ServeConfig, dim: int, dimensions: int | None):
    """(status, message, param, code) of the first problem with a request's texts, or None."""
    if not texts:
        return 400, "input must not be empty", "input", None
    if len(texts) > config.max_inputs:
        return 413, f"{len(texts)} inputs; at most {config.max_inputs} per request", "input", "too_many_inputs"
    for index, text in enumerate(texts):
        if not text:
            return 400, f"input[{index}] is an empty string", "input", "empty_input"
        if len(text) > config.max_chars:
            message = f"input[{index}] has {len(text)} characters; at most {config.max_chars}"
            return 400, message, "input", "input_too_long"
        if _SURROGATE.search(text):
            return 400, f"input[{index}] holds a lone UTF-16 surrogate, which is not text", "input", "invalid_text"
    if instruction is not None:
        if len(instruction) > config.max_chars:
            return 400, f"instruction has more than {config.max_chars} characters", "instruction", "input_too_long"
        if _SURROGATE.search(instruction):
            return 400, "instruction holds a lone UTF-16 surrogate, which is not text", "instruction", "invalid_text"
    if dimensions is not None and dimensions > dim:
        return 400, f"dimensions must be from 1 to {dim}, not {dimensions}", "dimensions", None
    return None


def _error_response(
    status: int, message: str, kind: str = "invalid_request_error", param=None, code=None, headers=None
):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware in front of the app: the API key on /v1 (401), then the whole request body, read
    within ``read_timeout`` seconds (408) and ``max_body_bytes`` (413), so the app only sees a bounded body.

    The key is compared in constant time. An oversized body is read on and dropped (up to 4x the limit)
    before the 413, so that the client, still sending, reads the answer instead of a reset connection.
    A plain ASGI class rather than ``@app.middleware("http")``, whose per-request task and stream
    plumbing costs more than these checks under many small requests.
    """

    def __init__(self, app, key: str | None, max_body_bytes: int, read_timeout: float):
        self.app = app
        self.expected = f"Bearer {key}".encode() if key else None
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = _error_response(
                    401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key"
                )
                return await response(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        progress = {"too_big": declared.isdigit() and int(declared) > self.max_body_bytes, "disconnected": False}
        try:
            body = await asyncio.wait_for(self._read_body(receive, progress), self.read_timeout)
        except asyncio.TimeoutError:
            body = None
        if progress["disconnected"]:
            return None
        if body is None:
            if progress["too_big"]:
                status, message, code = 413, f"the body is over {self.max_body_bytes} bytes", "body_too_large"
            else:
                status, message, code = 408, f"the body took over {self.read_timeout:g} s to arrive", "read_timeout"
            response = _error_response(status, message, code=code, headers={"Connection": "close"})
            return await response(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive, progress: dict) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                progress["disconnected"] = True
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            progress["too_big"] = progress["too_big"] or size > self.max_body_bytes
            if progress["too_big"]:
                if size > 4 * self.max_body_bytes:
                    return None  # stop reading: the connection is closed after the 413
            else:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return None if progress["too_big"] else b"".join(chunks)


def _location(problem: dict) -> str:
    return ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"


def _encode_vector(row: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # little-endian bytes of the row's dtype (float32 for float vectors)
        return base64.b64encode(np.ascontiguousarray(row, dtype=row.dtype.newbyteorder("<")).tobytes()).decode()
    return np.ascontiguousarray(row)  # written as a JSON list by the orjson response


def _fast_json_response_class():
    """A JSONResponse that writes numpy rows with orjson.

    The standard ``json.dumps`` of a 576-float ``tolist()`` takes about 0.7 ms, and the event loop writes
    the responses of a whole batch one after another while the model waits for those clients' next
    requests: 16 responses held the model idle about 11 ms per batch (5% of the load test). orjson writes
    the numpy row directly in about 0.03 ms, float32 values in their shortest exact form.
    """
    import orjson
    from fastapi.responses import JSONResponse

    class FastJSONResponse(JSONResponse):
        def render(self, content) -> bytes:
            return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)

    return FastJSONResponse


# ---------------------------------------------------------------------- running it
_LINGER_SECONDS = 2.0  # how long a refused connection is read (and dropped) before it is closed


def http_protocol(
    read_timeout: float = ServeConfig.read_timeout, max_header_bytes: int = ServeConfig.max_header_bytes
):
    """uvicorn's httptools protocol, plus a deadline (408) and a size cap (431) for a request's line and headers.

    uvicorn has neither: a client that sends its headers a byte at a time (slow loris), or endless headers,
    holds a connection and its memory for as long as it likes. The clock starts when a connection opens
    and when a request's first byte arrives, and stops when its headers are complete; an idle keep-alive
    connection is uvicorn's ``timeout_keep_alive`` business. Returns "auto" without httptools.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        logger.warning("httptools is missing: no deadline for reading request headers (pip install httptools)")
        return "auto"

    def answer(status: int, reason: str, message: str, code: str) -> bytes:
        body = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        )
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        return (head + "connection: close\r\n\r\n" + body).encode()

    too_slow = answer(408, "Request Timeout", f"the headers took over {read_timeout:g} s to arrive", "read_timeout")
    too_large = answer(431, "Request Header Fields Too Large", f"over {max_header_bytes} bytes", "headers_too_large")

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            self._header_timer = None
            self._header_bytes = 0
            self._refused = False
            super().connection_made(transport)
            self._start_header_clock()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering after a refusal: what the client still sends is read and dropped
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._start_header_clock()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None:  # the headers are still incomplete after these bytes
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(too_large)

        def on_headers_complete(self) -> None:
            self._stop_header_clock()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._stop_header_clock()
            super().connection_lost(exc)

        def _start_header_clock(self) -> None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(read_timeout, self._refuse, too_slow)

        def _stop_header_clock(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, answer: bytes) -> None:
            """Answer, end our side, and keep reading for a moment before closing (a lingering close).

            Closing at once with the client's bytes still unread makes the kernel send a reset, which can
            destroy the answer in the client's buffers before it reads it: the client would see a reset,
            not the 431.
            """
            self._stop_header_clock()
            if self.transport.is_closing() or self._refused:
                return
            self._refused = True
            self.transport.write(answer)
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(_LINGER_SECONDS, self.transport.close)
            else:
                self.transport.close()

    return GuardedHttpToolsProtocol


def _uvicorn_options(app, keep_alive: int) -> dict:
    limits = getattr(getattr(app, "state", None), "config", None) or ServeConfig()
    return {
        "access_log": False,
        "timeout_keep_alive": keep_alive,
        "http": http_protocol(limits.read_timeout, limits.max_header_bytes),
    }


def run_server(app, host: str = "127.0.0.1", port: int = 8080, keep_alive: int = ServeConfig.keep_alive) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", **_uvicorn_options(app, keep_alive))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(
    app, host: str = "127.0.0.1", port: int | None = None, keep_alive: int = ServeConfig.keep_alive
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port``)."""
    import uvicorn

    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", **_uvicorn_options(app, keep_alive))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="decoder2vec-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ---------------------------------------------------------------------- CLI
def _serve_command(args) -> None:
    from .cli import load_encoder
    from .config import config_from_args

    config = config_from_args(ServeConfig, args)  # validates the host before the model loads
    encoder = load_encoder(args)
    app = create_app(encoder, config)
    name = config.model_name or display_name(encoder.source)
    print(f"serving {name} (dim {encoder.dim}) on http://{config.host}:{config.port}/v1")
    run_server(app, host=config.host, port=config.port, keep_alive=config.keep_alive)


def register(subparsers) -> None:
    from .cli import add_model_arguments
    from .config import add_arguments

    parser = subparsers.add_parser("serve", help="serve an OpenAI-compatible /v1/embeddings API")
    add_arguments(parser, ServeConfig)
    add_model_arguments(parser)
    parser.set_defaults(handler=_serve_command)
