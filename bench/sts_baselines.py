"""Untrained STS-B baselines: causal vs bidirectional attention x every pooling mode, one model.

Each attention mode runs the model once per input form (plain; with the EOS id appended, for
``last_token``) and pools the same hidden states every way, so the table costs a few passes.

    python bench/sts_baselines.py --model smollm2-135m --output results.jsonl   # STS-B test via decoder2vec.catalog
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from decoder2vec import POOLING_MODES, Encoder, pool
from decoder2vec.catalog import resolve_dataset
from decoder2vec.eval.common import cosine_scores
from decoder2vec.eval.sts import read_sts_tsv


@torch.inference_mode()
def embed_all_poolings(encoder: Encoder, texts: list[str], append_eos: bool, batch_size: int = 32):
    encoder.config.append_eos = append_eos
    features = encoder.tokenize(texts)
    out = {mode: np.zeros((len(texts), encoder.dim), dtype=np.float32) for mode in POOLING_MODES}
    order = sorted(range(len(texts)), key=lambda i: -len(features[i].input_ids))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = encoder.collate([features[i] for i in index])
        hidden = encoder.hidden_states(batch).float()
        for mode in POOLING_MODES:
            out[mode][index] = pool(hidden, batch["attention_mask"], batch["pool_mask"], mode).numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data",
        default=None,
        help="STS TSV (default: STS-B test from decoder2vec.catalog: $DECODER2VEC_DATA, else the hub)",
    )
    parser.add_argument("--output", default=None, help="also append each result as a JSON line here")
    args = parser.parse_args()
    pairs = read_sts_tsv(args.data or resolve_dataset("stsb", "test"))
    texts = list(dict.fromkeys(pairs.sentences1 + pairs.sentences2))
    where = {t: i for i, t in enumerate(texts)}
    left = [where[t] for t in pairs.sentences1]
    right = [where[t] for t in pairs.sentences2]
    results = []
    for bidirectional in (False, True):
        encoder = Encoder.from_pretrained(args.model, bidirectional=bidirectional)
        for append_eos in (False, True):
            start = time.perf_counter()
            vectors = embed_all_poolings(encoder, texts, append_eos)
            seconds = time.perf_counter() - start
            for mode, v in vectors.items():
                if append_eos and mode != "last_token":
                    continue
                rho = spearmanr(cosine_scores(v[left], v[right]), pairs.scores).statistic * 100
                row = {
                    "attention": "bidirectional" if bidirectional else "causal",
                    "pooling": mode,
                    "eos_appended": append_eos,
                    "spearman": round(float(rho), 2),
                    "pass_seconds": round(seconds, 1),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                if args.output:
                    with open(args.output, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
    print("\n| attention | pooling | STS-B test Spearman x100 |\n|---|---|---|")
    for row in results:
        name = row["pooling"] + (" (EOS id appended)" if row["eos_appended"] else "")
        print(f"| {row['attention']} | {name} | {row['spearman']:.2f} |")


if __name__ == "__main__":
    main()
