"""``decoder2vec embed --engine ray``: the same shards embedded by a Ray Data pipeline on a cluster.

The driver runs::

    ray.data.from_items([one row])
        .flat_map(pending shards from the handover, num_cpus=0)   # waits until the driver hands them over
        .map_batches(EmbedShards, batch_size=1,                    # an actor pool of Encoders, one model load each
                     compute=ActorPoolStrategy(size=workers, two shards queued per actor, one run at a time),
                     num_gpus=1 per actor when the cluster has GPUs)
    planning thread, while the actors start:
        shards = plan_shards(...)                    # the local engine's checking pass
        info = the first actor's loaded encoder      # its resolved settings: part of the output's identity
        manifest, pending = start_output(...)        # checked against an existing manifest, before any write
        pending shards -> the handover -> the pipeline (one row, one block, one actor task each)
    main thread: iter_rows() -> manifest.json updated as each shard finishes, progress bar in rows

Each actor is a :class:`decoder2vec.embed.ShardEmbedder` that embeds one shard at a time, with the next one already
queued at the actor. (Two calls at a time, so that one shard's reading and writing overlap another's encoding as in
the local engine on a GPU, was slower in an actor: every forward pass ran 1.5-2x longer while a second call was in
the actor, 36-42 s against 27-37 s for 50,000 rows on a tiny model, alternated over 3 rounds, 2026-12-02.) An actor
reads its shard from the input, embeds it and writes its Parquet file (temporary name, rename); its output row is
the shard's manifest record. The handover is a small actor between the two sides: the pipeline's actors give it
their encoder settings (no second model load just to read them), the driver gives it the shards to embed once the
output folder is checked, so nothing is written before the check and a folder made with other settings is the same
clear error as with the local engine. Each shard is a separate file written atomically, so the output folder has the
same layout and manifest as a local run and can be resumed by either engine. Input files and the output folder must
be reachable from every node (a shared file system, or a path mounted on each node).

Why Ray Data: Ray schedules the actor pool over the cluster's nodes (GPUs included), restarts a lost actor and
retries its shards, and moves the records through its object store, without scheduling code of ours. What the
plain-actor version before it (commit 7c0c65c) did better is kept: one model load per actor, planning while the
actors start. Ray Data's own progress bars, stats logs, issue detectors, memory sampling and no-progress timeout
are switched off (``_pipeline_context``); its stats actor still runs. The pool starts before the shards are
counted, so it has ``workers`` actors even for fewer shards; a planning error or a folder made with other settings
is raised once the pipeline has stopped, which waits for actors still starting.

On an existing cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        decoder2vec embed /shared/corpus.parquet -o /shared/out --engine ray --workers 8 --id-field doc_id

Spark users: write the corpus as Parquet (``df.write.parquet("/shared/corpus")``), embed that folder, and read
``/shared/out/shards`` back with ``spark.read.parquet`` (columns id, embedding, text).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .embed import (
    EmbedSettings,
    EncoderSpec,
    Shard,
    ShardEmbedder,
    _encoder_info,
    _finish_manifest,
    _progress_bar,
    _write_manifest,
    plan_shards,
    start_output,
)

__all__ = ["run_ray"]

IN_FLIGHT = 2  # shards an actor holds at once: the next one waits at the actor while one is embedded


class EmbedShards:
    """A Ray Data actor: loads the encoder once, gives its settings to the handover, then embeds the shards it
    is handed (a batch is one shard) and returns their manifest records."""

    def __init__(self, spec: dict, settings: dict, out_dir: str, threads: int, use_gpu: bool, handover):
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        spec = EncoderSpec(**spec)
        # inside an actor with num_gpus=1, Ray sets CUDA_VISIBLE_DEVICES: "cuda" is that GPU
        encoder = spec.load(device="cuda" if use_gpu else "cpu")
        handover.give_encoder_info.remote(_encoder_info(encoder, spec))
        self.embedder = ShardEmbedder(encoder, EmbedSettings(**settings), out_dir)

    def __call__(self, batch):  # a pyarrow Table of shards
        import pyarrow as pa
        import torch

        # a call may run on another thread than the constructor, and OpenMP's thread count is a per-thread setting
        # that a new thread takes from OMP_NUM_THREADS (which Ray sets to the actor's num_cpus)
        torch.set_num_threads(self.threads)
        records = [json.dumps(self.embedder(Shard(**row))) for row in batch.to_pylist()]
        return pa.table({"record": records})


class Handover:
    """A small actor between the driver and the pipeline: the first loaded encoder's settings go to the driver,
    the shards to embed (once the output folder is checked) go to the pipeline."""

    def __init__(self):
        self._info, self._shards = None, None
        self._info_given, self._shards_given = asyncio.Event(), asyncio.Event()

    async def give_encoder_info(self, info: dict) -> None:  # by every actor once loaded; the first one counts
        if not self._info_given.is_set():
            self._info = info
            self._info_given.set()

    async def encoder_info(self) -> dict:
        await self._info_given.wait()
        return self._info

    async def hand_over(self, shards: list[dict]) -> None:
        self._shards = shards
        self._shards_given.set()

    async def shards(self) -> list[dict]:
        await self._shards_given.wait()
        return self._shards


def _pending_shards(_: dict, handover) -> list[dict]:
    """The pipeline's first step: one row per shard to embed, once the driver hands them over."""
    import ray

    return ray.get(handover.shards.remote())


def _pipeline_context(current):
    """A copy of Ray Data's context for this job: one shard a block, and what the job does not need switched off."""
    context = current.copy()
    context.enable_progress_bars = False  # ours counts the rows of finished shards
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.issue_detectors_config.detectors = []  # a model-sized actor that works for minutes is expected
    context.memory_usage_poll_interval_s = None  # no sampling of every task's memory each second
    context.execution_no_progress_timeout_s = -1  # the pipeline waits while the driver plans; a shard may be slow
    context.execution_options.preserve_order = False  # shards finish in any order; the manifest sorts them
    context.target_max_block_size = 1  # a block per row, so each shard is a task of its own, on any actor
    context.raise_original_map_exception = True  # an actor's own error (CorpusError, OSError), not a wrapper
    return context


class _Job:
    """What the planning thread prepares for the main thread (set before any shard is handed over)."""

    shards: list[Shard] | None = None
    manifest: dict | None = None
    extra: dict | None = None
    progress = None
    error: BaseException | None = None


def _prepare(job: _Job, handover, files, source, out_dir: Path, config: EmbedSettings, overwrite, workers) -> None:
    """Plan, check the output folder against an actor's loaded encoder, hand the pending shards over."""
    import ray

    pending = []
    try:
        job.shards = plan_shards(files, config)
        info = ray.get(handover.encoder_info.remote())
        job.manifest, pending, job.extra = start_output(
            info, source, files, out_dir, config, job.shards, overwrite, "ray", workers
        )
        job.progress = _progress_bar(sum(s.rows - s.bad_rows for s in pending), config.progress)
    except BaseException as error:  # raised by the main thread once the pipeline has ended with no shard to embed
        job.error, pending = error, []
    handover.hand_over.remote([asdict(s) for s in pending])


def run_ray(
    spec: EncoderSpec,
    files,
    source: str,
    out_dir: Path,
    config: EmbedSettings,
    *,
    address: str | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> dict:
    """Plan ``files`` and embed the pending shards on a Ray cluster (``address``, else the initialised one, else
    a local one)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'decoder2vec[ray]'") from None

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0 and (spec.device or "cuda").startswith("cuda")
    per_actor = max(1, (threads or _default_threads()) // config.workers)
    actor_cpus = 1 if use_gpu else max(1, min(per_actor, int(resources.get("CPU", 1)) - 1))
    out_dir = Path(out_dir).absolute()
    handover = ray.remote(num_cpus=0)(Handover).remote()
    job = _Job()
    with ray.data.DataContext.current(_pipeline_context(ray.data.DataContext.get_current())):
        dataset = (
            ray.data.from_items([{"job": 0}])
            .flat_map(_pending_shards, fn_kwargs={"handover": handover}, num_cpus=0)
            .map_batches(
                EmbedShards,
                fn_constructor_kwargs={
                    "spec": asdict(spec),
                    "settings": asdict(config),
                    "out_dir": os.fspath(out_dir),
                    "threads": per_actor,
                    "use_gpu": use_gpu,
                    "handover": handover,
                },
                batch_size=1,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(
                    size=config.workers,
                    max_tasks_in_flight_per_actor=IN_FLIGHT,
                    max_concurrent_calls_per_actor=1,
                    # measured (3 rounds, 50,000 rows, tiny model): 27-37 s a job with this flag, 36-42 without,
                    # 36-42 with two calls at a time
                    enable_true_multi_threading=True,
                ),
                num_cpus=actor_cpus,
                num_gpus=1 if use_gpu else 0,
            )
        )
        # the pipeline starts with the first row asked for (its actors load the encoder); planning runs meanwhile
        arguments = (job, handover, files, source, out_dir, config, overwrite, config.workers)
        planner = threading.Thread(target=_prepare, args=arguments, name="embed-plan", daemon=True)
        planner.start()
        try:
            for row in dataset.iter_rows():
                record = json.loads(row["record"])
                job.manifest["shards"].append(record)
                _write_manifest(out_dir, _finish_manifest(job.manifest, job.shards, job.extra))
                job.progress.update(record["rows"])
        finally:
            ray.kill(handover)  # a planning thread still waiting for an encoder (the pipeline failed) stops
            if job.progress is not None:
                job.progress.close()
    planner.join()
    if job.error is not None:
        raise job.error
    manifest = _finish_manifest(job.manifest, job.shards, {"seconds": round(time.perf_counter() - started, 3)})
    _write_manifest(out_dir, manifest)
    return manifest


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()
