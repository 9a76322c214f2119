import numpy as np
import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.vectors import PRECISIONS, hamming_distance, l2_normalize, postprocess, quantize, truncate

CORPUS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sits on the mat while the dog sleeps.",
    "Paris is the capital and most populous city of France.",
    "Numbers like 3.14, 42 and 1,000,000 appear in text.",
    "A child is riding a horse on the beach.",
    "Two dogs are running through a field of grass.",
    "The stock market fell sharply on Monday morning.",
    "She is cooking pasta in a large pot.",
    "A plane is taking off from the airport.",
    "The orchestra played a symphony by Beethoven.",
    "Heavy rain caused flooding in the city center.",
    "He repaired the bicycle with a new chain.",
    "The students are reading books in the library.",
    "A cat is chasing a red ball across the floor.",
    "The president gave a speech about the economy.",
]
QUERIES = ["a person plays music", "an animal in a house", "weather and water", "food in the kitchen", "travel by air"]


@pytest.fixture
def encoder(tiny_llama_dir):
    return Encoder.from_pretrained(tiny_llama_dir, device="cpu")


def test_truncate_then_normalize_gives_unit_vectors_of_the_prefix():
    vectors = torch.randn(4, 16)
    out = postprocess(vectors, normalize=True, dimensions=6)
    assert out.shape == (4, 6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    expected = vectors[:, :6] / vectors[:, :6].norm(dim=1, keepdim=True)
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, True, "8"])
def test_bad_dimensions_name_the_range(bad):
    with pytest.raises(ValueError, match="from 1 to 16"):
        truncate(torch.randn(2, 16), bad)


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="int8"):
        quantize(torch.randn(2, 8), "int4")


@pytest.mark.parametrize(
    "precision, dtype, width",
    [("float32", np.float32, 16), ("int8", np.int8, 16), ("uint8", np.uint8, 16), ("binary", np.uint8, 2)],
)
def test_precision_dtypes_and_widths(precision, dtype, width):
    out = quantize(torch.randn(3, 16), precision)
    assert out.dtype == dtype and out.shape == (3, width)


def test_int8_is_the_scaled_unit_vector_and_independent_of_the_batch():
    vectors = torch.randn(5, 32) * 10
    batch = quantize(vectors, "int8")
    alone = np.concatenate([quantize(vectors[i : i + 1], "int8") for i in range(5)])
    np.testing.assert_array_equal(batch, alone)
    unit = l2_normalize(vectors).numpy()
    assert np.abs(batch / 127.0 - unit).max() <= 0.5 / 127 + 1e-6
    np.testing.assert_array_equal(quantize(vectors, "uint8").astype(np.int16) - 128, batch)


def test_binary_packs_signs_first_dimension_highest_bit():
    vectors = torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, 1, 0.5, -2]])  # 10 dims -> 2 bytes
    out = quantize(vectors, "binary")
    np.testing.assert_array_equal(out, [[0b10000001, 0b10000000]])
    assert hamming_distance(out, quantize(-vectors, "binary"))[0, 0] == 10


def test_encode_applies_dimensions_precision_and_convert_to(encoder):
    texts = CORPUS[:4]
    full = encoder.encode(texts, normalize=True)
    short = encoder.encode(texts, normalize=True, dimensions=8)
    np.testing.assert_allclose(short, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-6)
    as_int8 = encoder.encode(texts, precision="int8", convert_to="torch")
    assert as_int8.dtype == torch.int8 and tuple(as_int8.shape) == (4, encoder.dim)
    assert encoder.encode(texts, precision="binary").shape == (4, encoder.dim // 8)
    with pytest.raises(ValueError, match="dimensions"):
        encoder.encode(texts, dimensions=encoder.dim + 1)
    with pytest.raises(ValueError, match="precision"):
        encoder.encode(texts, precision="fp8")


def _rankings(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def test_int8_keeps_the_retrieval_ranking_of_a_small_corpus(encoder):
    queries = encoder.encode(QUERIES, normalize=True)
    documents = encoder.encode(CORPUS, normalize=True)
    exact = _rankings(queries @ documents.T)
    q8 = encoder.encode(QUERIES, precision="int8").astype(np.int32)
    d8 = encoder.encode(CORPUS, precision="int8").astype(np.int32)
    approx = _rankings((q8 @ d8.T).astype(np.float64))
    top1 = np.mean(exact[:, 0] == approx[:, 0])
    top5 = np.mean([len(set(exact[i, :5]) & set(approx[i, :5])) / 5 for i in range(len(QUERIES))])
    assert top1 >= 0.8, (top1, exact[:, :5], approx[:, :5])
    assert top5 >= 0.8, top5
    # binary is coarser; it still agrees with the float ranking far better than chance (5/16)
    qb, db = encoder.encode(QUERIES, precision="binary"), encoder.encode(CORPUS, precision="binary")
    binary = np.argsort(hamming_distance(qb, db), axis=1, kind="stable")
    overlap = np.mean([len(set(exact[i, :5]) & set(binary[i, :5])) / 5 for i in range(len(QUERIES))])
    assert overlap > 5 / 16, overlap


def test_all_precisions_listed():
    assert PRECISIONS == ("float32", "int8", "uint8", "binary")


def test_cli_encode_dimensions_and_precision(tiny_llama_dir, tmp_path, capsys):
    from decoder2vec.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CORPUS[:5]) + "\n")
    args = ["encode", str(texts), "--model", str(tiny_llama_dir), "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "int8.npy"), "--precision", "int8", "--dimensions", "8"]) == 0
    got = np.load(tmp_path / "int8.npy")
    expected = Encoder.from_pretrained(tiny_llama_dir, device="cpu").encode(CORPUS[:5], dimensions=8, precision="int8")
    assert got.dtype == np.int8 and got.shape == (5, 8)
    np.testing.assert_array_equal(got, expected)
    assert main([*args, "-o", str(tmp_path / "bits.npy"), "--precision", "binary"]) == 0
    assert np.load(tmp_path / "bits.npy").shape == (5, 4)
    assert main([*args, "-o", str(tmp_path / "bad.npy"), "--precision", "int4"]) == 1
    assert "int4" in capsys.readouterr().err
