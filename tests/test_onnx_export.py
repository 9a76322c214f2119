"""ONNX export: vectors against the PyTorch Encoder, bidirectional graph, onnxruntime and sentence-transformers loading.

Each export traces a graph (10-25 s on the 2-core CPU), so the folders are made once per session and only read here.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import decoder2vec.onnx_export as onnx_export
from decoder2vec import Encoder, export_model
from decoder2vec.attention import probe_attention
from decoder2vec.cli import main
from decoder2vec.onnx_runtime import ONNX_FILE, OnnxModel, onnx_session
from tiny import make_model_dir

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
# peft's get_peft_model reads a transformers property that transformers 5.24 deprecates (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sits on the mat while the dog sleeps.",
    "Unusual characters: tab\there, emoji 🙂, accents éàü, CJK 漢字, symbols <s> </s> [SEP].",
    "Short.",
    "x",
    "",
    "The president gave a long speech about the economy, jobs, and taxes to a large crowd.",
]


@pytest.fixture(scope="session")
def llama_onnx(tmp_path_factory):
    """A tiny Llama whose tokenizer adds no token around a text (as SmolLM2's), exported by the CLI in fp32."""
    root = tmp_path_factory.mktemp("onnx-llama")
    model = make_model_dir(root / "model", "llama", add_bos=False)
    assert main(["export", str(root / "onnx"), "--format", "onnx", "--model", str(model), "--device", "cpu"]) == 0
    return model, root / "onnx"


@pytest.fixture(scope="session")
def gemma_int8_onnx(tmp_path_factory):
    """A tiny Gemma 3 (BOS tokenizer, sliding-window layers) exported as a dynamic int8 graph."""
    root = tmp_path_factory.mktemp("onnx-gemma")
    model = make_model_dir(root / "model", "gemma3_text")
    encoder = Encoder.from_pretrained(model, device="cpu")
    return model, export_model(encoder, root / "onnx-int8", format="onnx", quantize="int8")


def test_fp32_graph_gives_our_vectors_for_every_pooling(llama_onnx):
    model, folder = llama_onnx
    for pooling in ("mean", "weighted_mean", "last_token", "bos"):
        ours = Encoder.from_pretrained(model, pooling=pooling, device="cpu").encode(TEXTS, batch_size=3)
        graph = Encoder.from_pretrained(folder, pooling=pooling)
        assert graph.backend == "onnx" and isinstance(graph.model, OnnxModel)
        assert np.abs(graph.encode(TEXTS, batch_size=3) - ours).max() <= 1e-4, pooling
    left = Encoder.from_pretrained(folder, padding_side="left").encode(TEXTS, batch_size=3)  # positions from the mask
    assert np.abs(left - Encoder.from_pretrained(model, device="cpu").encode(TEXTS)).max() <= 1e-4


def test_graph_is_bidirectional_and_padding_does_not_leak(llama_onnx):
    _, folder = llama_onnx
    session = onnx_session(folder / ONNX_FILE, threads=1)

    def first_token(last: int) -> np.ndarray:  # token 0's state when only the last token differs
        feeds = {"input_ids": np.array([[10, 11, 12, last]]), "attention_mask": np.ones((1, 4), dtype=np.int64)}
        return session.run(["last_hidden_state"], feeds)[0][0, 0]

    assert np.abs(first_token(13) - first_token(14)).max() > 1e-3  # changing the last token changes token 0
    probe = probe_attention(OnnxModel(folder), vocab_size=400)  # the same probe Encoder runs on every load
    assert probe.attends_to_future and probe.padding_is_masked, probe
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    assert names == (["input_ids", "attention_mask"], ["last_hidden_state"])
    shapes = [i.shape for i in session.get_inputs()]
    assert all(isinstance(d, str) for shape in shapes for d in shape), shapes  # dynamic batch and sequence


def test_causal_export_stays_causal(tmp_path):
    model = make_model_dir(tmp_path / "model", "llama")
    encoder = Encoder.from_pretrained(model, bidirectional=False, device="cpu")
    folder = export_model(encoder, tmp_path / "onnx", format="onnx")
    probe = probe_attention(OnnxModel(folder), vocab_size=400)
    assert probe.future_alone == 0.0 and probe.future_padded == 0.0
    restored = Encoder.from_pretrained(folder)
    assert restored.config.bidirectional is False
    assert np.abs(restored.encode(TEXTS) - encoder.encode(TEXTS)).max() <= 1e-4


def test_sentence_transformers_loads_it_with_the_onnx_backend(llama_onnx):
    from sentence_transformers import SentenceTransformer

    model, folder = llama_onnx
    st = SentenceTransformer(str(folder), backend="onnx", trust_remote_code=True, device="cpu")
    ours = Encoder.from_pretrained(model, device="cpu").encode(TEXTS)
    theirs = st.encode(TEXTS, batch_size=3)
    assert np.abs(theirs - ours).max() <= 1e-4  # the empty text included: one filler token, as ours
    assert np.abs(st.encode([""]) - ours[TEXTS.index("")]).max() <= 1e-4  # a batch of only empty texts
    assert type(st[0]).__name__ == "OnnxTransformer" and st.get_backend() == "onnx"


def test_plain_onnxruntime_example_in_the_docs_runs(llama_onnx):
    _, folder = llama_onnx
    docs = (ROOT / "docs" / "inference.md").read_text()
    code = re.search(r"<!-- plain-onnxruntime -->\s*```python\n(.*?)```", docs, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20
    scope = {}
    exec(code.replace("exports/smollm2-onnx", str(folder)), scope)  # noqa: S102 - our own documentation
    texts = scope["texts"]
    ours = Encoder.from_pretrained(folder).encode(texts, normalize=True)
    np.testing.assert_allclose(scope["vectors"], ours, atol=1e-5)


def test_int8_graph_is_close_to_fp32_and_says_so(gemma_int8_onnx):
    model, folder = gemma_int8_onnx
    fp32 = Encoder.from_pretrained(model, device="cpu").encode(TEXTS, normalize=True)
    int8 = Encoder.from_pretrained(folder)
    assert int8.quantize == "int8"
    vectors = int8.encode(TEXTS, normalize=True)
    assert np.sum(vectors * fp32, axis=1).min() >= 0.99
    measured = json.loads((folder / "decoder2vec_onnx.json").read_text())
    assert measured["precision"] == "int8" and measured["min_cosine"] >= 0.99
    card = (folder / "README.md").read_text()
    assert "## Precision" in card and "int8 ONNX graph" in card and "cosine similarity" in card
    with pytest.raises(ValueError, match="fixed at export time"):
        Encoder.from_pretrained(folder, adapter=str(model))


def test_int8_graph_loads_in_sentence_transformers(gemma_int8_onnx):
    from sentence_transformers import SentenceTransformer

    model, folder = gemma_int8_onnx
    st = SentenceTransformer(str(folder), backend="onnx", trust_remote_code=True, device="cpu")
    texts = [t for t in TEXTS if t]  # "" here: a BOS the WordWeights module zeroes (the model card says so)
    ours = Encoder.from_pretrained(folder).encode(texts, batch_size=32, normalize=True)
    theirs = st.encode(texts, batch_size=32, normalize_embeddings=True)
    assert np.sum(ours * theirs, axis=1).min() > 0.999
    assert np.isfinite(st.encode([""])).all()


def test_fp32_model_card_states_precision_and_empty_text(llama_onnx):
    _, folder = llama_onnx
    card = (folder / "README.md").read_text()
    assert "float32 ONNX graph" in card and "at most" in card
    assert "filler token" in card and 'backend="onnx", trust_remote_code=True' in card
    assert json.loads((folder / "modules.json").read_text())[0]["type"] == "decoder2vec.st_modules.OnnxTransformer"


def test_fp32_tolerance_is_relative_to_the_vectors_scale(llama_onnx):
    _, folder = llama_onnx
    measured = json.loads((folder / onnx_export.PRECISION_FILE).read_text())
    assert measured["max_relative_difference"] <= onnx_export.FLOAT32_TOLERANCE
    ours = np.array([[100.0, -50.0, 3.0], [1.0, 0.5, -0.25]])
    rounding = np.array([[1e-3, 0.0, 0.0], [1e-3, 0.0, 0.0]])  # the same absolute error on both vectors
    relative = onnx_export._relative_differences(ours + rounding, ours)
    assert relative[0] == pytest.approx(1e-5) and relative[1] == pytest.approx(1e-3)  # fine at scale 100, not at 1


def test_failed_onnx_export_leaves_nothing(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "model", "llama")
    encoder = Encoder.from_pretrained(model, device="cpu")

    def broken(backbone, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "export_graph", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(encoder, tmp_path / "exports" / "model", format="onnx")
    assert list((tmp_path / "exports").iterdir()) == []


def test_quantize_is_only_for_onnx_and_quantized_encoders_do_not_export(tmp_path):
    from decoder2vec.export import ExportError

    model = make_model_dir(tmp_path / "model", "llama")
    encoder = Encoder.from_pretrained(model, device="cpu")
    with pytest.raises(ExportError, match="--format onnx"):
        export_model(encoder, tmp_path / "out", format="merged", quantize="int8")
    int8 = Encoder.from_pretrained(model, quantize="int8", backend="torch")
    with pytest.raises(ExportError, match="quantized"):
        export_model(int8, tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()


def test_graph_is_written_with_adapters_merged(tmp_path, llama_onnx):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, _ = llama_onnx
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    encoder = Encoder.from_pretrained(model, adapter=tmp_path / "adapter", device="cpu")
    folder = export_model(encoder, tmp_path / "onnx", format="onnx")
    ours, base = encoder.encode(TEXTS), Encoder.from_pretrained(model, device="cpu").encode(TEXTS)
    assert np.abs(ours - base).max() > 1e-3  # the adapter matters
    assert np.abs(Encoder.from_pretrained(folder).encode(TEXTS) - ours).max() <= 1e-4
    shutil.rmtree(folder)
