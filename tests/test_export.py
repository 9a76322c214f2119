"""Exports: sentence-transformers folder (same vectors under the real package), merged folder, model card, atomicity."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import decoder2vec.export as export_module
from decoder2vec import Encoder, export_model
from decoder2vec.attention import attends_to_future
from decoder2vec.cli import main
from tiny import make_model_dir

# peft's get_peft_model reads a transformers property that transformers 5.24 deprecates (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TEXTS = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "The cat sits on the mat while the dog sleeps.",
    "Paris is the capital and most populous city of France.",
    "Numbers like 3.14, 42 and 1,000,000 appear in text.",
    "Unusual characters: tab\there, emoji 🙂, accents éàü, CJK 漢字, symbols <s> </s> [SEP].",
    "Short.",
    "Retrieve passages that answer the question: what is the capital of France?",
    "A child is riding a horse on the beach, and the sun is setting behind the hills.",
    "Two dogs run.",
    "The stock market fell sharply on Monday morning after the report.",
    "She is cooking pasta in a large pot.",
    "A plane is taking off.",
    "The orchestra played a symphony by Beethoven in the old concert hall last night.",
    "Heavy rain caused flooding.",
    "He repaired the bicycle with a new chain and oiled it.",
    "The students are reading.",
    "A cat is chasing a red ball across the floor.",
    "x",
    "The president gave a long speech about the economy, jobs, and taxes to a large crowd.",
]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def _sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


@pytest.mark.parametrize("pooling", ["mean", "last_token", "bos"])
def test_sentence_transformers_folder_gives_our_vectors(tiny_llama_dir, tmp_path, pooling):
    (tiny_llama_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # must not be applied
    encoder = Encoder.from_pretrained(tiny_llama_dir, pooling=pooling, device="cpu")
    assert encoder.tokenizer.chat_template
    out = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    model = _sentence_transformer(out)
    ours = encoder.encode(TEXTS, batch_size=8)
    theirs = model.encode(TEXTS, batch_size=8, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    assert not (out / "chat_template.jinja").exists()
    assert json.loads((out / "config.json").read_text())["is_causal"] is False


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_appended_eos_is_written_into_the_tokenizer(tmp_path, add_bos, pooling):
    folder = make_model_dir(tmp_path / "model", "llama", add_bos=add_bos)
    encoder = Encoder.from_pretrained(folder, pooling=pooling, append_eos=True, max_length=16, device="cpu")
    out = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    model = _sentence_transformer(out)
    assert model.tokenize(["Two dogs run."])["input_ids"][0].tolist()[-1] == encoder.tokenizer.eos_token_id
    np.testing.assert_allclose(model.encode(TEXTS, batch_size=8), encoder.encode(TEXTS, batch_size=8), atol=1e-5)


@pytest.mark.slow
def test_smollm2_sentence_transformers_export(smollm2_dir, tmp_path):
    encoder = Encoder.from_pretrained(smollm2_dir, device="cpu")
    out = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    assert not (out / "chat_template.jinja").exists()
    np.testing.assert_allclose(_sentence_transformer(out).encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)


def test_stock_pooling_when_the_tokenizer_adds_nothing_around_the_text(tmp_path):
    folder = make_model_dir(tmp_path / "no-bos", "llama", add_bos=False)
    encoder = Encoder.from_pretrained(folder, pooling="weighted_mean", device="cpu")
    out = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling"]
    texts = [t for t in TEXTS if t]
    np.testing.assert_allclose(_sentence_transformer(out).encode(texts), encoder.encode(texts), atol=1e-5)
    assert "WordWeights" not in (out / "README.md").read_text()


def test_weighted_mean_after_a_bos_is_approximate_and_says_so(tiny_llama_dir, tmp_path):
    encoder = Encoder.from_pretrained(tiny_llama_dir, pooling="weighted_mean", device="cpu")
    out = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    assert "weighted_mean is not expressible exactly" in (out / "README.md").read_text()
    ours = encoder.encode(TEXTS, normalize=True)
    theirs = _sentence_transformer(out).encode(TEXTS, normalize_embeddings=True)
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.95


def test_sentence_transformers_model_is_bidirectional(tiny_llama_dir, tmp_path):
    out = export_model(
        Encoder.from_pretrained(tiny_llama_dir, device="cpu"), tmp_path / "st", format="sentence-transformers"
    )
    model = _sentence_transformer(out)
    for batch_size in (1, 2):  # alone (no padding mask) and in a padded batch
        texts = ["The cat sits on the mat", "The cat sits on the rug", "A much longer text that forces padding here"]
        states = model.encode(texts, output_value="token_embeddings", batch_size=batch_size)
        # position 1: the first text token (position 0 is the BOS, which the WordWeights module zeroes)
        assert not torch.allclose(states[0][1], states[1][1]), "the first token must see the last one"
    assert attends_to_future(model[0].model, vocab_size=400)  # the loaded Hugging Face model itself


def test_sentence_transformers_prompts_and_readme(tiny_llama_dir, tmp_path):
    encoder = Encoder.from_pretrained(tiny_llama_dir, device="cpu", query_instruction="Find the answer")
    out = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    settings = json.loads((out / "config_sentence_transformers.json").read_text())
    assert settings["prompts"] == {"query": "Find the answer: ", "document": ""}
    readme = (out / "README.md").read_text()
    assert "What this format cannot express" in readme and "Instructions" in readme
    assert "SentenceTransformer(" in readme and "Encoder.from_pretrained(" in readme
    query = "what is the capital of France?"
    ours = encoder.encode([query], instruction="Find the answer", normalize=True)[0]
    theirs = _sentence_transformer(out).encode([query], prompt_name="query", normalize_embeddings=True)[0]
    assert float(ours @ theirs) > 0.9  # approximately (here the token after the prompt is also left out)


@pytest.fixture
def lora_dir(tiny_llama_dir, tmp_path):
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    folder = tmp_path / "simcse-run"
    peft_model.save_pretrained(folder)
    (folder / "simcse_config.json").write_text(json.dumps({"stage": "simcse", "learning_rate": 5e-4, "steps": 30}))
    return folder


def test_merged_folder_restores_the_encoder(tiny_llama_dir, lora_dir, tmp_path):
    settings = dict(pooling="weighted_mean", max_length=64, query_instruction="Find the answer")
    live = dict(merge_adapters=False)  # the adapter as PEFT runs it: export must merge a copy, not the caller's
    encoder = Encoder.from_pretrained(tiny_llama_dir, adapter=lora_dir, device="cpu", **live, **settings)
    assert isinstance(encoder.model, PeftModel)
    out = export_model(encoder, tmp_path / "merged", format="merged")
    assert isinstance(encoder.model, PeftModel), "exporting must not merge the caller's adapter"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    restored = Encoder.from_pretrained(out, device="cpu")
    assert not isinstance(restored.model, PeftModel)
    assert restored.config == encoder.config
    np.testing.assert_allclose(restored.encode(TEXTS), encoder.encode(TEXTS), atol=1e-4)
    pairs = [("Find the answer", t) for t in TEXTS[:5]]
    np.testing.assert_allclose(restored.encode(pairs), encoder.encode(pairs), atol=1e-4)
    unmerged_changes = np.abs(
        encoder.encode(TEXTS) - Encoder.from_pretrained(tiny_llama_dir, **settings).encode(TEXTS)
    )
    assert unmerged_changes.max() > 1e-3  # the adapter is not trivial


def test_model_card_lists_base_stages_evaluation_and_usage(tiny_llama_dir, lora_dir, tmp_path):
    encoder = Encoder.from_pretrained(tiny_llama_dir, adapter=lora_dir, device="cpu")
    report = {"tasks": [{"name": "stsb", "type": "sts", "main_metric": "spearman", "main_score": 44.12}]}
    out = export_model(encoder, tmp_path / "merged", format="merged", evaluation=report)
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_llama_dir}" in card
    assert "**simcse**" in card and '"learning_rate": 0.0005' in card
    assert "| stsb | sts | spearman | 44.12 |" in card
    assert "decoder2vec serve --model" in card and "| pooling | mean |" in card


def test_failed_export_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    encoder = Encoder.from_pretrained(tiny_llama_dir, device="cpu")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_model_card", broken)
    for format in ("merged", "sentence-transformers"):
        with pytest.raises(OSError, match="disk full"):
            export_model(encoder, tmp_path / "exports" / "model", format=format)
        assert list((tmp_path / "exports").iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tiny_llama_dir, tmp_path):
    encoder = Encoder.from_pretrained(tiny_llama_dir, device="cpu")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(encoder, out, format="merged")
    assert (out / "keep.txt").read_text() == "mine"
    export_model(encoder, out, format="merged", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "decoder2vec_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny-llama"]  # no temporary folders left


def test_cli_export_both_formats(tiny_llama_dir, lora_dir, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"stsb": 41.5}))
    args = ["--model", str(tiny_llama_dir), "--adapter", str(lora_dir), "--pooling", "last_token", "--device", "cpu"]
    assert main(["export", str(tmp_path / "st"), "--format", "sentence-transformers", *args]) == 0
    assert main(["export", str(tmp_path / "merged"), "--format", "merged", "--eval-report", str(report), *args]) == 0
    assert "| stsb | 41.50 |" in (tmp_path / "merged" / "README.md").read_text()
    encoder = Encoder.from_pretrained(tiny_llama_dir, adapter=lora_dir, pooling="last_token", device="cpu")
    np.testing.assert_allclose(_sentence_transformer(tmp_path / "st").encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)
    assert main(["export", str(tmp_path / "st"), "--format", "merged", *args]) == 1  # exists
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_empty_text_in_every_format_with_a_bos_tokenizer(tiny_llama_dir, tmp_path, pooling):
    encoder = Encoder.from_pretrained(tiny_llama_dir, pooling=pooling, device="cpu")
    ours = encoder.encode(["", "Two dogs run."])
    merged = export_model(encoder, tmp_path / "merged", format="merged")
    np.testing.assert_allclose(Encoder.from_pretrained(merged).encode(["", "Two dogs run."]), ours, atol=1e-5)
    st_folder = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    alone = _sentence_transformer(st_folder).encode([""])  # "" reads the BOS: no error
    if pooling == "last_token":  # the BOS itself: decoder2vec's vector
        np.testing.assert_allclose(alone[0], ours[0], atol=1e-5)
    else:  # WordWeights zeroes the BOS, the only token: a zero vector, as the model card says
        assert np.abs(alone).max() == 0
        assert "returns a zero vector" in (st_folder / "README.md").read_text()


def test_empty_text_without_special_tokens_is_documented_for_sentence_transformers(tmp_path):
    folder = make_model_dir(tmp_path / "no-bos", "llama", add_bos=False)
    encoder = Encoder.from_pretrained(folder, device="cpu")
    merged = export_model(encoder, tmp_path / "merged", format="merged")
    np.testing.assert_allclose(Encoder.from_pretrained(merged).encode([""]), encoder.encode([""]), atol=1e-5)
    st_folder = export_model(encoder, tmp_path / "st", format="sentence-transformers")
    card = (st_folder / "README.md").read_text()
    assert "cannot reshape tensor of 0 elements" in card and "Drop empty texts first" in card
    mixed = _sentence_transformer(st_folder).encode(["", "Two dogs run."])  # beside other texts: a zero vector
    assert np.isfinite(mixed).all() and np.abs(mixed[0]).max() == 0
