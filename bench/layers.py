"""Which decoder layer to pool: STS-B dev and TREC scores of every layer's mean-pooled states, from one pass.

Each text is run through the model once with every layer's hidden states kept; each layer (optionally passed
through the model's final norm) is then scored as if it were the encoder's output. STS-B **dev** is what a
choice may be made on; TREC (test accuracy, logistic regression as in ``decoder2vec eval``) is shown to see
what a choice costs or wins elsewhere.

    DECODER2VEC_DATA=<data folder> python bench/layers.py --model gemma3-270m [--adapter RUN/seed-0/final]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from decoder2vec import Encoder
from decoder2vec.catalog import resolve_file
from decoder2vec.eval.classification import ClassificationEvaluator, read_labelled_texts
from decoder2vec.eval.sts import STSEvaluator, read_sts_tsv
from decoder2vec.pooling import pool


class _Cached:
    """An object with ``encode`` that returns one layer's vectors, computed beforehand, by text."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows

    def encode(self, texts, **_):
        return np.stack([self.rows[t] for t in texts])


@torch.inference_mode()
def layer_vectors(encoder: Encoder, texts: list[str], batch_size: int) -> dict[bool, np.ndarray]:
    """{final norm applied: (layers + 1, len(texts), dim)}: mean-pooled states after the embeddings and every layer.

    The last entry of a transformers model's ``hidden_states`` has the final norm already; for the others the
    pooled vectors are computed both from the raw residual stream and after the model's final norm.
    """
    features = encoder.tokenize(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(features[i].input_ids))
    out: dict[bool, np.ndarray] = {}
    norm = encoder.backbone.norm
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = encoder.collate([features[i] for i in chosen])
        states = encoder.hidden_states(batch, every_layer=True)
        for final_norm in (False, True):
            vectors = out.setdefault(final_norm, np.zeros((len(states), len(texts), encoder.dim), dtype=np.float32))
            for layer, hidden in enumerate(states):
                if final_norm and layer < len(states) - 1:
                    hidden = norm(hidden)
                pooled = pool(hidden.float(), batch["attention_mask"], batch["pool_mask"], encoder.config.pooling)
                vectors[layer, chosen] = pooled.numpy()
        if (start // batch_size) % 50 == 0:
            print(f"#   {start + len(chosen)} / {len(texts)} texts", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--trec-layers", default="", help="layers to score on TREC too (comma list; slow: a classifier fit each)"
    )
    parser.add_argument("--save", default=None, help="write the vectors to this .npz (texts, raw, normed)")
    parser.add_argument("--load", default=None, help="score vectors saved by --save instead of running the model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sts = read_sts_tsv(resolve_file("sts/stsb_dev.tsv"))
    texts = sorted(set(sts.sentences1) | set(sts.sentences2))
    train = read_labelled_texts(resolve_file("classification/trec_train.label"), encoding="latin-1")
    test = read_labelled_texts(resolve_file("classification/trec_test.label"), encoding="latin-1")
    texts = sorted(set(texts) | set(train.texts) | set(test.texts))
    print(f"# {args.model} adapter={args.adapter} texts={len(texts)}", flush=True)
    if args.load:
        saved = np.load(args.load)
        if list(saved["texts"]) != texts:
            raise SystemExit(f"{args.load} holds other texts")
        both = {False: saved["raw"], True: saved["normed"]}
    else:
        encoder = Encoder.from_pretrained(args.model, adapter=args.adapter)
        start = time.perf_counter()
        both = layer_vectors(encoder, texts, args.batch_size)
        print(f"# one pass: {time.perf_counter() - start:.0f} s", flush=True)
        if args.save:
            np.savez(args.save, texts=np.array(texts), raw=both[False], normed=both[True])
    trec_layers = {int(x) for x in args.trec_layers.split(",") if x}
    for final_norm, vectors in sorted(both.items(), reverse=True):  # normed first
        for layer in range(vectors.shape[0]):
            cached = _Cached(dict(zip(texts, vectors[layer], strict=True)))
            row = {"layer": layer, "final_norm": final_norm, "stsb_dev": STSEvaluator(sts)(cached)["spearman"]}
            if layer in trec_layers:
                row["trec"] = ClassificationEvaluator(train, test)(cached)["accuracy"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
