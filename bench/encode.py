"""Encoding throughput on the CPU: decoder2vec fp32, int8 and ONNX against sentence-transformers, in one run.

Embeds the STS-B test pairs (batch 32, mean pooling) and prints, per row: sentences/s, tokens/s, the throughput
ratio to decoder2vec fp32, model-FLOPs utilization against the fp32 matrix-multiply peak (and the share of the peak
that the model's own linear shapes reach alone), STS-B test Spearman (x100), the resident memory the loaded model
added, the same once every weight is in use ("all MB": after loading, every row of the token embedding table is
looked up; a memory-mapped float32 checkpoint is resident only where it was read, and a server meets most of the
vocabulary in time), and the peak RSS.

Every row has a process of its own (so each peak RSS is that row's alone), alive for the whole run: the rows load
one after the other; then, in each of ``--rounds`` rounds, the sentences are cut into ``--parts`` parts and the rows
take turns on each part (the order reversed from one part to the next), with both peaks measured again right before
fp32 on each part. Throughput is the best round's; a row's ratio to fp32 is the median of its ratios to fp32 on the
same part, and its share of the peak the median of its shares of the peak measured on that part: this machine's
speed drifts by up to 1.4x within a quarter of an hour, and only figures taken seconds apart compare.

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

    python bench/encode.py [--model smollm2-135m] [--threads 2] [--adapter DIR ...] [--limit N] [--rounds N] [--parts N]
        [--rows fp32 int8-torch ...] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

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
REPLY = "@@bench-encode "  # a row process's replies start with this (libraries may print to stdout too)


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
@dataclass
class LoadedRow:
    info: dict  # what loading measured: memory, the int8 kernel and float layers, the model's shapes
    encode: Callable[[list[str]], np.ndarray] | None  # sentences -> vectors
    sentences: list[str]  # the STS-B test pairs' first sentences, then their second ones
    lengths: list[int]  # tokens of each sentence
    config: object  # the model's Hugging Face configuration
    scores: list[float]  # the pairs' gold similarity


def load_row(args) -> LoadedRow:
    """Load the row's model in this process."""
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
            return LoadedRow({"row": args.row, "prepared": True}, None, sentences, [], None, scores)
        lengths = [len(f.input_ids) for f in encoder.tokenize(sentences)]
        config = encoder.model.config
        # onnxruntime reads every weight into memory as it loads: nothing more to page in
        embeddings = None if options.get("backend") == "onnx" else encoder.backbone.get_input_embeddings()
        encoder.encode(sentences[:64], batch_size=args.batch_size)  # warm-up (sentence-transformers: inside)

        def encode(texts):
            return encoder.encode(texts, batch_size=args.batch_size)

    loaded_rss = memory_mb("VmRSS")
    all_weights_rss = loaded_rss if embeddings is None else every_row_looked_up(embeddings)  # before encoding
    loaded = {
        "row": args.row,
        "tokens": sum(lengths),
        "sentences": len(sentences),
        "flops": forward_flops(config, lengths),
        "layer_shapes": layer_shapes(config),
        "mean_batch_tokens": round(sum(lengths) / -(-len(lengths) // args.batch_size)),
        "rss_after_load_mb": round(loaded_rss),
        "loaded_mb": round(loaded_rss - before_rss),  # the model (and its runtime's imports) in memory
        "all_weights_mb": round(all_weights_rss - before_rss),  # the same, once every embedding row was read
        **probe,
    }
    return LoadedRow(loaded, encode, sentences, lengths, config, scores)


def serve_row(args) -> None:
    """A row's process: load and report, then for each line ``encode I K`` read from stdin encode part I of the
    sentences cut into K parts and reply its seconds and model FLOPs; on ``quit``, reply the STS-B Spearman of the
    last vectors of every part and the peak RSS. Replies are single lines starting with ``REPLY``."""
    row = load_row(args)
    reply = lambda message: print(REPLY + json.dumps(message), flush=True)  # noqa: E731
    reply(row.info)
    vectors = {}
    for command in sys.stdin:
        if command.strip() == "quit":
            break
        part, parts = map(int, command.split()[1:])
        begin, end = part * len(row.sentences) // parts, (part + 1) * len(row.sentences) // parts
        start = time.perf_counter()
        vectors[part] = np.asarray(row.encode(row.sentences[begin:end]))
        seconds = time.perf_counter() - start
        reply({"seconds": seconds, "flops": forward_flops(row.config, row.lengths[begin:end])})
    last = {}
    if vectors and sorted(vectors) == list(range(len(vectors))):  # every part encoded: the whole set's vectors
        whole = np.concatenate([vectors[i] for i in sorted(vectors)])
        last["stsb_spearman"] = round(spearman(whole, len(row.scores), row.scores), 2)
    reply({**last, "peak_rss_mb": round(memory_mb("VmHWM"))})


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

    def encode(texts):
        return model.encode(texts, batch_size=args.batch_size)

    return encode, lengths, module.model.config, module.model.get_input_embeddings()


def every_row_looked_up(embeddings: torch.nn.Module, rows_at_once: int = 8192) -> float:
    """VmRSS (MB) once every row of the token embedding table has been looked up: the whole table resident."""
    with torch.inference_mode():
        for start in range(0, embeddings.num_embeddings, rows_at_once):
            embeddings(torch.arange(start, min(start + rows_at_once, embeddings.num_embeddings)))
    return memory_mb("VmRSS")


# ---------------------------------------------------------------------- the run: the rows side by side
class RowFailed(Exception):
    pass


def reference_row(row: str) -> str:
    """The row that another row is compared with: fp32, with the same adapters."""
    return "trained-fp32" if row.startswith("trained-") else "fp32"


def round_seconds(result: dict, rounds: int) -> list[float]:
    """A row's seconds for the whole set in each round: the sum of its parts."""
    return [sum(t["seconds"] for t in result["parts"] if t["round"] == k) for k in range(rounds)]


def share_of_peak(result: dict, peak: str) -> float | None:
    """The median over a row's parts of its GFLOP/s as a share (%) of ``peak`` (``peak`` or ``shapes_peak``), as
    measured on that part; None without a measured peak (no fp32 reference row)."""
    shares = [100 * t["flops"] / t["seconds"] / 1e9 / t[peak] for t in result["parts"] if t[peak]]
    return round(median(shares), 1) if shares else None


class RowProcess:
    """One row's process, alive for the whole run: it loads its model once, then encodes a part of the set when
    asked, so that the rows are timed on each part one right after the other."""

    def __init__(self, args, row: str, prepare: bool = False):
        command = [sys.executable, os.path.abspath(__file__), "--row", row, "--model", args.model]
        command += ["--threads", str(args.threads), "--batch-size", str(args.batch_size)]
        command += ["--data", args.data] if args.data else []
        command += ["--limit", str(args.limit)] if args.limit else []
        command += ["--adapter", *args.adapter] if args.adapter else []
        command += ["--prepare"] if prepare else []
        self.row, self.stderr = row, tempfile.TemporaryFile(mode="w+")  # a file: loading's progress bars
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.loaded = self._reply()

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.process.wait()  # it ended without replying: e.g. an export refused by its own check
        self.stderr.seek(0)
        error = self.stderr.read().strip()
        print(f"row {self.row} failed:\n{error[-4000:]}", file=sys.stderr)
        raise RowFailed(error.splitlines()[-1] if error else f"exit status {self.process.returncode}")

    def _ask(self, command: str) -> dict:
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # the process has ended: _reply says why
            pass
        return self._reply()

    def encode(self, part: int, parts: int) -> dict:
        return self._ask(f"encode {part} {parts}")

    def close(self) -> dict:
        last = self._ask("quit")
        self.process.wait()
        self.stderr.close()
        return last


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
    parser.add_argument("--rounds", type=int, default=3, help="encode the whole set this many times with every row")
    parser.add_argument(
        "--parts", type=int, default=4, help="cut the set into this many parts; the rows take turns part by part"
    )
    parser.add_argument("--output", default=None, help="also write the report to this file")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # run one row (a child process)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        serve_row(args)
        return

    rows = [r for r in args.rows if r not in TRAINED_ONLY]
    rows += [f"trained-{r}" for r in args.rows if ROWS[r] is not None] if args.adapter else []
    torch.set_num_threads(args.threads)
    lines = [
        f"# python bench/encode.py {' '.join(sys.argv[1:])}",
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f} at start",
    ]
    failed, processes = {}, {}
    for row in rows:  # exports into the cache, so that no timed row pays for one
        if row.removeprefix("trained-").startswith("onnx"):
            try:
                RowProcess(args, row, prepare=True).close()
            except RowFailed as error:
                failed[row] = {"row": row, "error": str(error)}
    for row in [r for r in rows if r not in failed]:  # loaded one after the other: each load measured alone
        try:
            processes[row] = RowProcess(args, row)
        except RowFailed as error:
            failed[row] = {"row": row, "error": str(error)}

    # Each round encodes the whole set with every row, part by part: on each part the rows take turns (the order
    # reversed from one part to the next), and the fp32 matmul peak (square, and the model's own linear shapes) is
    # measured right before each fp32 row. A ratio or a share of the peak then compares figures taken seconds
    # apart, not minutes: this machine's speed drifts by up to 1.4x within a quarter of an hour.
    shapes = next((p.loaded for p in processes.values() if "layer_shapes" in p.loaded), None)
    timings = {row: [] for row in processes}
    step = 0
    for round_ in range(args.rounds):
        for part in range(args.parts):
            part_peaks = {}  # reference row -> (square peak, shapes peak), measured right before it
            for row in list(processes)[:: 1 if step % 2 == 0 else -1]:
                if row in ("fp32", "trained-fp32"):
                    part_peaks[row] = (
                        matmul_peak_gflops(seconds=1.5),
                        shapes_peak_gflops(shapes["layer_shapes"], shapes["mean_batch_tokens"], seconds=1.5),
                    )
                try:
                    timings[row].append({**processes[row].encode(part, args.parts), "round": round_, "part": part})
                except RowFailed as error:
                    failed[row] = {"row": row, "error": str(error)}
                    del processes[row], timings[row]
            for row, steps in timings.items():  # every row of this step gets its reference's peaks
                square, own = part_peaks.get(reference_row(row), (None, None))
                steps[-1].update(peak=square, shapes_peak=own)
            step += 1
    results = [{**processes[row].loaded, **processes[row].close(), "parts": timings[row]} for row in processes]

    by_row = {r["row"]: r for r in results}
    for r in results:
        best = min(round_seconds(r, args.rounds))
        reference = by_row.get(reference_row(r["row"]))
        r.update(
            seconds=round(best, 2),
            sentences_per_s=round(r["sentences"] / best, 1),
            tokens_per_s=round(r["tokens"] / best, 1),
            gflops=round(r["flops"] / best / 1e9, 1),
            mfu_percent=share_of_peak(r, "peak"),
            of_shapes_peak_percent=share_of_peak(r, "shapes_peak"),
        )
        # the row against fp32 on the same part, a few seconds apart; the median over every part of every round
        per_part = (
            [f["seconds"] / t["seconds"] for f, t in zip(reference["parts"], r["parts"], strict=True)]
            if reference
            else []
        )
        r["part_ratios"] = [round(x, 3) for x in per_part]
        r["ratio_to_fp32"] = round(median(per_part), 3) if reference else None
        r["best_round_ratio"] = round(min(round_seconds(reference, args.rounds)) / best, 3) if reference else None
        r["stsb_minus_fp32"] = round(r["stsb_spearman"] - reference["stsb_spearman"], 2) if reference else None

    peaks = [t["peak"] for r in results if r["row"] == reference_row(r["row"]) for t in r["parts"]]
    shapes_peaks = [t["shapes_peak"] for r in results if r["row"] == reference_row(r["row"]) for t in r["parts"]]
    if peaks:
        lines.append(
            f"fp32 matmul peak ({args.threads} threads), measured right before each fp32 row on each part: median "
            f"{median(peaks):.1f} GFLOP/s (range {min(peaks):.1f}-{max(peaks):.1f}); the model's own linear shapes "
            f"({shapes['mean_batch_tokens']} tokens, an average batch): median {median(shapes_peaks):.1f} GFLOP/s"
        )
    header = (
        f"{'row':<28}{'sent/s':>9}{'ratio':>8}{'MFU %':>8}{'STS-B':>8}{'dSTS':>7}{'load MB':>9}{'all MB':>8}"
        f"{'peak RSS':>10}"
    )
    lines += [header, "-" * len(header)]
    lines += [f"{r['row']:<28}failed: {r['error']}" for r in failed.values()]
    for r in results:
        lines.append(
            f"{r['row']:<28}{r['sentences_per_s']:>9}{r['ratio_to_fp32'] or '':>8}{r['mfu_percent'] or '':>8}"
            f"{r['stsb_spearman']:>8}{r['stsb_minus_fp32'] if r['stsb_minus_fp32'] is not None else '':>7}"
            f"{r['loaded_mb']:>9}{r['all_weights_mb']:>8}{r['peak_rss_mb']:>10}"
        )
    lines.append(
        f"sent/s: the best of {args.rounds} rounds; ratio: the median over the {args.rounds} x {args.parts} parts of "
        "the row's speed against fp32's on the same part (best round against best round: below); MFU: the median "
        "over parts against the peak measured right before fp32 on that part"
    )
    lines += [
        f"{r['row']}: best round against best round {r['best_round_ratio']}; ratio per part "
        + " ".join(map(str, r["part_ratios"]))
        for r in results
        if r["row"] != reference_row(r["row"]) and r["part_ratios"]
    ]
    for r in [r for r in results if "int8_kernel" in r]:
        kept = r["float_layers"]
        lines.append(
            f"{r['row']}: {r['int8_kernel']}; {len(kept)} layer(s) kept in float32{': ' if kept else ''}"
            + ", ".join(kept)
            + (f"; probe min cosine {r['probe_min_cosine']}" if "probe_min_cosine" in r else "")
        )
    lines += [
        f"{r['row']}: {r['of_shapes_peak_percent']} % of the model's shapes' peak (median over parts)"
        for r in results
        if r["row"].endswith("fp32") and r["of_shapes_peak_percent"] is not None
    ]
    lines.append("targets: int8 ratio >= 1.8 with |dSTS| <= 1; onnx-fp32 ratio >= 1.0 (sentence-transformers: causal)")
    summary = {"matmul_peak_gflops": peaks and round(median(peaks), 1)}
    summary["shapes_peak_gflops"] = shapes_peaks and round(median(shapes_peaks), 1)
    lines.append(json.dumps({**summary, "rows": results, "failed": list(failed.values())}))
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
