"""Load test of `decoder2vec serve` on loopback, next to offline encode throughput measured in the same run.

Starts the server as a subprocess (the real CLI), then N concurrent clients each send M requests of
one sentence (STS-B test sentences), one request at a time per client. Prints requests/s,
sentences/s, p50/p99 latency and errors, then the offline ``Encoder.encode`` throughput of the
same sentences (batch 32, same thread count, server idle; in a fresh process like the server's, or with
--in-process both in this one) and the ratio of the two.

This VM's speed drifts by up to 2x within a minute, so the two sides alternate in short rounds (by
default two requests per client), in ABBA order: offline first in even rounds, the server first in odd
ones. The offline baseline is one ``Encoder.encode`` call over all the sentences (sorted by length,
batches of 32), timed in pieces: its batches are dealt out to the rounds (see offline_shares).

It also prints the server's ceiling: N clients with one sentence each never have more than N texts in
flight, so no batch exceeds N texts; the same sentences encoded offline as the server's packs of N texts,
back to back, are the most any batching policy can serve. On a CPU a forward pass has a fixed cost, so
N = 16 can sit below offline's batches of 32.

    python bench/serve_load.py [--clients 16] [--requests 40] [--rounds 20] [--verbose] [--threads 2] [--max-wait-ms 5]

With --overload it checks the server under 4x the load it can serve instead (see :func:`overload`): three
phases of --seconds each (batch_size clients, 4x as many, batch_size again); every answer must be 200 or 429
(503/504 only for the --request-timeout asked for), no request without an answer, the server alive, its
memory flat, and the accepted requests' p99 within 3x the unloaded p99.

    python bench/serve_load.py --overload [--seconds 20] [--batch-size 8] [--max-queue 8] [--threads 1]
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset
from decoder2vec.serve import ServeConfig, create_app, encode_packed, free_port, serve_in_thread


def read_sentences(path: Path, count: int) -> list[str]:
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        for sentence in line.split("\t")[:2]:
            seen.setdefault(sentence.strip(), None)
    sentences = [s for s in seen if s]
    if len(sentences) < count:
        raise SystemExit(f"{path} has {len(sentences)} unique sentences, {count} needed")
    return sentences[:count]


class OfflineWorker:
    """The offline side in a fresh process of its own, like the server's: one JSON request a line (see offline_call)."""

    def __init__(self, args):
        command = [sys.executable, __file__, "--offline-worker", "--model", args.model]
        command += [
            "--threads",
            str(args.threads),
            "--batch-size",
            str(args.batch_size),
            "--clients",
            str(args.clients),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, request: dict):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def offline_worker(args) -> None:
    encoder = Encoder.from_pretrained(args.model, device="cpu")
    for line in sys.stdin:
        print(json.dumps(offline_call(encoder, json.loads(line), args)), flush=True)


def offline_call(encoder, request: dict, args):
    """``{"lengths": texts}``: token counts. ``{"encode": texts, "packs": texts}``: seconds to embed the first
    with ``Encoder.encode`` (the baseline), and the second as the server's packs of at most ``clients`` texts
    (the server's ceiling when at most that many one-sentence requests are in flight)."""
    if "lengths" in request:
        return [len(f.input_ids) for f in encoder.tokenize([("", t) for t in request["lengths"]])]
    start = time.perf_counter()
    encoder.encode(request["encode"], batch_size=args.batch_size, normalize=True)
    middle = time.perf_counter()
    texts = request["packs"]
    for i in range(0, len(texts), args.clients):
        encode_packed(encoder, encoder.tokenize([("", t) for t in texts[i : i + args.clients]]), max_tokens=512)
    return [middle - start, time.perf_counter() - middle]


def offline_shares(lengths: list[int], batch_size: int, rounds: int) -> list[list[int]]:
    """Offline encode's batches of the whole sentence list, dealt out to the rounds.

    ``Encoder.encode`` of all the sentences sorts them by length and pads each batch of ``batch_size`` to its
    longest; a round's handful of sentences would be padded far more. So the baseline is that whole call,
    timed in pieces: its batches, shuffled (seed 0) and dealt to the rounds, each round's share encoded in one
    call (which forms the same batches again).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(0).shuffle(batches)
    return [[i for batch in batches[r::rounds] for i in batch] for r in range(rounds)]


async def load(post, sentences: list[str], clients: int, requests: int) -> tuple[list[float], int, float, float]:
    """(latencies in seconds, errors, wall seconds, this process's CPU seconds) for clients x requests requests.

    The load generator shares the machine with the server, so its own CPU time is measured and printed:
    aiohttp (C HTTP parser) costs the server less CPU than httpx (pure-Python h11).
    """
    latencies: list[float] = []
    errors = 0

    async def one_client(index: int) -> None:
        nonlocal errors
        for r in range(requests):
            text = sentences[index * requests + r]
            start = time.perf_counter()
            try:
                status, body = await post({"input": text, "model": "bench"})
                ok = status == 200 and len(body["data"]) == 1
            except Exception:  # any failure of the request counts as an error, never stops the run
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return latencies, errors, time.perf_counter() - start, time.process_time() - cpu


@contextlib.asynccontextmanager
async def _client(kind: str, url: str, connections: int):
    """An async ``post(json_body) -> (status, parsed body)`` over ``connections`` keep-alive connections."""
    if kind == "aiohttp":  # with orjson to read the answers, as a load generator should cost the server little
        import aiohttp
        import orjson

        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(120)) as session:

            async def post(body):
                async with session.post("/v1/embeddings", json=body) as response:
                    return response.status, await response.json(loads=orjson.loads)

            yield post
    else:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

            async def post(body):
                response = await client.post("/v1/embeddings", json=body)
                return response.status_code, response.json()

            yield post


@dataclass
class Totals:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    server_seconds: float = 0.0
    offline_seconds: float = 0.0
    packed_seconds: float = 0.0  # the ceiling: the same texts as the server's packs
    busy_seconds: float = 0.0  # the server's time inside encode calls during the load
    client_cpu: float = 0.0


async def measure(args, url: str, sentences: list[str], run_offline) -> Totals:
    """Alternate offline encode and the server load over the same sentences, one round after another.

    ABBA order: offline first in even rounds, the server first in odd ones, so that a machine whose speed
    drifts during the run (this VM's does, by up to 2x within a minute) favours neither side; short rounds
    (by default two requests per client: one offline batch of 32) make the alternation fine. The clients
    keep their connections from round to round, as a real client pool does.
    """
    totals = Totals()
    per_round = args.requests // args.rounds
    size = args.clients * per_round
    shares = offline_shares(run_offline({"lengths": sentences}), args.batch_size, args.rounds)

    def busy() -> float:
        return httpx.get(url + "/health").json()["busy_seconds"]

    async with _client(args.client, url, args.clients) as post:
        for _ in range(3):  # a few full batches before anything is timed
            await asyncio.gather(*(post({"input": s}) for s in sentences[: args.clients]))
        for r in range(args.rounds):
            chunk = sentences[r * size : (r + 1) * size]
            request = {"encode": [sentences[i] for i in shares[r]], "packs": chunk}
            if r % 2 == 0:  # in a thread, so that the loop still sees idle connections the server closes
                offline, packed = await asyncio.to_thread(run_offline, request)
            busy_before = busy()
            latencies, errors, wall, cpu = await load(post, chunk, args.clients, per_round)
            busy_round = busy() - busy_before
            if r % 2 == 1:
                offline, packed = await asyncio.to_thread(run_offline, request)
            totals.latencies += latencies
            totals.errors += errors
            totals.server_seconds += wall
            totals.offline_seconds += offline
            totals.packed_seconds += packed
            totals.busy_seconds += busy_round
            totals.client_cpu += cpu
            if args.verbose:
                print(
                    f"round {r + 1}/{args.rounds} ({'offline first' if r % 2 == 0 else 'server first'}): "
                    f"offline {len(shares[r]) / offline:5.1f}, ceiling {size / packed:5.1f}, server {size / wall:5.1f} "
                    f"sentences/s (model busy {100 * busy_round / wall:.0f}%; offline encodes other sentences each round)",
                    flush=True,
                )
    return totals


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


# ---------------------------------------------------------------------- --overload
@dataclass
class Phase:
    """What the clients of one phase saw."""

    clients: int
    latencies: list[float] = field(default_factory=list)  # of the requests answered 200
    statuses: dict[int, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # requests that got no HTTP answer at all
    seconds: float = 0.0

    def line(self, name: str) -> str:
        lat = np.array(self.latencies or [float("nan")]) * 1000
        answered = sum(self.statuses.values())
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(self.statuses.items()))
        return (
            f"{name:<24} {self.clients:3d} clients, {answered:5d} answers in {self.seconds:5.1f} s "
            f"({len(self.latencies) / self.seconds:5.1f} accepted/s)  accepted p50 {np.percentile(lat, 50):6.0f} ms "
            f"p99 {np.percentile(lat, 99):6.0f} ms  [{statuses}]  no answer: {sum(self.failures.values())}"
        )


async def drive(url: str, sentences: list[str], clients: int, seconds: float) -> Phase:
    """``clients`` clients send one-sentence requests back to back for ``seconds``.

    A 429 is honoured as a well-behaved client does (the openai client among them): wait Retry-After
    seconds, jittered down to half, then send again. Every answer's status is counted; a request that gets
    no answer (connection refused or reset, a client timeout) counts as a failure.
    """
    import aiohttp
    import orjson

    phase = Phase(clients)
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def one_client(index: int) -> None:
            rng = random.Random(index)
            k = index
            while time.perf_counter() < stop:
                body = {"input": sentences[k % len(sentences)], "model": "bench"}
                k += clients
                start = time.perf_counter()
                try:
                    async with session.post("/v1/embeddings", json=body) as response:
                        answer = await response.read()
                        status, retry_after = response.status, response.headers.get("Retry-After")
                except Exception as error:  # no HTTP answer: counted, never stops the run
                    phase.failures[type(error).__name__] = phase.failures.get(type(error).__name__, 0) + 1
                    await asyncio.sleep(0.1)
                    continue
                phase.statuses[status] = phase.statuses.get(status, 0) + 1
                if status == 200 and len(orjson.loads(answer)["data"]) == 1:
                    phase.latencies.append(time.perf_counter() - start)
                elif status in (429, 503):
                    await asyncio.sleep(float(retry_after or 1) * rng.uniform(0.5, 1.0))

        begin = time.perf_counter()
        stop = begin + seconds
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        phase.seconds = time.perf_counter() - begin
    return phase


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def with_memory_samples(pid: int, work) -> tuple[object, list[float]]:
    """Run ``work`` while sampling the server's resident memory (MB) every 0.2 s."""
    samples: list[float] = []

    async def sample():
        while True:
            samples.append(rss_mb(pid))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    try:
        return await work, samples
    finally:
        sampler.cancel()


def overload(args) -> None:
    """Unloaded, overloaded (4x the clients), unloaded again: statuses, accepted latency and memory.

    "The clients the server can serve" is ``batch_size`` one-sentence clients: each request then waits for at
    most the batch being encoded before its own. The queue holds ``max_queue`` more texts; past that the server
    answers 429 with Retry-After. The two unloaded phases frame the overloaded one, so a drift of this VM's
    speed shows as a gap between them.
    """
    sentences = read_sentences(args.data or resolve_dataset("stsb", "test"), 2000)
    served = args.batch_size
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {
        "batch_size": args.batch_size,
        "max_queue": args.max_queue or args.batch_size,
        "request_timeout": args.request_timeout,
        "max_wait_ms": args.max_wait_ms,
        "wait_fraction": args.wait_fraction,
        "pack_tokens": args.pack_tokens,
    }
    print(
        f"overload: model {args.model}, {args.threads} torch threads, batch {settings['batch_size']}, queue "
        f"{settings['max_queue']} texts, request timeout {settings['request_timeout']:g} s; unloaded {served} "
        f"clients, overloaded {4 * served}; {args.seconds:g} s per phase; server in its own process",
        flush=True,
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "decoder2vec.cli", "serve", "--model", args.model, "--port", str(port)]
    for name, value in settings.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    server = subprocess.Popen(
        command + ["--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_ready(url, server, seconds=900)  # a loaded machine can take minutes to import torch and load

        async def run() -> list[Phase]:
            await drive(url, sentences, served, min(args.seconds, 5.0))  # warm-up, not counted
            phases = []
            for clients in (served, 4 * served, served):
                phases.append(await drive(url, sentences, clients, args.seconds))
            return phases

        start_rss = rss_mb(server.pid)
        phases, samples = asyncio.run(with_memory_samples(server.pid, run()))
        health = httpx.get(url + "/health").json()
        alive = server.poll() is None
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    unloaded = Phase(served, phases[0].latencies + phases[2].latencies)
    for name, phase in zip(("unloaded", "overloaded (4x)", "unloaded again"), phases, strict=True):
        print(phase.line(name))
    loaded = phases[1]
    other = {code: n for code, n in loaded.statuses.items() if code not in (200, 429, 503, 504)}
    timeouts = loaded.statuses.get(503, 0) + loaded.statuses.get(504, 0)
    failures = sum(sum(p.failures.values()) for p in phases)
    ratio = np.percentile(loaded.latencies, 99) / np.percentile(unloaded.latencies, 99)
    print(
        f"server: {health['batches']} encode calls, {health['texts']} texts, {health['rejected']} refused (429), "
        f"{health['timeouts']} timed out; process {'alive' if alive else 'DEAD'} at the end"
    )
    print(
        f"server memory (RSS): {start_rss:.0f} MB before the load, peak {max(samples):.0f} MB, "
        f"{samples[-1]:.0f} MB at the end"
    )
    print(
        f"overloaded: only 200/429: {'yes' if not other and not timeouts else 'no'}; 5xx other than the timeouts "
        f"asked for: {sum(n for c, n in other.items() if c >= 500)}; timeouts (503/504): {timeouts}; "
        f"requests without an answer: {failures}"
    )
    print(f"accepted p99 overloaded / unloaded (both unloaded phases): {ratio:.2f} (target <= 3)")
    if stderr and (other or failures or not alive):
        print("server stderr (tail):", stderr[-2000:], file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=40, help="requests per client (one sentence each)")
    parser.add_argument("--rounds", type=int, default=20, help="offline and server alternate this many times")
    parser.add_argument("--verbose", action="store_true", help="print every round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, offline and in the server")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--wait-fraction", type=float, default=0.1, help="server window: fraction of the last batch")
    parser.add_argument("--pack-tokens", type=int, default=512, help="server packs (0: padded batches)")
    parser.add_argument(
        "--client", choices=["aiohttp", "httpx"], default="aiohttp", help="load generator's HTTP client"
    )
    parser.add_argument("--in-process", action="store_true", help="server and offline encode in this process")
    parser.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--overload", action="store_true", help="drive 4x the clients the server can serve")
    parser.add_argument("--seconds", type=float, default=20.0, help="--overload: length of each phase")
    parser.add_argument("--max-queue", type=int, default=None, help="--overload: server queue (default: batch size)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="--overload: server request timeout")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.offline_worker:
        return offline_worker(args)
    if args.overload:
        return overload(args)
    per_round = args.requests // args.rounds
    total = args.clients * per_round * args.rounds
    sentences = read_sentences(args.data or resolve_dataset("stsb", "test"), total)
    print(
        f"model {args.model}, {args.clients} clients x {per_round * args.rounds} requests x 1 sentence in "
        f"{args.rounds} rounds, {args.threads} torch threads, batch {args.batch_size}, "
        f"wait window {args.max_wait_ms} ms or {args.wait_fraction} of the last batch, packs of {args.pack_tokens} "
        f"tokens, {args.client} clients, server {'in this process' if args.in_process else 'in its own process (decoder2vec serve)'}",
        flush=True,
    )
    if args.in_process:
        encoder = Encoder.from_pretrained(args.model, device="cpu")

        def run_offline(request: dict):
            return offline_call(encoder, request, args)

    else:
        worker = OfflineWorker(args)
        run_offline = worker
    run_offline({"encode": sentences[: args.batch_size], "packs": sentences[: args.clients]})  # warm-up

    settings = {"batch_size": args.batch_size, "max_wait_ms": args.max_wait_ms, "wait_fraction": args.wait_fraction}
    settings["pack_tokens"] = args.pack_tokens
    stack = contextlib.ExitStack()
    server = None
    if args.in_process:  # same process and model object as the offline runs; the clients share its GIL
        url = stack.enter_context(serve_in_thread(create_app(encoder, ServeConfig(**settings))))
    else:  # the real CLI in its own process; offline encode in another fresh process
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        command = [sys.executable, "-m", "decoder2vec.cli", "serve", "--model", args.model, "--port", str(port)]
        for name, value in settings.items():
            command += ["--" + name.replace("_", "-"), str(value)]
        server = subprocess.Popen(
            command + ["--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        wait_ready(url, server)
    stderr = ""
    try:
        totals = asyncio.run(measure(args, url, sentences, run_offline))
        health = httpx.get(url + "/health").json()
    finally:
        stack.close()
        if not args.in_process:
            worker.close()
        if server is not None:
            server.terminate()
            _, stderr = server.communicate(timeout=30)
    served = total / totals.server_seconds
    offline = total / totals.offline_seconds
    ceiling = total / totals.packed_seconds
    lat = np.array(totals.latencies) * 1000
    errors = totals.errors
    print(
        f"server : {served:7.1f} requests/s  {served:7.1f} sentences/s  "
        f"p50 {np.percentile(lat, 50):6.0f} ms  p99 {np.percentile(lat, 99):6.0f} ms  errors {errors}/{total}  "
        f"({health['batches']} encode calls for {health['texts']} texts incl. warm-up, "
        f"{health['texts'] / max(health['batches'], 1):.1f} a call)"
    )
    print(
        f"offline: {offline:7.1f} sentences/s (Encoder.encode of the same sentences, batch {args.batch_size}, "
        "timed in pieces between the server's rounds)"
    )
    busy, seconds = totals.busy_seconds, totals.server_seconds
    print(
        f"server model busy {busy:.1f} s of {seconds:.1f} s ({100 * busy / seconds:.0f}%; "
        "the rest: waiting for the answered clients' next requests, and HTTP)"
    )
    print(
        f"load generator ({args.client}): {totals.client_cpu:.1f} CPU s in {seconds:.1f} s of load "
        f"({100 * totals.client_cpu / seconds:.0f}% of one core, shared with the server)"
    )
    print(
        f"ceiling: {ceiling:7.1f} sentences/s (the server's packs of {args.clients} texts, the most that "
        f"{args.clients} one-sentence clients can have in flight, encoded back to back) = {ceiling / offline:.2f} "
        "of offline"
    )
    print(f"ratio server/offline: {served / offline:.2f} (target >= 0.90 with 16 clients, zero errors)")
    print(f"ratio server/ceiling: {served / ceiling:.2f}")
    if errors and stderr:
        print("server stderr (tail):", stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
