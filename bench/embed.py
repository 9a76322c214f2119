"""Corpus embedding throughput: `decoder2vec embed` against `Encoder.encode` of the same rows, same run.

The corpus is the shared Wikipedia sentences repeated to ``--rows`` rows, as JSONL with ids. In one process,
after a small untimed job through both paths (one-time costs: imports, thread pools), alternating for ``--rounds``
rounds, the order reversed every other round (so a shared machine's load hits both alike):

* ``encode``: ``Encoder.encode`` of all the texts, already in memory (batch ``--batch-size``, length-sorted);
* ``embed``: ``embed_corpus`` with the same loaded encoder, ``--workers 1``: the checking pass over the file,
  reading each shard, encoding, writing Parquet, the manifest; ratio embed / encode (target >= 0.95).

Then ``--workers 2`` with 1 thread each against 1 worker with ``--threads`` threads (fresh processes: model
loads included), and ``--engine ray`` on a local Ray cluster against local (target: <= 15 % slower), measured two
ways:

* in this process: ``--rounds`` rounds of a local job and a Ray job, the order reversed every other round, each job
  with a fresh model load (this process has torch and transformers imported already; Ray's actor is a new process,
  whose imports and model load count; ``ray.init`` is not counted). Each round also runs both engines on a job of
  two shards; from the two job sizes, each engine's fixed cost a job (start-up, shut-down) and steady rate, and
  the job size at which Ray's overhead falls to 15 %;
* as commands: ``decoder2vec embed`` started as a new process for each engine (``--engine ray --address`` the
  running cluster), timed from start to exit, so both pay their imports and model load.

Last, the peak RSS of ``embed`` in a fresh process at ``--rows`` and at a tenth of them (memory bounded by the
shard, not the corpus).

    python bench/embed.py --model smollm2-135m --rows 50000 [--threads 2] [--max-length 128]
    python bench/embed.py --model tiny --rows 50000      # a tiny random Llama: the pipeline's own overhead
    python bench/embed.py --model tiny --rows 300000 --skip ratio workers rss   # Ray's start-up amortized
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset
from decoder2vec.embed import embed_corpus

# VmHWM: this process's own peak RSS (ru_maxrss would also count the parent's, inherited at fork)
_RSS = """
import re, sys, torch
torch.set_num_threads(int(sys.argv[4]))
from decoder2vec.embed import embed_corpus
embed_corpus(sys.argv[1], sys.argv[2], model=sys.argv[3], text_field="text", id_field="id",
             encoder_options={"max_length": int(sys.argv[5])}, shard_size=int(sys.argv[6]), progress=False)
print(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1))
"""


def write_corpus(path: Path, rows: int) -> list[str]:
    lines = [ln for ln in resolve_dataset("simcse").read_text(encoding="utf-8").splitlines() if ln.strip()]
    texts = [lines[i % len(lines)] for i in range(rows)]
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"wiki-{i}", "text": text}) + "\n")
    return texts


def model_folder(name: str, root: Path) -> str:
    if name != "tiny":
        from decoder2vec.sources import resolve_source

        return resolve_source(name)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_model_dir

    return str(make_model_dir(root / "tiny-llama", "llama"))


def timed_command(corpus, out, folder, args, *extra) -> float:
    """Seconds of ``decoder2vec embed`` in a new process, from its start to its exit."""
    command = [sys.executable, "-m", "decoder2vec.cli", "embed", str(corpus), "-o", str(out), "--model", folder,
               "--text-field", "text", "--id-field", "id", "--max-length", str(args.max_length), "--threads",
               str(args.threads), "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
               "--overwrite", *extra]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert run.returncode == 0 and json.loads(run.stdout.splitlines()[-1])["complete"], run.stderr[-3000:]
    return seconds


def timed_embed(corpus, out, **options) -> float:
    start = time.perf_counter()
    manifest = embed_corpus(corpus, out, text_field="text", id_field="id", progress=False, overwrite=True, **options)
    assert manifest["complete"], manifest
    return time.perf_counter() - start


def fixed_and_rate(big_s: list[float], small_s: list[float], rows: int, small_rows: int) -> tuple[float, float]:
    """An engine's fixed cost a job (s) and steady rate (rows/s), from jobs of two sizes: seconds = fixed + rows / rate.

    Both from ``time.perf_counter``: this VM is sometimes paused for tens of seconds, which the wall clock (and so
    file times) counts and ``perf_counter`` does not."""
    big, small = sum(big_s) / len(big_s), sum(small_s) / len(small_s)
    rate = (rows - small_rows) / (big - small)
    return small - small_rows / rate, rate


def report_fixed_and_rate(large_jobs: dict, small_jobs: dict, rows: int, small_rows: int, results: dict) -> None:
    """Print (and add to ``results``) each engine's fixed cost and steady rate, and the job size from which Ray
    is within 15 % of local."""
    local_fixed, local_rate = fixed_and_rate(large_jobs["local"], small_jobs["local"], rows, small_rows)
    ray_fixed, ray_rate = fixed_and_rate(large_jobs["ray"], small_jobs["ray"], rows, small_rows)
    steady = local_rate / ray_rate - 1
    results.update(local_fixed_s=local_fixed, ray_fixed_s=ray_fixed, ray_steady_overhead=steady)
    print(f"from the two job sizes: steady state {ray_rate:.1f} against {local_rate:.1f} rows/s ({100 * steady:+.1f}%),"
          f" fixed cost a job {ray_fixed:.1f} s against {local_fixed:.1f} s")  # fmt: skip
    # rows at which Ray's fixed cost and steady rate give 15 %: rows / r_ray + f_ray = 1.15 (rows / r + f)
    gap = 1.15 / local_rate - 1 / ray_rate
    if gap > 0:
        rows_at_15 = max(0.0, (ray_fixed - 1.15 * local_fixed) / gap)
        results["ray_15_percent_rows"] = round(rows_at_15)
        print(f"at these rates, Ray's overhead is 15 % or less from {rows_at_15:,.0f} rows a job")
    else:
        print("at these rates, Ray's steady state alone is over 15 % slower than local")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model folder or short name, or 'tiny'")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="any of: ratio workers ray commands rss")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    folder = model_folder(args.model, root)
    corpus = root / "corpus.jsonl"
    texts = write_corpus(corpus, args.rows)
    common = {"batch_size": args.batch_size, "shard_size": args.shard_size}
    encoder = Encoder.from_pretrained(folder, max_length=args.max_length)
    print(f"model {args.model} ({folder}), {args.rows} rows, {args.threads} threads, batch {args.batch_size}, "
          f"max_length {args.max_length}, shards of {args.shard_size}; torch {torch.__version__}")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    results: dict = {"rows": args.rows, "threads": args.threads, "model": args.model}

    # a small job through both paths first, so that neither round 1 pays a one-time cost (imports, thread pools)
    encoder.encode(texts[:2000], batch_size=args.batch_size, show_progress=False)
    warm, warm_rows = root / "corpus-warm-up.jsonl", min(args.rows, 2 * args.shard_size)
    write_corpus(warm, warm_rows)
    timed_embed(warm, root / "out-warm-up", encoder=encoder, **common)

    # wall-clock seconds and this process's CPU seconds (all its threads): on a shared, loaded machine the CPU
    # seconds are the fair measure of the work each path does. The order alternates from round to round.
    encode_s, embed_s, encode_cpu, embed_cpu = [], [], [], []

    def run_encode():
        start, cpu = time.perf_counter(), time.process_time()
        encoder.encode(texts, batch_size=args.batch_size, show_progress=False)
        encode_s.append(time.perf_counter() - start)
        encode_cpu.append(time.process_time() - cpu)

    def run_embed():
        cpu = time.process_time()
        embed_s.append(timed_embed(corpus, root / "out-local", encoder=encoder, **common))
        embed_cpu.append(time.process_time() - cpu)

    if "ratio" not in args.skip:
        for round_ in range(args.rounds):
            for step in (run_encode, run_embed) if round_ % 2 == 0 else (run_embed, run_encode):
                step()
            print(f"round {round_ + 1}: encode {args.rows / encode_s[-1]:.1f} rows/s ({args.rows / encode_cpu[-1]:.1f} "
                  f"rows per CPU-s), embed --workers 1 {args.rows / embed_s[-1]:.1f} rows/s ({args.rows / embed_cpu[-1]:.1f}"
                  f" rows per CPU-s); ratio {encode_s[-1] / embed_s[-1]:.3f} wall, {encode_cpu[-1] / embed_cpu[-1]:.3f} CPU")  # fmt: skip
        ratio, cpu_ratio = sum(encode_s) / sum(embed_s), sum(encode_cpu) / sum(embed_cpu)
        results.update(encode_rows_s=args.rows / min(encode_s), embed_rows_s=args.rows / min(embed_s), ratio=ratio)
        results.update(encode_rows_cpu_s=args.rows / min(encode_cpu), embed_rows_cpu_s=args.rows / min(embed_cpu))
        results["cpu_ratio"] = cpu_ratio
        print(f"embed / encode throughput (all rounds): {ratio:.3f} wall, {cpu_ratio:.3f} CPU (target >= 0.95)")

    options = {"model": folder, "encoder_options": {"max_length": args.max_length}, **common}
    if "workers" not in args.skip:
        one = timed_embed(corpus, root / "out-1x2", workers=1, threads=args.threads, **options)
        two = timed_embed(corpus, root / "out-2x1", workers=2, threads=args.threads, **options)
        results.update(one_worker_rows_s=args.rows / one, two_workers_rows_s=args.rows / two)
        print(f"1 worker x {args.threads} threads: {args.rows / one:.1f} rows/s; 2 workers x {args.threads // 2} "
              f"thread(s): {args.rows / two:.1f} rows/s (model loads included); ratio {one / two:.3f}")  # fmt: skip

    if "ray" not in args.skip:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
        print(f"ray.init: {time.perf_counter() - start:.1f} s (not counted)")
        # each job with a fresh model load (this process has torch and transformers imported already; Ray's actor is
        # a new process, whose imports and model load count); the order alternates from round to round
        large_jobs: dict[str, list[float]] = {"local": [], "ray": []}
        small_jobs: dict[str, list[float]] = {"local": [], "ray": []}
        for round_ in range(args.rounds):
            for engine in ("local", "ray") if round_ % 2 == 0 else ("ray", "local"):
                job = {"engine": engine, "workers": 1, "threads": args.threads, **options}
                large_jobs[engine].append(timed_embed(corpus, root / f"out-{engine}-{round_}", **job))
                small_jobs[engine].append(timed_embed(warm, root / f"out-{engine}-small_jobs-{round_}", **job))
            local, on_ray = large_jobs["local"][-1], large_jobs["ray"][-1]
            print(f"ray round {round_ + 1}: local {args.rows / local:.1f} rows/s, ray (1 actor x {args.threads} threads) "
                  f"{args.rows / on_ray:.1f} rows/s: overhead {100 * (on_ray / local - 1):+.1f}%; a job of {warm_rows} "
                  f"rows: local {small_jobs['local'][-1]:.1f} s, ray {small_jobs['ray'][-1]:.1f} s")  # fmt: skip
        overhead = sum(large_jobs["ray"]) / sum(large_jobs["local"]) - 1
        results.update(local_rows_s=args.rows * args.rounds / sum(large_jobs["local"]))
        results.update(ray_rows_s=args.rows * args.rounds / sum(large_jobs["ray"]), ray_overhead=overhead)
        results.update(small_job_rows=warm_rows, small_local_s=small_jobs["local"], small_ray_s=small_jobs["ray"])
        print(f"ray against local, all rounds: overhead {100 * overhead:+.1f}% (target <= 15%)")
        if args.rows > warm_rows:  # two job sizes: each engine's fixed cost a job and steady rate
            report_fixed_and_rate(large_jobs, small_jobs, args.rows, warm_rows, results)
        if "commands" not in args.skip:  # the commands a user runs, each a new process (Ray's joins the cluster)
            address = ray.get_runtime_context().gcs_address
            command_local = timed_command(corpus, root / "out-cmd-local", folder, args)
            command_ray = timed_command(
                corpus, root / "out-cmd-ray", folder, args, "--engine", "ray", "--address", address
            )
            overhead = command_ray / command_local - 1
            results.update(command_local_s=command_local, command_ray_s=command_ray, command_ray_overhead=overhead)
            print(f"as commands, start to exit: decoder2vec embed {command_local:.1f} s, --engine ray "
                  f"{command_ray:.1f} s; overhead {100 * overhead:+.1f}% (target <= 15%)")  # fmt: skip
        ray.shutdown()

    if "rss" not in args.skip:
        peaks = {}
        for rows in (args.rows // 10, args.rows):
            small = root / f"corpus-{rows}.jsonl"
            write_corpus(small, rows)
            run = subprocess.run(
                [sys.executable, "-c", _RSS, str(small), str(root / f"out-rss-{rows}"), folder, str(args.threads),
                 str(args.max_length), str(args.shard_size)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peaks[rows] = int(run.stdout.split()[-1]) / 1024
            print(f"peak RSS of embed, {rows} rows in a fresh process: {peaks[rows]:.0f} MB")
        results["peak_rss_mb"] = peaks
    print(json.dumps(results))


if __name__ == "__main__":
    main()
