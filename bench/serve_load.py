"""Load test of `decoder2vec serve` on loopback, next to offline encode throughput measured in the same run.

Starts the server as a subprocess (the real CLI), then N concurrent clients each send M requests of
one sentence (STS-B test sentences), one request at a time per client. Prints requests/s,
sentences/s, p50/p99 latency and errors, then the offline ``Encoder.encode`` throughput of the
same sentences (batch 32, same thread count, server idle; before and after the load test, as the machine
may be shared) and the ratio of the two.

    python bench/serve_load.py [--clients 16] [--requests 20] [--threads 2] [--max-wait-ms 5]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from decoder2vec import Encoder
from decoder2vec.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sts" / "stsb_test.tsv"


def read_sentences(path: Path, count: int) -> list[str]:
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        for sentence in line.split("\t")[:2]:
            seen.setdefault(sentence.strip(), None)
    sentences = [s for s in seen if s]
    if len(sentences) < count:
        raise SystemExit(f"{path} has {len(sentences)} unique sentences, {count} needed")
    return sentences[:count]


def offline_throughput(encoder, sentences: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    encoder.encode(sentences, batch_size=batch_size, normalize=True)
    return len(sentences) / (time.perf_counter() - start)


async def load(url: str, sentences: list[str], clients: int, requests: int) -> tuple[list[float], int, float]:
    """(latencies in seconds, errors, wall seconds) for clients x requests one-sentence requests."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one_client(index: int) -> None:
            nonlocal errors
            for r in range(requests):
                text = sentences[index * requests + r]
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/embeddings", json={"input": text, "model": "bench"})
                    ok = response.status_code == 200 and len(response.json()["data"]) == 1
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok

        await asyncio.gather(*(client.post("/v1/embeddings", json={"input": s}) for s in sentences[:clients]))
        start = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return latencies, errors, wall


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="requests per client (one sentence each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, offline and in the server")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--pack-tokens", type=int, default=512, help="server packs (0: padded batches)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    sentences = read_sentences(args.data, args.clients * args.requests)
    print(
        f"model {args.model}, {args.clients} clients x {args.requests} requests x 1 sentence, "
        f"{args.threads} torch threads, server batch {args.batch_size}, wait window {args.max_wait_ms} ms, "
        f"packs of {args.pack_tokens} tokens",
        flush=True,
    )

    # offline before and after the load test (the machine may be shared: its load changes over minutes)
    encoder = Encoder.from_pretrained(args.model, device="cpu")
    encoder.encode(sentences[: args.batch_size], batch_size=args.batch_size)  # warm-up
    offline_before = offline_throughput(encoder, sentences, args.batch_size)
    print(f"offline (before): {offline_before:7.1f} sentences/s", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "decoder2vec.cli", "serve", "--model", args.model, "--port", str(port)]
    command += ["--batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms), "--device", "cpu"]
    command += ["--pack-tokens", str(args.pack_tokens)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, server)
        latencies, errors, wall = asyncio.run(load(url, sentences, args.clients, args.requests))
        health = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    offline_after = offline_throughput(encoder, sentences, args.batch_size)
    print(f"offline (after) : {offline_after:7.1f} sentences/s", flush=True)
    total = args.clients * args.requests
    served = total / wall
    lat = np.array(latencies) * 1000
    print(
        f"server : {served:7.1f} requests/s  {served:7.1f} sentences/s  "
        f"p50 {np.percentile(lat, 50):6.0f} ms  p99 {np.percentile(lat, 99):6.0f} ms  errors {errors}/{total}  "
        f"({health['batches']} encode calls for {health['texts']} texts, {health['texts'] / health['batches']:.1f} a call)",
        flush=True,
    )
    offline = (offline_before + offline_after) / 2
    print(
        f"offline: {offline:7.1f} sentences/s (Encoder.encode, batch {args.batch_size}, same sentences, mean of both)"
    )
    print(f"ratio server/offline: {served / offline:.2f} (target >= 0.90 with 16 clients, zero errors)")
    if errors and stderr:
        print("server stderr (tail):", stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
