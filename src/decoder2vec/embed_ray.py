"""``decoder2vec embed --engine ray``: the same shards embedded by a pool of Ray actors on a cluster.

The driver runs::

    actors = [EmbedShards.remote(...) for _ in range(workers)]   # each loads the encoder once (num_gpus=1 on GPUs)
    shards = plan_shards(...)         # the local engine's checking pass, while the actors start up
    info = actors[0].encoder_info()   # the resolved encoder settings: part of the output's identity
    manifest, pending = start_output(...)
    two shards in flight per actor; as each finishes -> manifest.json updated, the actor gets the next one

Each actor is a :class:`decoder2vec.embed.ShardEmbedder` that takes two calls at a time: one shard's reading
and writing overlap the other's encoding, as in the local engine. An actor reads its shard from the input,
embeds it and writes its Parquet file (temporary name, rename). Ray schedules the actors over the cluster's
nodes and restarts failed ones, retrying their shards; each shard is a separate file written atomically, so the
output folder has the same layout and manifest as a local run and can be resumed by either engine. Input files
and the output folder must be reachable from every node (a shared file system, or a path mounted on each node).

Why actors and not a Ray Data pipeline: the job is a list of shards that each read and write their own files,
so Ray Data had nothing to stream; its executor and its stats and autoscaling actors cost CPU beside the model
(a third of a core on a 2-core machine), and the output's identity needed the settings before the pipeline
started, which cost a separate task and model load.

On an existing cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        decoder2vec embed /shared/corpus.parquet -o /shared/out --engine ray --workers 8 --id-field doc_id
"""

from __future__ import annotations

import os
import time
from collections import deque
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

IN_FLIGHT = 2  # shards handed to an actor at once: one encodes while the other is read or written
RETRIES = 3  # restarts of a dead actor (process or node lost), and retries of its shards


class EmbedShards:
    """A Ray actor: loads the encoder once, then embeds and writes the shards it is handed."""

    def __init__(self, spec: dict, settings: dict, out_dir: str, threads: int, use_gpu: bool):
        import torch

        torch.set_num_threads(threads)
        spec = EncoderSpec(**spec)
        # inside an actor with num_gpus=1, Ray sets CUDA_VISIBLE_DEVICES: "cuda" is that GPU
        encoder = spec.load(device="cuda" if use_gpu else "cpu")
        self.info = _encoder_info(encoder, spec)
        self.embedder = ShardEmbedder(encoder, EmbedSettings(**settings), out_dir)

    def encoder_info(self) -> dict:
        return self.info

    def embed(self, shard: dict) -> dict:
        return self.embedder(Shard(**shard))


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
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'decoder2vec[ray]'") from None

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0 and (spec.device or "cuda").startswith("cuda")
    per_actor = max(1, (threads or _default_threads()) // config.workers)
    actor_cpus = 1 if use_gpu else max(1, min(per_actor, int(resources.get("CPU", 1)) - 1))
    out_dir = Path(out_dir).absolute()
    actor_class = ray.remote(EmbedShards).options(
        num_cpus=actor_cpus,
        num_gpus=1 if use_gpu else 0,
        max_concurrency=IN_FLIGHT,
        max_restarts=RETRIES,
        max_task_retries=RETRIES,
    )
    arguments = (asdict(spec), asdict(config), os.fspath(out_dir), per_actor, use_gpu)
    # the actors start (a new process, imports, the model load) while this process checks the input
    actors = [actor_class.remote(*arguments) for _ in range(config.workers)]
    progress = None
    try:
        shards = plan_shards(files, config)
        for extra_actor in actors[len(shards) :]:  # fewer shards than workers
            ray.kill(extra_actor)
        actors = actors[: len(shards)]
        # the resolved encoder settings (from the model folder's decoder2vec_config.json and the options) are part
        # of the output's identity, checked before anything is written: the first actor's loaded encoder says them
        info = ray.get(actors[0].encoder_info.remote())
        manifest, pending, extra = start_output(
            info, source, files, out_dir, config, shards, overwrite, "ray", len(actors)
        )
        progress = _progress_bar(sum(s.rows - s.bad_rows for s in pending), config.progress)
        waiting = deque(pending)
        running = {}  # ObjectRef of a shard's record -> the actor embedding it

        def hand_over(actor) -> None:
            if waiting:
                running[actor.embed.remote(asdict(waiting.popleft()))] = actor

        for actor in actors:
            for _ in range(IN_FLIGHT):
                hand_over(actor)
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(done)
            record = ray.get(done)
            manifest["shards"].append(record)
            _write_manifest(out_dir, _finish_manifest(manifest, shards, extra))
            progress.update(record["rows"])
            hand_over(actor)
    finally:
        if progress is not None:
            progress.close()
        for actor in actors:
            ray.kill(actor)
    manifest = _finish_manifest(manifest, shards, {"seconds": round(time.perf_counter() - started, 3)})
    _write_manifest(out_dir, manifest)
    return manifest


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()
