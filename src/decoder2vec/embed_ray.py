"""``decoder2vec embed --engine ray``: the same shards embedded by a Ray Data pipeline on a cluster.

The driver plans the shards exactly as the local engine does (:func:`decoder2vec.embed.plan_shards`: one
streaming pass that checks every row), then runs::

    ray.data.from_items(pending shards)                  # one block per shard: where it starts, how many rows
        .map_batches(EmbedShards, batch_size=1,          # an actor pool of Encoders, one model load per actor
                     compute=ActorPoolStrategy(size=workers), num_gpus=1 per actor when the cluster has GPUs)
        -> each actor reads its shard from the input, embeds it, writes its Parquet file (temporary name, rename)
    driver: iter_rows() -> manifest.json updated as shards finish (progress bar with rows/s and ETA)

Ray schedules the actors over the cluster's nodes, restarts failed ones and retries their shards; each shard
is a separate file written atomically, so the output folder has the same layout and manifest as a local run and
can be resumed by either engine. Input files and the output folder must be reachable from every node (a shared
file system, or a path mounted on each node).

On an existing cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        decoder2vec embed /shared/corpus.parquet -o /shared/out --engine ray --workers 8 --id-field doc_id
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

from .embed import (
    EmbedSettings,
    EncoderSpec,
    Shard,
    _encoder_info,
    _finish_manifest,
    _progress_bar,
    _write_manifest,
    embed_shard,
    start_output,
)

__all__ = ["run_ray"]


class EmbedShards:
    """A Ray Data actor: loads the encoder once, then embeds and writes the shards it is handed."""

    def __init__(self, spec: dict, settings: dict, out_dir: str, threads: int, use_gpu: bool):
        import torch

        torch.set_num_threads(threads)
        spec = EncoderSpec(**spec)
        # inside an actor with num_gpus=1, Ray sets CUDA_VISIBLE_DEVICES: "cuda" is that GPU
        self.encoder = spec.load(device="cuda" if use_gpu else "cpu")
        self.settings = EmbedSettings(**settings)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        names = [f.name for f in fields(Shard)]
        records = []
        for i in range(len(batch["index"])):
            values = {name: batch[name][i] for name in names}
            shard = Shard(**{k: v.item() if hasattr(v, "item") else v for k, v in values.items()})
            records.append(json.dumps(embed_shard(self.encoder, shard, self.settings, self.out_dir)))
        return {"record": np.array(records, dtype=object)}


def _encoder_info_task(spec: dict, use_gpu: bool) -> dict:
    spec = EncoderSpec(**spec)
    return _encoder_info(spec.load(device="cuda" if use_gpu else "cpu"), spec)


def run_ray(
    spec: EncoderSpec,
    shards: list[Shard],
    files,
    source: str,
    out_dir: Path,
    config: EmbedSettings,
    *,
    address: str | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> dict:
    """Embed the pending shards on a Ray cluster (``address``, else the initialised one, else a local one)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'decoder2vec[ray]'") from None
    import time

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0 and (spec.device or "cuda").startswith("cuda")
    workers = max(1, min(config.workers, len(shards)))
    per_actor = max(1, (threads or _default_threads()) // workers)
    out_dir = Path(out_dir).absolute()

    # the resolved encoder settings (from the model folder's decoder2vec_config.json and the options) are part of
    # the output's identity: one task loads the model once to read them, where the actors will run
    info_task = ray.remote(_encoder_info_task).options(num_gpus=1 if use_gpu else 0, num_cpus=1)
    info = ray.get(info_task.remote(asdict(spec), use_gpu))
    manifest, pending, extra = start_output(info, source, files, out_dir, config, shards, overwrite, "ray", workers)

    if pending:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts rows of finished shards
        context.execution_options.preserve_order = False
        actor_cpus = 1 if use_gpu else max(1, min(per_actor, int(resources.get("CPU", 1)) - 1))
        dataset = ray.data.from_items([asdict(s) for s in pending], override_num_blocks=len(pending))
        dataset = dataset.map_batches(
            EmbedShards,
            fn_constructor_kwargs={
                "spec": asdict(spec),
                "settings": asdict(config),
                "out_dir": os.fspath(out_dir),
                "threads": per_actor,
                "use_gpu": use_gpu,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if use_gpu else 0,
            num_cpus=actor_cpus,
        )
        progress = _progress_bar(sum(s.rows - s.bad_rows for s in pending), config.progress)
        try:
            for row in dataset.iter_rows():
                record = json.loads(row["record"])
                manifest["shards"].append(record)
                _write_manifest(out_dir, _finish_manifest(manifest, shards, extra))
                progress.update(record["rows"])
        finally:
            progress.close()
    manifest = _finish_manifest(manifest, shards, {"seconds": round(time.perf_counter() - started, 3)})
    _write_manifest(out_dir, manifest)
    return manifest


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()
