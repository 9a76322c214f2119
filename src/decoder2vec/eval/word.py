"""Word-level evaluation: a linear probe on frozen token states for POS tagging, chunking and NER (CoNLL-2003).

The LLM2Vec paper's word-level protocol. Each sentence is the words joined by single spaces and goes through the
same forward pass as :meth:`Encoder.encode` (tokenizer, instruction, bidirectional or causal attention, adapters);
the last hidden states of its tokens are kept once per file (see :func:`token_states`). A word's vector comes from
the tokens whose character offsets overlap the word (``word_pooling``):

- ``mean`` (default): the mean of the word's sub-token states;
- ``first`` / ``last``: the state of its first / last sub-token;
- ``previous``: the state of the token *before* the word's first token, MNTP's shift (the LLM2Vec reference's
  ``next_token`` labels: a model trained with masked next-token prediction predicts token i at position i - 1).
  A sentence's first word reads the token before it when there is one (the BOS token, or the instruction's last
  token); with neither it falls back to the word's own first token.

A linear softmax classifier (cross-entropy, AdamW, on standardized vectors) is trained on ``train``; the epoch
with the best ``dev`` score is kept (model selection) and scored on ``test``. Metrics (x100): ``accuracy`` over
words and, for IOB2 tag columns, entity-level micro ``precision`` / ``recall`` / ``f1`` (conlleval's rules, see
:func:`iob2_spans`); the primary metric is ``f1`` for NER and ``accuracy`` for POS and chunks. The probe against
scikit-learn's LogisticRegression (time and accuracy on the same vectors): ``bench/word_tasks.py
--compare-classifiers``.

Files: CoNLL-2003, one word a line with 4 columns ``word POS chunk NER``, a blank line between sentences,
``-DOCSTART-`` lines skipped (:func:`read_conll`). Bad input: a line without 4 columns is an error naming the
file and line; a sentence longer than ``max_length`` tokens is an error naming the file and line (raise
``max_length``); a dev/test tag that never occurs in train cannot be predicted, so its words count as errors and
``unseen_tag_words`` in the metrics says how many there were (a warning is logged).

Example::

    from decoder2vec.eval.word import WordEvaluator, read_conll

    train, dev, test = (read_conll(f"conll2003/{split}.txt") for split in ("train", "dev", "test"))
    WordEvaluator(train, dev, test, column="ner")(encoder)  # {'f1': ..., 'accuracy': ..., ...}
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import read_text

__all__ = [
    "COLUMNS",
    "WORD_POOLING",
    "ConllSentences",
    "TokenStates",
    "WordEvaluator",
    "clear_state_cache",
    "entity_scores",
    "iob2_spans",
    "read_conll",
    "token_states",
    "train_probe",
    "word_vectors",
]

logger = logging.getLogger(__name__)

WORD_POOLING = ("mean", "first", "last", "previous")
COLUMNS = {"pos": 1, "chunk": 2, "ner": 3}  # the tag columns of a CoNLL-2003 line (word is column 0)


@dataclass
class ConllSentences:
    """Sentences of a CoNLL-2003 file: parallel lists, one entry a sentence (``tasks.subsample`` can sample it)."""

    words: list[list[str]]
    pos: list[list[str]]
    chunk: list[list[str]]
    ner: list[list[str]]
    locations: list[str]  # "file:line" of each sentence's first word, for error messages

    def __len__(self) -> int:
        return len(self.words)

    def tags(self, column: str) -> list[list[str]]:
        if column not in COLUMNS:
            raise ValueError(f"unknown tag column {column!r}; choose one of: {', '.join(COLUMNS)}")
        return getattr(self, column)


def read_conll(path: str | Path, encoding: str = "utf-8") -> ConllSentences:
    """The sentences of a CoNLL-2003 file (``word POS chunk NER`` a line, blank lines between sentences)."""
    data = ConllSentences([], [], [], [], [])
    sentence: list[list[str]] = []
    start = 0

    def finish():
        if sentence:
            columns = list(zip(*sentence, strict=True))
            for target, values in zip((data.words, data.pos, data.chunk, data.ner), columns, strict=True):
                target.append(list(values))
            data.locations.append(f"{path}:{start}")
            sentence.clear()

    for number, line in enumerate(read_text(path, "CoNLL file", encoding).splitlines(), start=1):
        fields = line.split()
        if not fields:
            finish()
            continue
        if fields[0] == "-DOCSTART-":  # a document marker, not a word
            finish()
            continue
        if len(fields) != 4:
            raise ValueError(
                f"{path}:{number}: {len(fields)} column(s) in {line[:80]!r}; a CoNLL-2003 line has 4 separated by "
                "spaces, word POS chunk NER, and a blank line ends a sentence"
            )
        if not sentence:
            start = number
        sentence.append(fields)
    finish()
    if not data.words:
        raise ValueError(f"{path} has no sentences; expected CoNLL-2003 lines 'word POS chunk NER'")
    return data


# ---------------------------------------------------------------------- token states
@dataclass
class TokenStates:
    """Last hidden states of every token of every sentence of a file, and where each word's tokens are.

    ``states`` is (total_tokens, dim) float16 (a linear probe does not need more, and it halves the memory);
    per word, in sentence order, ``first`` / ``last`` are the global rows of its first and last sub-token and
    ``previous`` the row of the token before it (see the module docstring for a sentence's first word).
    """

    states: np.ndarray  # (total_tokens, dim) float16
    first: np.ndarray  # (total_words,) int64
    last: np.ndarray  # (total_words,) int64
    previous: np.ndarray  # (total_words,) int64
    seconds: float = 0.0  # time the forward passes took

    @property
    def num_words(self) -> int:
        return len(self.first)


def _word_token_spans(offsets, words: list[str], text_start: int, location: str) -> list[tuple[int, int]]:
    """(first, last) token index of each word: the tokens whose character span overlaps the word's span."""
    begins = np.array([b for b, _ in offsets])
    ends = np.array([e for _, e in offsets])
    real = ends > begins  # special tokens have empty spans
    spans, position = [], text_start
    for word in words:
        start, end = position, position + len(word)
        position = end + 1  # the single space between words
        overlapping = np.flatnonzero(real & (begins < end) & (ends > start))
        if len(overlapping) == 0:
            raise RuntimeError(f"{location}: no token covers the word {word!r}; the tokenizer's offsets are broken")
        spans.append((int(overlapping[0]), int(overlapping[-1])))
    return spans


def token_states(
    encoder,
    sentences: ConllSentences,
    *,
    instruction: str | None = None,
    batch_size: int = 32,
    show_progress: bool | None = None,
) -> TokenStates:
    """Run every sentence through ``encoder``'s backbone, as ``encode`` does, and keep its tokens' last states.

    The token ids come from ``encoder.tokenize`` (the ids ``encode`` uses, EOS appended when the encoder is
    configured so); the tokenizer's offsets, computed with the same arguments, map tokens to words. A sentence
    longer than ``encoder.config.max_length`` tokens is an error (``encode`` would cut it and drop words).
    """
    config = encoder.config
    texts = [" ".join(words) for words in sentences.words]
    features = encoder.tokenize(texts, instruction)
    prefix = config.instruction_template.format(instruction=instruction) if instruction else ""
    encoded = encoder.tokenizer(
        [prefix + text for text in texts],
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_attention_mask=False,
        split_special_tokens=True,
    )
    word_spans = []
    for index, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)):
        location = sentences.locations[index]
        total = len(ids) + (1 if config.adds_eos else 0)
        if total > config.max_length:
            raise ValueError(
                f"{location}: the sentence of {len(texts[index].split())} words needs {total} tokens, more than "
                f"max_length={config.max_length}; raise max_length (--max-length) or split the sentence"
            )
        if list(features[index].input_ids[: len(ids)]) != list(ids):
            raise RuntimeError(f"{location}: token ids differ from encoder.tokenize; the tokenizer is not stable")
        word_spans.append(_word_token_spans(offsets, sentences.words[index], len(prefix), location))

    order = sorted(range(len(texts)), key=lambda i: -len(features[i].input_ids))
    rows = np.cumsum([0] + [len(f.input_ids) for f in features])  # first global row of each sentence
    states = np.empty((int(rows[-1]), encoder.dim), dtype=np.float16)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    show_progress = len(batches) > 8 if show_progress is None else show_progress
    progress = tqdm(batches, desc="token states", unit="batch", disable=not show_progress)
    start_time = time.perf_counter()
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            for chosen in progress:
                batch = encoder.collate([features[i] for i in chosen])
                hidden = encoder.hidden_states(batch).float().cpu().numpy()  # (batch, seq, dim)
                width = hidden.shape[1]
                for row, i in enumerate(chosen):
                    length = len(features[i].input_ids)
                    left = width - length if config.padding_side == "left" else 0
                    states[rows[i] : rows[i] + length] = hidden[row, left : left + length]
    finally:
        encoder.train(was_training)
    first, last, previous = [], [], []
    for i, spans in enumerate(word_spans):
        for word_first, word_last in spans:
            first.append(rows[i] + word_first)
            last.append(rows[i] + word_last)
            previous.append(rows[i] + (word_first - 1 if word_first > 0 else word_first))
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return TokenStates(
        states, as_array(first), as_array(last), as_array(previous), seconds=time.perf_counter() - start_time
    )


def word_vectors(states: TokenStates, word_pooling: str = "mean") -> np.ndarray:
    """One float32 vector per word, (total_words, dim), from its tokens' states (see ``WORD_POOLING``)."""
    if word_pooling not in WORD_POOLING:
        raise ValueError(f"unknown word_pooling {word_pooling!r}; choose one of: {', '.join(WORD_POOLING)}")
    if word_pooling != "mean":
        return states.states[getattr(states, word_pooling)].astype(np.float32)
    # Sum over [first, last] of each word with one reduceat: indices first0, last0 + 1, first1, last1 + 1, ...
    # (a zero row at the end keeps last + 1 a valid index); the even results are the words' sums.
    padded = np.concatenate([states.states, np.zeros((1, states.states.shape[1]), states.states.dtype)])
    bounds = np.stack([states.first, states.last + 1], axis=1).reshape(-1)
    sums = np.add.reduceat(padded, bounds, axis=0, dtype=np.float32)[0::2]
    return sums / (states.last - states.first + 1)[:, None].astype(np.float32)


# Token states per encoder and file, so the three CoNLL tasks (and the classifier epochs) share one forward pass.
# It assumes the weights do not change while an encoder is evaluated; clear_state_cache() after training.
_STATE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_FILES_PER_ENCODER = 3


def clear_state_cache() -> None:
    """Forget every cached :class:`TokenStates` (needed only when an encoder's weights changed)."""
    _STATE_CACHE.clear()


def cached_token_states(encoder, sentences: ConllSentences, **options) -> TokenStates:
    """:func:`token_states` (``options`` are its keyword arguments), kept for the last files this encoder read."""
    instruction = options.get("instruction")
    key = hashlib.sha256(
        repr((sentences.words, instruction, sorted(vars(encoder.config).items()))).encode("utf-8")
    ).hexdigest()
    try:
        per_encoder = _STATE_CACHE.setdefault(encoder, {})
    except TypeError:  # not weak-referenceable: no cache
        return token_states(encoder, sentences, **options)
    if key not in per_encoder:
        per_encoder[key] = token_states(encoder, sentences, **options)
        while len(per_encoder) > _CACHE_FILES_PER_ENCODER:
            per_encoder.pop(next(iter(per_encoder)))
    else:
        per_encoder[key] = per_encoder.pop(key)  # most recently used last
    return per_encoder[key]


# ---------------------------------------------------------------------- entity-level F1
def iob2_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entities ``(start, end_exclusive, type)`` of one sentence's IOB2 tags, with conlleval's rules.

    ``B-X`` starts an entity; ``I-X`` continues it when the previous tag is ``B-X`` or ``I-X`` and otherwise
    starts a new one (an ill-formed prediction such as ``O I-PER`` still names a PER entity); ``O`` or a tag of
    another type ends it. Any tag other than ``O``, ``B-...``, ``I-...`` is an error.
    """
    spans, start, kind = set(), None, None
    for position, tag in enumerate([*tags, "O"]):
        if tag == "O":
            prefix, label = "O", None
        elif tag[:2] in ("B-", "I-") and len(tag) > 2:
            prefix, label = tag[0], tag[2:]
        else:
            raise ValueError(f"tag {tag!r} is not IOB2 (O, B-TYPE or I-TYPE); entity F1 needs IOB2 tags")
        continues = prefix == "I" and kind == label
        if start is not None and not continues:
            spans.add((start, position, kind))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = position, label
    return spans


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (x100) over sentences of IOB2 tags (exact span and type)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted ones")
    correct = found = expected = 0
    for number, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted, strict=True)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(f"sentence {number}: {len(gold_tags)} gold tags but {len(predicted_tags)} predicted")
        gold_spans, predicted_spans = iob2_spans(gold_tags), iob2_spans(predicted_tags)
        correct += len(gold_spans & predicted_spans)
        found += len(predicted_spans)
        expected += len(gold_spans)
    precision = correct / found if found else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision * 100, "recall": recall * 100, "f1": f1 * 100}


def _is_iob2(tags: list[str]) -> bool:
    return all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in tags)


# ---------------------------------------------------------------------- the linear probe
def train_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    dev_x: np.ndarray,
    dev_score,
    *,
    num_labels: int,
    epochs: int = 30,
    patience: int = 3,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 256,
    seed: int = 0,
):
    """A linear softmax classifier trained with AdamW on standardized vectors; the best epoch on dev is kept.

    ``dev_score(predicted_label_ids) -> float`` scores a dev prediction (higher is better); training stops after
    ``patience`` epochs without a better one. Returns ``(predict, info)``: ``predict(x) -> label ids`` and
    ``{"best_epoch", "dev_score", "epochs"}``.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    x = (x - mean) / std  # (n_train, dim)
    y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    dev = (torch.from_numpy(np.ascontiguousarray(dev_x, dtype=np.float32)) - mean) / std
    layer = torch.nn.Linear(x.shape[1], num_labels)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=learning_rate, weight_decay=weight_decay)
    best = (-float("inf"), 0, None)  # (dev score, epoch, weights)
    epoch = 0
    for epoch in range(1, epochs + 1):
        for index in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(layer(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            score = dev_score(layer(dev).argmax(dim=1).numpy())
        if score > best[0]:
            best = (score, epoch, {k: v.clone() for k, v in layer.state_dict().items()})
        elif epoch - best[1] >= patience:
            break
    layer.load_state_dict(best[2])

    def predict(vectors: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            inputs = (torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)) - mean) / std
            return layer(inputs).argmax(dim=1).numpy()

    return predict, {"best_epoch": best[1], "dev_score": best[0], "epochs": epoch}


# ---------------------------------------------------------------------- the evaluator
class WordEvaluator:
    """A linear probe on frozen word vectors: trained on ``train``, selected on ``dev``, scored on ``test``.

    Inputs: three :class:`ConllSentences`; ``column`` is the tag column (``pos`` | ``chunk`` | ``ner``);
    ``word_pooling`` how a word's tokens become its vector (``mean`` | ``first`` | ``last`` | ``previous``);
    ``metric`` the primary metric (``accuracy`` | ``f1``; default ``f1`` for ``ner``, ``accuracy`` otherwise);
    ``instruction`` goes before every sentence (none by default). Returns ``{"accuracy", "f1", "precision",
    "recall"}`` (x100; the last three only for IOB2 columns) and ``dev_score``, ``best_epoch``,
    ``unseen_tag_words``, ``train_words``, ``test_words``.

    Example::

        evaluator = WordEvaluator(train, dev, test, column="pos", word_pooling="previous")
        evaluator(encoder)  # {'accuracy': ..., 'dev_score': ..., ...}
    """

    def __init__(
        self,
        train: ConllSentences,
        dev: ConllSentences,
        test: ConllSentences,
        *,
        column: str = "ner",
        word_pooling: str = "mean",
        metric: str | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        epochs: int = 30,
        patience: int = 3,
        learning_rate: float = 1e-3,
        seed: int = 0,
        show_progress: bool | None = None,
    ):
        if column not in COLUMNS:
            raise ValueError(f"unknown tag column {column!r}; choose one of: {', '.join(COLUMNS)}")
        if word_pooling not in WORD_POOLING:
            raise ValueError(f"unknown word_pooling {word_pooling!r}; choose one of: {', '.join(WORD_POOLING)}")
        metric = metric or ("f1" if column == "ner" else "accuracy")
        if metric not in ("accuracy", "f1"):
            raise ValueError(f"metric must be 'accuracy' or 'f1' (entity-level, IOB2), not {metric!r}")
        if metric == "f1":
            bad = [t for s in (train, dev, test) for tags in s.tags(column) for t in tags if not _is_iob2([t])]
            if bad:
                raise ValueError(f"column {column!r} has non-IOB2 tags such as {bad[0]!r}; use metric='accuracy'")
        labels = sorted({tag for tags in train.tags(column) for tag in tags})
        if len(labels) < 2:
            raise ValueError(f"the training data has {len(labels)} distinct {column} tag(s); a classifier needs 2+")
        self.train, self.dev, self.test = train, dev, test
        self.column, self.word_pooling, self.primary_metric = column, word_pooling, metric
        self.labels = labels
        self.instruction, self.batch_size = instruction, batch_size
        self.epochs, self.patience, self.learning_rate, self.seed = epochs, patience, learning_rate, seed
        self.show_progress = show_progress

    def _vectors(self, encoder, sentences: ConllSentences) -> np.ndarray:
        states = cached_token_states(
            encoder,
            sentences,
            instruction=self.instruction,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
        )
        return word_vectors(states, self.word_pooling)

    def _scores(self, sentences: ConllSentences, predicted_ids: np.ndarray) -> dict[str, float]:
        gold = sentences.tags(self.column)
        flat_gold = np.asarray([tag for tags in gold for tag in tags])
        flat_predicted = np.asarray(self.labels)[predicted_ids]
        scores = {"accuracy": float((flat_gold == flat_predicted).mean()) * 100}
        if _is_iob2(self.labels):
            ends = np.cumsum([len(tags) for tags in gold])
            predicted = [list(part) for part in np.split(flat_predicted, ends[:-1])]
            scores.update(entity_scores(gold, predicted))
        return scores

    def __call__(self, encoder) -> dict[str, float]:
        train_x, dev_x, test_x = (self._vectors(encoder, s) for s in (self.train, self.dev, self.test))
        index = {label: i for i, label in enumerate(self.labels)}
        train_y = np.asarray([index[tag] for tags in self.train.tags(self.column) for tag in tags])
        unseen = {
            name: sum(tag not in index for tags in data.tags(self.column) for tag in tags)
            for name, data in (("dev", self.dev), ("test", self.test))
        }
        if unseen["dev"] or unseen["test"]:
            logger.warning(
                "%d dev and %d test words have %s tags that never occur in train; they count as errors",
                unseen["dev"],
                unseen["test"],
                self.column,
            )
        predict, info = train_probe(
            train_x,
            train_y,
            dev_x,
            lambda ids: self._scores(self.dev, ids)[self.primary_metric],
            num_labels=len(self.labels),
            epochs=self.epochs,
            patience=self.patience,
            learning_rate=self.learning_rate,
            seed=self.seed,
        )
        scores = self._scores(self.test, predict(test_x))
        return {
            **scores,
            "dev_score": float(info["dev_score"]),
            "best_epoch": float(info["best_epoch"]),
            "unseen_tag_words": float(unseen["test"]),
            "train_words": float(len(train_x)),
            "test_words": float(len(test_x)),
        }
