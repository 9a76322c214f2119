"""MTEB's own runner evaluates an Encoder through the adapter, offline, on the local STS-B test file."""

import socket

import pytest

from decoder2vec import Encoder
from decoder2vec.eval.sts import STSEvaluator, read_sts_tsv
from decoder2vec.eval.tasks import TASKS


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_mteb_main_score_agrees_with_our_sts_evaluator(offline, tiny_llama_dir, shared_data, tmp_path):
    mteb = pytest.importorskip("mteb")
    from decoder2vec.eval.mteb import MTEBEncoder, local_sts_task

    stsb = f"{shared_data}/{TASKS['stsb'].files['test']}"
    encoder = Encoder.from_pretrained(tiny_llama_dir)
    model = MTEBEncoder(encoder)
    assert isinstance(model, mteb.EncoderProtocol)

    results = mteb.evaluate(
        model,
        local_sts_task(stsb, name="LocalSTSB"),
        cache=mteb.ResultCache(tmp_path / "results"),
        encode_kwargs={"batch_size": 32},
        show_progress_bar=False,
        co2_tracker=False,
    )
    [task_result] = results.task_results
    assert task_result.task_name == "LocalSTSB"
    mteb_score = task_result.get_score() * 100  # MTEB's main score, cosine Spearman, is in 0-1
    assert list((tmp_path / "results").rglob("LocalSTSB.json"))  # results went to tmp_path

    # the same encoder, data and (STS) instruction through our evaluator
    ours = STSEvaluator(read_sts_tsv(stsb), instruction=TASKS["stsb"].instruction)(encoder)
    assert mteb_score == pytest.approx(ours["spearman"], abs=0.1)


def test_adapter_instructions_by_task_and_side(offline):
    pytest.importorskip("mteb")
    from mteb.types import PromptType

    from decoder2vec.eval.mteb import MTEB_INSTRUCTIONS, MTEBEncoder

    class Recorder:
        dim = 2

        def encode(self, texts, instruction=None, batch_size=32, show_progress=None):
            self.seen = (list(texts), instruction, batch_size)
            return [[1.0, 0.0]] * len(texts)

    recorder = Recorder()
    model = MTEBEncoder(recorder, instructions={"Retrieval": "Find answers", "LocalSTS": None})
    retrieval = type("Meta", (), {"name": "SomeRetrieval", "type": "Retrieval"})()
    assert model.instruction_for(retrieval, PromptType.query) == "Find answers"
    assert model.instruction_for(retrieval, PromptType.document) is None  # documents never get one
    sts = type("Meta", (), {"name": "LocalSTS", "type": "STS"})()
    assert model.instruction_for(sts, None) is None  # a task-name key wins over the type
    other = type("Meta", (), {"name": "X", "type": "STS"})()
    assert model.instruction_for(other, None) == MTEB_INSTRUCTIONS["STS"]
    batches = [{"text": ["a", "b"]}, {"text": ["c"]}]
    model.encode(batches, task_metadata=other, hf_split="test", hf_subset="default", batch_size=8)
    assert recorder.seen == (["a", "b", "c"], MTEB_INSTRUCTIONS["STS"], 8)
