"""Encoding throughput on SmolLM2: decoder2vec against sentence-transformers, same model folder, same run.

Embeds the unique STS-B test sentences (fp32, batch 32) and prints sentences/s, tokens/s, peak RSS
and model-FLOPs utilization against the fp32 matrix-multiply peak measured at the start of the run,
then the same for sentence-transformers (Transformer + mean Pooling, plain text, no chat template)
and the ratio of the two throughputs.

    python bench/encode.py [--threads 2] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_dataset
from decoder2vec.eval.sts import read_sts_tsv
from decoder2vec.sources import resolve_source


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


def forward_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of one forward pass over sequences of these (unpadded) lengths, LM head excluded."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * (q_width + 2 * kv_width) + q_width * hidden + 3 * hidden * config.intermediate_size
    tokens = sum(lengths)
    linear = 2 * per_layer * layers * tokens
    attention = sum(2 * 2 * layers * q_width * n * n for n in lengths)  # scores and weighted values
    return float(linear + attention)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data",
        default=None,
        help="STS TSV (default: STS-B test from decoder2vec.catalog: $DECODER2VEC_DATA, else the hub)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N sentences (quick runs)")
    parser.add_argument("--repeats", type=int, default=1, help="time each side this many times, keep the best")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pairs = read_sts_tsv(args.data or resolve_dataset("stsb", "test"))
    sentences = pairs.sentences1 + pairs.sentences2
    sentences = sentences[: args.limit] if args.limit else sentences
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak ({args.threads} threads): {peak:.1f} GFLOP/s")

    folder = resolve_source(args.model)
    ours = Encoder.from_pretrained(folder, pooling="mean", dtype="float32", device="cpu")
    lengths = [len(f.input_ids) for f in ours.tokenize(sentences)]
    flops = forward_flops(ours.model.config, lengths)
    ours.encode(sentences[:64], batch_size=args.batch_size)  # warm-up
    our_seconds = timed(lambda: ours.encode(sentences, batch_size=args.batch_size), args.repeats)
    our_rss = peak_rss_mb()

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    # plain text: a "text" modality only, so the folder's chat template is not applied
    module = Transformer(
        folder,
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
    )
    theirs = SentenceTransformer(modules=[module, Pooling(module.get_embedding_dimension(), "mean")], device="cpu")
    tokenize = getattr(theirs, "preprocess", None) or theirs.tokenize
    their_lengths = [len(tokenize([s])["input_ids"][0]) for s in sentences[:200]]
    assert their_lengths == lengths[:200], "sentence-transformers tokenizes differently (chat template?)"
    theirs.encode(sentences[:64], batch_size=args.batch_size)  # warm-up
    their_seconds = timed(lambda: theirs.encode(sentences, batch_size=args.batch_size), args.repeats)

    # sanity: both sides compute the same causal mean embeddings
    ours.config.bidirectional = False
    from decoder2vec.attention import set_bidirectional

    set_bidirectional(ours.model, False)
    check = np.abs(ours.encode(sentences[:20]) - theirs.encode(sentences[:20])).max()

    rows = {
        "sentences": len(sentences),
        "tokens": sum(lengths),
        "matmul_peak_gflops": round(peak, 1),
        "decoder2vec": {
            "seconds": round(our_seconds, 2),
            "sentences_per_s": round(len(sentences) / our_seconds, 1),
            "tokens_per_s": round(sum(lengths) / our_seconds, 1),
            "gflops": round(flops / our_seconds / 1e9, 1),
            "mfu_percent": round(100 * flops / our_seconds / 1e9 / peak, 1),
            "peak_rss_mb": round(our_rss, 0),
        },
        "sentence_transformers": {
            "seconds": round(their_seconds, 2),
            "sentences_per_s": round(len(sentences) / their_seconds, 1),
            "mfu_percent": round(100 * flops / their_seconds / 1e9 / peak, 1),
        },
        "throughput_ratio_ours_over_theirs": round(their_seconds / our_seconds, 3),
        "max_abs_diff_causal_mean_vs_st": float(check),
    }
    d, s = rows["decoder2vec"], rows["sentence_transformers"]
    print(
        f"decoder2vec:           {d['sentences_per_s']} sentences/s, {d['tokens_per_s']} tokens/s, "
        f"{d['gflops']} GFLOP/s = {d['mfu_percent']}% of peak, peak RSS {d['peak_rss_mb']:.0f} MB"
    )
    print(f"sentence-transformers: {s['sentences_per_s']} sentences/s = {s['mfu_percent']}% of peak")
    print(f"ratio ours/theirs: {rows['throughput_ratio_ours_over_theirs']}  (target >= 1.0; MFU target >= 55%)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
