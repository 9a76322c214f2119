"""Encoding throughput on the CPU: decoder2vec fp32, int8 and ONNX against sentence-transformers, in one run.

Embeds the STS-B test pairs (batch 32, mean pooling) once per row and prints, per row: sentences/s, tokens/s,
the throughput ratio to decoder2vec fp32, model-FLOPs utilization against the fp32 matrix-multiply peak
measured at the start (and the share of the peak that the model's own linear shapes reach alone, measured at the
end), STS-B test Spearman (x100), the resident memory the loaded model added, the same once every weight is in use
("all MB": after loading, every row of the token embedding table is looked up; a memory-mapped float32 checkpoint
is resident only where it was read, and a server meets most of the vocabulary in time), and the peak RSS. Every
row runs in a fresh process of its own, one after the other, so each peak RSS is that row's alone.

Rows: ``fp32`` (decoder2vec, PyTorch), ``sentence-transformers`` (the same folder read by sentence-transformers'
stock Transformer + mean Pooling: causal, plain text), ``int8-torch`` (PyTorch dynamic int8),
``onnx-fp32`` and ``onnx-int8`` (onnxruntime; exported once into the cache before the timed rows);
``int8-torch-unchecked`` is ``int8-torch`` with every layer in int8 (none kept in float32) and its probe check
reported (``probe_min_cosine``) instead of enforced, to measure a model that the check refuses;
``int8-torch-x86`` is ``int8-torch`` on PyTorch's x86 engine (``DECODER2VEC_INT8_ENGINE=x86``) whatever the CPU,
to compare engines in one run. Each int8-torch row reports its engine, weight range and the layers it kept in
float32 (``decoder2vec.int8``).
With ``--adapter``, every decoder2vec row is run again with the trained adapters merged (``trained-*``), and
``trained-fp32-live-adapter`` runs the last adapter unmerged (PEFT's LoRA layers), as loading did before merging.
Targets (issue 13): int8 >= 1.8x fp32 with STS-B within 1 point; ONNX fp32 >= 1.0x fp32.

    python bench/encode.py [--model smollm2-135m] [--threads 2] [--adapter DIR ...] [--limit N] [--rounds N]
        [--rows fp32 int8-torch ...] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

ROWS = {  # row -> Encoder.from_pretrained options (None: sentence-transformers)
    "fp32": {"backend": "torch"},
    "sentence-transformers": None,
    "int8-torch": {"quantize": "int8", "backend": "torch"},
    "int8-torch-unchecked": {"quantize": "int8", "backend": "torch"},  # probe check reported, not enforced
    "int8-torch-x86": {"quantize": "int8", "backend": "torch"},  # with ROW_ENVIRONMENT's engine
    "onnx-fp32": {"backend": "onnx"},
    "onnx-int8": {"quantize": "int8", "backend": "onnx"},
    "fp32-live-adapter": {"backend": "torch", "merge_adapters": False},  # trained only: the adapter unmerged
}
TRAINED_ONLY = {"fp32-live-adapter"}
ROW_ENVIRONMENT = {"int8-torch-x86": {"DECODER2VEC_INT8_ENGINE": "x86"}}  # set in the row's process before loading


def matmul_peak_gflops(size: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 GEMM rate over a few seconds of square multiplies."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    mlp = config.intermediate_size
    return [(hidden, q_width), (hidden, kv_width), (hidden, kv_width), (q_width, hidden)] + [
        (hidden, mlp),
        (hidden, mlp),
        (mlp, hidden),
    ]


def shapes_peak_gflops(shapes: list[tuple[int, int]], tokens: int, seconds: float = 3.0) -> float:
    """Best fp32 rate of one decoder layer's linear layers alone, on ``tokens`` rows (an average batch): the most
    that the model's own matrix shapes let this CPU do, below the square peak when the shapes are small."""
    layers = [(torch.randn(tokens, i), torch.randn(o, i)) for i, o in shapes]
    flops = sum(2 * tokens * w.shape[0] * w.shape[1] for _, w in layers)
    run = lambda: [torch.nn.functional.linear(x, w) for x, w in layers]  # noqa: E731
    run()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def forward_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of one forward pass over sequences of these (unpadded) lengths, LM head excluded."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    per_layer = sum(i * o for i, o in layer_shapes(config))
    tokens = sum(lengths)
    linear = 2 * per_layer * layers * tokens
    attention = sum(2 * 2 * layers * q_width * n * n for n in lengths)  # scores and weighted values
    return float(linear + attention)


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def load_pairs(args):
    from decoder2vec.catalog import resolve_dataset
    from decoder2vec.eval.sts import read_sts_tsv

    pairs = read_sts_tsv(args.data or resolve_dataset("stsb", "test"))
    n = args.limit or len(pairs.scores)
    return pairs.sentences1[:n], pairs.sentences2[:n], pairs.scores[:n]


def spearman(vectors: np.ndarray, n: int, scores) -> float:
    from scipy.stats import spearmanr

    a, b = vectors[:n], vectors[n:]
    cosine = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(100 * spearmanr(cosine, scores).statistic)


# ---------------------------------------------------------------------- one row, in its own process
def run_row(args) -> dict:
    from decoder2vec import Encoder
    from decoder2vec.sources import resolve_source

    torch.set_num_threads(args.threads)
    first, second, scores = load_pairs(args)
    sentences = first + second
    folder = resolve_source(args.model)
    before_rss = memory_mb("VmRSS")  # torch, transformers and decoder2vec imported; no model yet
    trained = args.row.startswith("trained-")
    options = ROWS[args.row.removeprefix("trained-")]
    adapter = args.adapter if trained else None
    probe = {}
    if options is None:
        encode, lengths, config, embeddings = _sentence_transformers(folder, sentences, args)
    else:
        os.environ.update(ROW_ENVIRONMENT.get(args.row.removeprefix("trained-"), {}))
        if args.row.endswith("-unchecked"):  # speed and STS-B of an int8 model the probe check would refuse
            import decoder2vec.int8 as int8_module
            from decoder2vec.eval.common import cosine_scores

            def report_only(float_vectors, int8_vectors, what, float_layers=None):
                probe["probe_min_cosine"] = round(float(cosine_scores(int8_vectors, float_vectors).min()), 4)
                return probe["probe_min_cosine"]

            int8_module.check_int8 = report_only
            int8_module.INT8_MIN_COSINE = -1.0  # every calibration vector passes: no layer is kept in float32
        encoder = Encoder.from_pretrained(folder, adapter=adapter, pooling="mean", device="cpu", **options)
        if options.get("quantize") and options.get("backend") == "torch":
            from decoder2vec.int8 import int8_kernel

            kernel = int8_kernel()
            probe["int8_kernel"] = f"{kernel.engine}, weights in [-{kernel.weight_max}, {kernel.weight_max}]"
            probe["float_layers"] = encoder.float_layers
        if args.prepare:  # the ONNX export into the cache happens here, outside the timed rows
            return {"row": args.row, "prepared": True}
        lengths = [len(f.input_ids) for f in encoder.tokenize(sentences)]
        config = encoder.model.config
        # onnxruntime reads every weight into memory as it loads: nothing more to page in
        embeddings = None if options.get("backend") == "onnx" else encoder.backbone.get_input_embeddings()

        def encode():
            return encoder.encode(sentences, batch_size=args.batch_size)

    loaded_rss = memory_mb("VmRSS")
    all_weights_rss = loaded_rss if embeddings is None else every_row_looked_up(embeddings)  # before encoding
    if options is not None:
        encoder.encode(sentences[:64], batch_size=args.batch_size)  # warm-up (sentence-transformers: above)
    seconds, vectors = timed(encode, args.repeats)
    flops = forward_flops(config, lengths)
    return {
        "row": args.row,
        "seconds": round(seconds, 2),
        "sentences_per_s": round(len(sentences) / seconds, 1),
        "tokens_per_s": round(sum(lengths) / seconds, 1),
        "gflops": round(flops / seconds / 1e9, 1),
        "layer_shapes": layer_shapes(config),
        "mean_batch_tokens": round(sum(lengths) / -(-len(lengths) // args.batch_size)),
        "stsb_spearman": round(spearman(np.asarray(vectors), len(first), scores), 2),
        "rss_after_load_mb": round(loaded_rss),
        "loaded_mb": round(loaded_rss - before_rss),  # the model (and its runtime's imports) in memory
        "all_weights_mb": round(all_weights_rss - before_rss),  # the same, once every embedding row was read
        "peak_rss_mb": round(memory_mb("VmHWM")),
        **probe,
    }


def _sentence_transformers(folder: str, sentences: list[str], args):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    # plain text: a "text" modality only, so the folder's chat template is not applied
    module = Transformer(
        folder,
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )
    model = SentenceTransformer(modules=[module, Pooling(module.get_embedding_dimension(), "mean")], device="cpu")
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    lengths = [len(tokenize([s])["input_ids"][0]) for s in sentences]
    model.encode(sentences[:64], batch_size=args.batch_size)  # warm-up

    def encode():
        return model.encode(sentences, batch_size=args.batch_size)

    return encode, lengths, module.model.config, module.model.get_input_embeddings()


def every_row_looked_up(embeddings: torch.nn.Module, rows_at_once: int = 8192) -> float:
    """VmRSS (MB) once every row of the token embedding table has been looked up: the whole table resident."""
    with torch.inference_mode():
        for start in range(0, embeddings.num_embeddings, rows_at_once):
            embeddings(torch.arange(start, min(start + rows_at_once, embeddings.num_embeddings)))
    return memory_mb("VmRSS")


# ---------------------------------------------------------------------- the run: every row, one by one
def child(args, row: str, prepare: bool = False) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--row", row, "--model", args.model]
    command += ["--threads", str(args.threads), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    command += ["--data", args.data] if args.data else []
    command += ["--limit", str(args.limit)] if args.limit else []
    command += ["--adapter", *args.adapter] if args.adapter else []
    command += ["--prepare"] if prepare else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # e.g. an export refused by its own check: the report says why, the other rows run
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        print(f"row {row} failed:\n{done.stderr[-4000:]}", file=sys.stderr)
        return {"row": row, "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="short name, folder or hub id")
    parser.add_argument(
        "--data",
        default=None,
        help="STS TSV (default: STS-B test from decoder2vec.catalog: $DECODER2VEC_DATA, else the hub)",
    )
    parser.add_argument("--adapter", nargs="+", default=None, help="trained adapters: adds the trained-* rows")
    default_rows = [r for r in ROWS if r not in ("int8-torch-unchecked", "int8-torch-x86")]  # those on demand
    parser.add_argument("--rows", nargs="+", default=default_rows, help=f"rows (default: {' '.join(default_rows)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs (quick runs)")
    parser.add_argument("--repeats", type=int, default=1, help="time each row this many times, keep the best")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run all the rows this many times in turn, keep the best"
    )
    parser.add_argument("--output", default=None, help="also write the report to this file")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # run one row (a child process)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args)))
        return

    rows = [r for r in args.rows if r not in TRAINED_ONLY]
    rows += [f"trained-{r}" for r in args.rows if ROWS[r] is not None] if args.adapter else []
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    lines = [
        f"# python bench/encode.py {' '.join(sys.argv[1:])}",
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f} at start",
        f"fp32 matmul peak ({args.threads} threads): {peak:.1f} GFLOP/s",
    ]
    failed = {}
    for row in rows:  # exports into the cache, so that no timed row pays for one
        if row.removeprefix("trained-").startswith("onnx"):
            prepared = child(args, row, prepare=True)
            if "error" in prepared:
                failed[row] = prepared
    results = [failed.get(row) or child(args, row) for row in rows]
    for _ in range(args.rounds - 1):  # the rows again, in turn, so that a busy spell of a shared machine hits all
        again = [failed.get(row) or child(args, row) for row in rows]
        results = [max(r, a, key=lambda x: x.get("sentences_per_s", 0)) for r, a in zip(results, again, strict=True)]
    header = (
        f"{'row':<28}{'sent/s':>9}{'ratio':>8}{'MFU %':>8}{'STS-B':>8}{'dSTS':>7}{'load MB':>9}{'all MB':>8}"
        f"{'peak RSS':>10}"
    )
    lines += [header, "-" * len(header)]
    for r in [r for r in results if "error" in r]:
        lines.append(f"{r['row']:<28}failed: {r['error']}")
    results = [r for r in results if "error" not in r]
    fp32 = next((r for r in results if r["row"] == "fp32"), None)
    shapes_peak = shapes_peak_gflops(fp32["layer_shapes"], fp32["mean_batch_tokens"]) if fp32 else None
    if shapes_peak:
        lines.insert(
            3,
            f"fp32 peak of the model's own linear shapes ({fp32['mean_batch_tokens']} tokens, an average batch): "
            f"{shapes_peak:.1f} GFLOP/s ({100 * shapes_peak / peak:.0f} % of the square peak)",
        )
    for r in results:
        reference = next(
            (x for x in results if x["row"] == ("trained-fp32" if "trained" in r["row"] else "fp32")), None
        )
        r["ratio_to_fp32"] = round(r["sentences_per_s"] / reference["sentences_per_s"], 3) if reference else None
        r["stsb_minus_fp32"] = round(r["stsb_spearman"] - reference["stsb_spearman"], 2) if reference else None
        r["mfu_percent"] = round(100 * r["gflops"] / peak, 1)
        r["of_shapes_peak_percent"] = round(100 * r["gflops"] / shapes_peak, 1) if shapes_peak else None
        lines.append(
            f"{r['row']:<28}{r['sentences_per_s']:>9}{r['ratio_to_fp32'] or '':>8}{r['mfu_percent']:>8}"
            f"{r['stsb_spearman']:>8}{r['stsb_minus_fp32'] if r['stsb_minus_fp32'] is not None else '':>7}"
            f"{r['loaded_mb']:>9}{r['all_weights_mb']:>8}{r['peak_rss_mb']:>10}"
        )
    for r in [r for r in results if "int8_kernel" in r]:
        kept = r["float_layers"]
        lines.append(
            f"{r['row']}: {r['int8_kernel']}; {len(kept)} layer(s) kept in float32{': ' if kept else ''}"
            + ", ".join(kept)
            + (f"; probe min cosine {r['probe_min_cosine']}" if "probe_min_cosine" in r else "")
        )
    lines += [
        f"{r['row']}: {r['of_shapes_peak_percent']} % of the model's shapes' peak"
        for r in results
        if r["of_shapes_peak_percent"] is not None and r["row"].endswith("fp32")
    ]
    lines.append("targets: int8 ratio >= 1.8 with |dSTS| <= 1; onnx-fp32 ratio >= 1.0 (sentence-transformers: causal)")
    summary = {"matmul_peak_gflops": round(peak, 1), "shapes_peak_gflops": shapes_peak and round(shapes_peak, 1)}
    lines.append(json.dumps({**summary, "rows": results, "failed": list(failed.values())}))
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
