"""Word-level evaluation: CoNLL reading, word pooling by offsets, MNTP's shift, entity F1, the probe, the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from decoder2vec import Encoder
from decoder2vec.cli import main
from decoder2vec.eval import word
from decoder2vec.eval.report import run_tasks
from decoder2vec.eval.tasks import resolve_tasks
from decoder2vec.eval.word import (
    WordEvaluator,
    entity_scores,
    iob2_spans,
    read_conll,
    token_states,
    train_probe,
    word_vectors,
)
from tiny import make_model_dir

HAND_MADE = Path(__file__).parent / "data" / "conll_tiny.txt"


@pytest.fixture(autouse=True)
def _fresh_cache():
    word.clear_state_cache()
    yield
    word.clear_state_cache()


def test_read_conll_skips_docstart_and_keeps_columns():
    data = read_conll(HAND_MADE)
    assert len(data) == 10
    assert data.words[0] == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert data.pos[1] == ["NNP", "NNP"] and data.chunk[1] == ["B-NP", "I-NP"] and data.ner[1] == ["B-PER", "I-PER"]
    assert data.locations[0] == f"{HAND_MADE}:3" and data.locations[4] == f"{HAND_MADE}:34"
    assert sum(len(w) for w in data.words) == 66


@pytest.mark.parametrize(
    "content, line, message",
    [
        ("EU NNP B-NP B-ORG\nrejects VBZ B-VP\n\n", 2, r"3 column\(s\)"),
        ("EU NNP B-NP B-ORG extra\n\n", 1, r"5 column\(s\)"),
        ("\n\n", None, "no sentences"),
    ],
)
def test_read_conll_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        read_conll(path)
    assert str(path) + (f":{line}" if line else "") in str(error.value)


def _encoder(folder, **settings):
    return Encoder.from_pretrained(folder, device="cpu", **settings)


def _decoded_words(encoder, data, states, instruction=None):
    """The text of each word's tokens, read back from the tokenizer (global rows -> sentence, position)."""
    features = encoder.tokenize([" ".join(w) for w in data.words], instruction)
    ids = [i for f in features for i in f.input_ids]
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids)  # byte-level: a space reads "Ġ" (the text is ASCII)
    return ["".join(tokens[a : b + 1]).replace("Ġ", " ") for a, b in zip(states.first, states.last, strict=True)]


@pytest.mark.parametrize("instruction", [None, "Tag each word"])
def test_word_tokens_are_exactly_the_words_sub_tokens(tiny_llama_dir, instruction):
    encoder = _encoder(tiny_llama_dir)
    data = read_conll(HAND_MADE)
    states = token_states(encoder, data, instruction=instruction, batch_size=4)
    words = [w for sentence in data.words for w in sentence]
    decoded = _decoded_words(encoder, data, states, instruction)
    # exactly the word's tokens: the word's text, with the space before it when a token joins the two
    assert [d if d == w else d.removeprefix(" ") for d, w in zip(decoded, words, strict=True)] == words
    assert any(d == " " + w for d, w in zip(decoded, words, strict=True))
    assert any(b > a for a, b in zip(states.first, states.last, strict=True))  # some words have several tokens


@pytest.mark.parametrize(
    "settings", [{"bidirectional": True}, {"bidirectional": False}, {"padding_side": "left", "bidirectional": True}]
)
def test_states_come_from_the_same_forward_as_encode(tiny_llama_dir, settings):
    """The mean of a sentence's word tokens equals encode's mean pooling of the sentence (same forward)."""
    encoder = _encoder(tiny_llama_dir, pooling="mean", **settings)
    data = read_conll(HAND_MADE)
    states = token_states(encoder, data, batch_size=3, instruction="Tag each word")
    expected = encoder.encode([" ".join(w) for w in data.words], instruction="Tag each word")
    ends = np.cumsum([len(w) for w in data.words])
    for sentence, (begin, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        rows = np.arange(states.first[begin], states.last[end - 1] + 1)
        mean = states.states[rows].astype(np.float32).mean(axis=0)
        np.testing.assert_allclose(mean, expected[sentence], atol=2e-2, rtol=1e-2)


def test_word_vectors_mean_first_last(tiny_llama_dir):
    states = token_states(_encoder(tiny_llama_dir), read_conll(HAND_MADE))
    full = states.states.astype(np.float32)
    means = word_vectors(states, "mean")
    for i, (a, b) in enumerate(zip(states.first, states.last, strict=True)):
        np.testing.assert_allclose(means[i], full[a : b + 1].mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(word_vectors(states, "first"), full[states.first])
    np.testing.assert_array_equal(word_vectors(states, "last"), full[states.last])
    np.testing.assert_array_equal(word_vectors(states, "previous"), full[states.previous])
    with pytest.raises(ValueError, match="unknown word_pooling"):
        word_vectors(states, "max")


@pytest.mark.parametrize("add_bos, instruction", [(True, None), (False, None), (False, "Tag each word")])
def test_previous_token_shift_at_sentence_starts(tmp_path, add_bos, instruction):
    encoder = _encoder(make_model_dir(tmp_path / "model", add_bos=add_bos))
    data = read_conll(HAND_MADE)
    states = token_states(encoder, data, instruction=instruction)
    starts = np.cumsum([0] + [len(w) for w in data.words])[:-1]  # index of each sentence's first word
    inner = np.setdiff1d(np.arange(states.num_words), starts)
    np.testing.assert_array_equal(states.previous[inner], states.first[inner] - 1)  # the token before the word
    if add_bos or instruction:  # the token before the sentence: BOS, or the instruction's last token
        np.testing.assert_array_equal(states.previous[starts], states.first[starts] - 1)
        features = encoder.tokenize([" ".join(w) for w in data.words], instruction)
        ids = np.asarray([i for f in features for i in f.input_ids])
        if add_bos:
            assert (ids[states.previous[starts]] == encoder.tokenizer.bos_token_id).all()
        else:
            assert (states.first[starts] > np.cumsum([0] + [len(f.input_ids) for f in features])[:-1]).all()
    else:  # nothing before the first word: it reads its own first token
        np.testing.assert_array_equal(states.previous[starts], states.first[starts])


def test_sentence_longer_than_max_length_names_file_and_line(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"conll_tiny\.txt:3: .*max_length=8"):
        token_states(_encoder(tiny_llama_dir, max_length=8), read_conll(HAND_MADE))


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {(0, 2, "PER"), (3, 4, "LOC")}),
        (["B-PER", "B-PER", "I-PER"], {(0, 1, "PER"), (1, 3, "PER")}),
        (["O", "I-PER", "I-PER"], {(1, 3, "PER")}),  # conlleval: I- after O starts an entity
        (["B-PER", "I-LOC", "I-LOC"], {(0, 1, "PER"), (1, 3, "LOC")}),  # a type change ends the entity
        (["B-ORG", "I-ORG", "I-ORG"], {(0, 3, "ORG")}),  # an entity ending the sentence
        (["O", "O"], set()),
    ],
)
def test_iob2_spans(tags, spans):
    assert iob2_spans(tags) == spans


def test_entity_scores_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"], ["O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"], ["O"]]
    # gold: 4 entities; predicted: 4; correct: PER(0,2) and ORG(0,1) -> P = R = F1 = 2/4
    assert entity_scores(gold, predicted) == pytest.approx({"precision": 50.0, "recall": 50.0, "f1": 50.0})
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O", "O", "I-MISC"], ["O"]]
    # predicted: PER(0,2) ok, ORG ok, MISC(3,4) wrong span -> P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7
    scores = entity_scores(gold, predicted)
    assert scores == pytest.approx({"precision": 200 / 3, "recall": 50.0, "f1": 400 / 7})
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="not IOB2"):
        entity_scores([["PER"]], [["O"]])


def test_probe_separates_and_is_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    labels = rng.integers(0, 3, 3000)
    x = centres[labels] + rng.normal(size=(3000, 8))

    def accuracy(ids):
        return float((ids == labels[:100]).mean())

    predict, info = train_probe(x[100:], labels[100:], x[:100], accuracy, num_labels=3)
    assert accuracy(predict(x[:100])) == 1.0 and info["dev_score"] == 1.0
    again, _ = train_probe(x[100:], labels[100:], x[:100], accuracy, num_labels=3)
    np.testing.assert_array_equal(predict(x), again(x))


def test_evaluator_scores_and_unseen_test_tags(tiny_llama_dir, tmp_path, caplog):
    data = read_conll(HAND_MADE)
    test_file = tmp_path / "test.txt"
    test_file.write_text(HAND_MADE.read_text().replace("BRUSSELS NNP B-NP B-LOC", "BRUSSELS NNP B-NP B-EVENT"))
    test = read_conll(test_file)
    encoder = _encoder(tiny_llama_dir)
    scores = WordEvaluator(data, data, test, column="ner", epochs=5)(encoder)
    assert scores["unseen_tag_words"] == 1.0 and scores["test_words"] == 66.0
    assert "never occur in train" in caplog.text
    assert {"accuracy", "f1", "precision", "recall", "dev_score", "best_epoch"} <= set(scores)
    assert 0 <= scores["f1"] <= 100 and scores["accuracy"] < 100  # the B-EVENT word cannot be right
    pos = WordEvaluator(data, data, data, column="pos", word_pooling="previous", epochs=5)
    assert pos.primary_metric == "accuracy" and "f1" not in pos(encoder)  # POS tags are not IOB2


def test_three_tasks_share_one_forward_per_file(tiny_llama_dir, tmp_path, monkeypatch):
    folder = tmp_path / "data" / "conll2003"
    folder.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        shutil.copy(HAND_MADE, folder / f"{split}.txt")
    (folder / "dev.txt").write_text(HAND_MADE.read_text().replace("EU NNP", "Europe NNP"))
    calls = []
    original = word.token_states
    monkeypatch.setattr(word, "token_states", lambda *a, **k: calls.append(1) or original(*a, **k))
    specs = resolve_tasks("conll2003-pos,conll2003-chunk,conll2003-ner")
    report = run_tasks(_encoder(tiny_llama_dir), specs, data_dir=tmp_path / "data")
    assert [t["main_metric"] for t in report["tasks"]] == ["accuracy", "accuracy", "f1"]
    assert len(calls) == 2  # train and test are the same sentences, dev differs: two forward passes in all


def test_cli_runs_builtin_task_file_task_and_task_option(tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "data" / "conll2003"
    folder.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        shutil.copy(HAND_MADE, folder / f"{split}.txt")
    task_file = tmp_path / "tasks.yaml"
    task_file.write_text(
        "- {name: hand-chunk, type: word, files: {train: data/conll2003/train.txt, dev: data/conll2003/dev.txt, "
        "test: data/conll2003/test.txt}, options: {column: chunk, word_pooling: last, epochs: 3}}\n"
    )
    out = tmp_path / "report.json"
    args = ["eval", "--model", str(tiny_llama_dir), "--data-dir", str(tmp_path / "data"), "-o", str(out)]
    hand = f"hand-ner=word:{HAND_MADE},{HAND_MADE},{HAND_MADE}"
    tasks = ["--tasks", "conll2003-pos,hand-chunk,hand-ner", "--task-file", str(task_file), "--task", hand]
    assert main([*args, *tasks]) == 0
    report = json.loads(out.read_text())
    assert [(t["name"], t["type"], t["main_metric"]) for t in report["tasks"]] == [
        ("conll2003-pos", "word", "accuracy"),
        ("hand-chunk", "word", "accuracy"),
        ("hand-ner", "word", "f1"),  # a --task word task tags the NER column
    ]
    assert "| conll2003-pos | word | accuracy |" in capsys.readouterr().out
