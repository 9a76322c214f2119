"""Search what ``decoder2vec embed`` wrote: a FAISS index next to the shards, and :func:`search`.

``decoder2vec index OUT_DIR`` reads the shards listed in ``manifest.json`` (one at a time) into a FAISS index
and saves it as ``OUT_DIR/index/index.faiss`` with ``index.json`` (its settings, the shards and checksums it
was built from, the query instruction). The index type follows the stored vectors:

=========  =====================================  ====================================  ==========================
precision  flat (exact, default)                  ivf (``nlist`` cells, ``nprobe``)     hnsw (``hnsw_m``, ``ef``)
=========  =====================================  ====================================  ==========================
float32    IndexFlatIP                            IndexIVFFlat, inner product           IndexHNSWFlat, inner prod.
int8/uint8 IndexScalarQuantizer 8bit_direct_signed IndexIVFScalarQuantizer (same codes)  IndexHNSWSQ (same codes)
binary     IndexBinaryFlat (Hamming)              IndexBinaryIVF                        IndexBinaryHNSW
=========  =====================================  ====================================  ==========================

Scores are inner products of the stored vectors (cosine similarity for normalized float32 vectors, about
``127**2`` times it for int8; uint8 vectors are shifted back to int8 first) and, for binary vectors, the
inner product of the ±1 vectors: ``bits - 2 * hamming distance``. Higher is better in every case.

:func:`search` embeds queries with the model, settings and output options recorded in the manifest, reading
the index's query instruction (``--query-instruction`` when the index was built, else the model's
``query_instruction``), and returns ids, scores and texts.

Example::

    build_index("out")                                   # exact inner product
    hits = search("out", "what is the capital of France?", k=10)[0]   # [{"id", "score", "text"}, ...]
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from .embed import MANIFEST_NAME, EncoderSpec, read_manifest

__all__ = ["INDEX_KINDS", "SearchIndexError", "build_index", "load_index", "search"]

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_DIR = "index"


class SearchIndexError(ValueError):
    """The index is missing, stale (the shards changed since it was built) or asked for with bad options."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchIndexError("indexing and search need FAISS: pip install 'decoder2vec[faiss]'") from None
    return faiss


def _shard_vectors(out_dir: Path, record: dict, precision: str, width: int) -> np.ndarray:
    """One shard's vectors as FAISS wants them: float32 (int8 values as floats) or packed uint8 bits."""
    import pyarrow.parquet as pq

    column = pq.read_table(out_dir / record["file"], columns=["embedding"]).column("embedding").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    if precision == "binary":
        return np.ascontiguousarray(values, dtype=np.uint8)
    if precision == "uint8":
        return values.astype(np.float32) - 128.0
    return np.ascontiguousarray(values, dtype=np.float32)


def _new_index(precision: str, kind: str, width: int, nlist: int, hnsw_m: int):
    faiss = _faiss()
    inner = faiss.METRIC_INNER_PRODUCT
    if precision == "binary":
        bits = width * 8
        if kind == "flat":
            return faiss.IndexBinaryFlat(bits)
        if kind == "ivf":
            return faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, nlist)
        return faiss.IndexBinaryHNSW(bits, hnsw_m)
    if precision in ("int8", "uint8"):
        codes = faiss.ScalarQuantizer.QT_8bit_direct_signed  # stores the int8 values themselves: exact products
        if kind == "flat":
            return faiss.IndexScalarQuantizer(width, codes, inner)
        if kind == "ivf":
            return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(width), width, nlist, codes, inner)
        return faiss.IndexHNSWSQ(width, codes, hnsw_m, inner)
    if kind == "flat":
        return faiss.IndexFlatIP(width)
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, nlist, inner)
    return faiss.IndexHNSWFlat(width, hnsw_m, inner)


def _set_search_options(index, settings: dict) -> None:
    if settings["kind"] == "ivf":
        index.nprobe = settings["nprobe"]
    elif settings["kind"] == "hnsw":
        index.hnsw.efSearch = settings["ef_search"]


def build_index(
    output_dir: str | os.PathLike,
    *,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 64,
    ef_construction: int = 80,
    query_instruction: str | None = None,
    train_size: int = 100_000,
) -> dict:
    """Build and save the FAISS index of an embed output folder; return its settings (``index.json``)."""
    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
    out_dir = Path(output_dir)
    manifest = read_manifest(out_dir)
    if not manifest.get("complete"):
        raise SearchIndexError(f"{out_dir} is not finished ({len(manifest['shards'])} of {manifest['planned_shards']} "
                          "shards): run the same `decoder2vec embed` command again to complete it")  # fmt: skip
    precision, width = manifest["settings"]["precision"], manifest["width"]
    rows = sum(r["rows"] for r in manifest["shards"])
    if nlist is None:
        nlist = max(1, min(int(4 * math.sqrt(rows)), rows // 39))  # FAISS wants >= 39 training points a cell
    index = _new_index(precision, kind, width, nlist, hnsw_m)
    if kind == "hnsw":
        index.hnsw.efConstruction = ef_construction
    if kind == "ivf":
        step = max(1, math.ceil(rows / train_size))  # an even sample over the whole corpus
        sample = np.concatenate(
            [_shard_vectors(out_dir, r, precision, width)[::step] for r in manifest["shards"]]
        )  # fmt: skip
        index.train(sample)
    elif not index.is_trained:
        index.train(_shard_vectors(out_dir, manifest["shards"][0], precision, width))  # direct codes: no statistics
    for record in manifest["shards"]:
        index.add(_shard_vectors(out_dir, record, precision, width))
    model_config = manifest["settings"]["model"].get("config", {})
    settings = {
        "kind": kind,
        "precision": precision,
        "metric": "hamming" if precision == "binary" else "inner_product",
        "width": width,
        "rows": rows,
        "nlist": nlist if kind == "ivf" else None,
        "nprobe": nprobe if kind == "ivf" else None,
        "hnsw_m": hnsw_m if kind == "hnsw" else None,
        "ef_search": ef_search if kind == "hnsw" else None,
        "query_instruction": query_instruction if query_instruction is not None
        else model_config.get("query_instruction"),
        "shards": [{"file": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in manifest["shards"]],
        "faiss": faiss.__version__,
    }  # fmt: skip
    tmp = out_dir / f".{INDEX_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (faiss.write_index_binary if precision == "binary" else faiss.write_index)(index, str(tmp / "index.faiss"))
    (tmp / "index.json").write_text(json.dumps(settings, indent=1) + "\n")
    final = out_dir / INDEX_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return settings


def load_index(output_dir: str | os.PathLike):
    """(FAISS index, its settings); raises SearchIndexError when missing or built from other shards."""
    faiss = _faiss()
    out_dir = Path(output_dir)
    folder = out_dir / INDEX_DIR
    if not (folder / "index.json").is_file():
        raise SearchIndexError(f"{out_dir} has no index: run `decoder2vec index {out_dir}` first")
    settings = json.loads((folder / "index.json").read_text())
    manifest = read_manifest(out_dir)
    built_from = [(s["file"], s["sha256"]) for s in settings["shards"]]
    if built_from != [(r["file"], r["sha256"]) for r in manifest["shards"]]:
        raise SearchIndexError(f"the index of {out_dir} was built from other shards: run `decoder2vec index` again")
    read = faiss.read_index_binary if settings["precision"] == "binary" else faiss.read_index
    index = read(str(folder / "index.faiss"))
    _set_search_options(index, settings)
    return index, settings


def search(
    output_dir: str | os.PathLike,
    queries: str | list[str],
    k: int = 10,
    *,
    encoder=None,
    instruction: str | None = None,
    device: str | None = None,
) -> list[list[dict]]:
    """The ``k`` best rows for each query: ``[{"id", "score", "text"}, ...]`` per query, best first.

    The queries are embedded with ``encoder`` (default: the model recorded in the manifest) using the index's
    query instruction unless ``instruction`` is given, then normalized, truncated and quantized as the corpus was.
    """
    out_dir = Path(output_dir)
    index, settings = load_index(out_dir)
    manifest = read_manifest(out_dir)
    if isinstance(queries, str):
        queries = [queries]
    if encoder is None:
        model = manifest["settings"]["model"]
        spec = EncoderSpec(model["source"], model["adapters"], model["dtype"], device, model["config"])
        encoder = spec.load()
    saved = manifest["settings"]
    vectors = encoder.encode(
        list(queries),
        instruction=instruction if instruction is not None else settings["query_instruction"],
        normalize=saved["normalize"],
        dimensions=saved["dimensions"],
        precision=saved["precision"],
    )
    scores, positions = search_vectors(index, settings, vectors, k)
    return [[dict(hit, score=float(s)) for hit, s in zip(_rows(out_dir, manifest, p), sc, strict=True)]
            for p, sc in zip(positions, scores, strict=True)]  # fmt: skip


def search_vectors(index, settings: dict, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the ``k`` best rows for each query vector (stored precision); -1 pads."""
    k = min(k, settings["rows"])
    if settings["precision"] == "binary":
        distances, positions = index.search(np.ascontiguousarray(vectors, dtype=np.uint8), k)
        return settings["width"] * 8 - 2 * distances.astype(np.float32), positions
    queries = vectors.astype(np.float32) - (128.0 if settings["precision"] == "uint8" else 0.0)
    return index.search(np.ascontiguousarray(queries), k)


def _rows(out_dir: Path, manifest: dict, positions) -> list[dict]:
    """Index positions -> {"id", "text"} from the shards (rows are added in manifest order)."""
    import pyarrow.parquet as pq

    starts = np.cumsum([0] + [r["rows"] for r in manifest["shards"]])
    found, tables = [], {}
    for position in positions:
        if position < 0:
            continue
        shard = int(np.searchsorted(starts, position, side="right") - 1)
        if shard not in tables:
            path = out_dir / manifest["shards"][shard]["file"]
            columns = [c for c in ("id", "text") if c in pq.read_schema(path).names]
            tables[shard] = pq.read_table(path, columns=columns)
        row = tables[shard].slice(int(position - starts[shard]), 1).to_pylist()[0]
        found.append({"id": row["id"], "text": row.get("text")})
    return found


# ---------------------------------------------------------------------- command line
def _index_command(args) -> None:
    settings = build_index(
        args.output_dir,
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_search=args.ef_search,
        query_instruction=args.query_instruction,
    )
    print(json.dumps({k: v for k, v in settings.items() if k != "shards"}))


def _search_command(args) -> None:
    results = search(args.output_dir, args.queries, args.k, instruction=args.instruction, device=args.device)
    if args.json:
        print(json.dumps([{"query": q, "hits": hits} for q, hits in zip(args.queries, results, strict=True)]))
        return
    for query, hits in zip(args.queries, results, strict=True):
        print(f"query: {query}")
        for rank, hit in enumerate(hits, 1):
            text = (hit["text"] or "").replace("\n", " ")
            print(f"{rank:3d}  {hit['score']:10.4f}  {hit['id']}  {text[:100]}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="build a FAISS index over the shards of `decoder2vec embed`")
    parser.add_argument("output_dir", help=f"an embed output folder (with {MANIFEST_NAME})")
    parser.add_argument("--kind", choices=INDEX_KINDS, default="flat", help="flat (exact) | ivf | hnsw")
    parser.add_argument("--nlist", type=int, default=None, help="ivf: cells (default: 4 * sqrt(rows))")
    parser.add_argument("--nprobe", type=int, default=16, help="ivf: cells visited per query")
    parser.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    parser.add_argument("--ef-search", type=int, default=64, help="hnsw: candidates kept per query")
    parser.add_argument("--query-instruction", default=None, help="instruction for queries (default: the model's)")
    parser.set_defaults(handler=_index_command)

    parser = subparsers.add_parser("search", help="search an indexed embed output folder")
    parser.add_argument("output_dir", help="an embed output folder with an index")
    parser.add_argument("queries", nargs="+", help="one or more queries")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--instruction", default=None, help="override the index's query instruction")
    parser.add_argument("--device", default=None, help="where the query encoder runs (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_search_command)
