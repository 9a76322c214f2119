"""Task registry, reports (run, write, compare) and the `decoder2vec eval` command lines."""

import json
import os

import pytest

from decoder2vec.cli import main
from decoder2vec.eval.classification import LabelledTexts
from decoder2vec.eval.report import compare_table, markdown_table, read_report, run_tasks, write_report
from decoder2vec.eval.tasks import (
    TASKS,
    TaskSpec,
    build_evaluator,
    load_task_file,
    parse_task_option,
    resolve_tasks,
    subsample,
)
from fake_encoder import FakeEncoder

STS_ROWS = "sentence1\tsentence2\tscore\na1\tb1\t5\na2\tb2\t3\na3\tb3\t4\na4\tb4\t1\n"
PAIR_ROWS = "sentence1\tsentence2\tlabel\na1\tb1\t1\na2\tb2\t0\na3\tb3\t1\na4\tb4\t0\n"
VECTORS = {f"a{i}": [1, 0] for i in range(1, 5)} | {"b1": [1, 0], "b2": [0.8, 0.6], "b3": [0.6, 0.8], "b4": [0, 1]}


@pytest.fixture
def toy_files(tmp_path):
    (tmp_path / "sts.tsv").write_text(STS_ROWS)
    (tmp_path / "pairs.tsv").write_text(PAIR_ROWS)
    return tmp_path


def test_builtin_tasks_point_at_the_shared_data(shared_data):
    for name in ("stsb", "sickr", "trec", "mrpc"):
        spec = TASKS[name]
        for path in spec.files.values():
            assert os.path.isfile(os.path.join(shared_data, path)), path
    assert TASKS["trec"].encoding == "latin-1"
    assert all(TASKS[name].instruction for name in ("stsb", "sickr", "trec", "mrpc"))


def test_users_add_tasks_by_pointing_at_files(tmp_path):
    spec = parse_task_option("news=classification:train.tsv,test.tsv", base=tmp_path)
    assert spec.type == "classification"
    assert spec.files == {"train": str(tmp_path / "train.tsv"), "test": str(tmp_path / "test.tsv")}
    with pytest.raises(ValueError, match="needs 2 path"):
        parse_task_option("news=classification:train.tsv")
    with pytest.raises(ValueError, match="NAME=TYPE:PATH"):
        parse_task_option("news")
    with pytest.raises(ValueError, match="unknown type 'regression'"):
        parse_task_option("x=regression:a.tsv")

    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n  - name: mine\n    type: sts\n    files: {test: data/sts.tsv}\n    instruction: Compare\n"
    )
    (tmp_path / "tasks.json").write_text(json.dumps([{"name": "p", "type": "pairs", "files": {"test": "/abs/p.tsv"}}]))
    [mine] = load_task_file(tmp_path / "tasks.yaml")
    assert mine.files == {"test": str(tmp_path / "data" / "sts.tsv")} and mine.instruction == "Compare"
    assert load_task_file(tmp_path / "tasks.json")[0].files == {"test": "/abs/p.tsv"}
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "p", "type": "pairs", "files": {}, "colour": "red"}]))
    with pytest.raises(ValueError, match="unknown key"):
        load_task_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="needs files for train, test"):
        TaskSpec("x", "classification", {"test": "a"})
    with pytest.raises(ValueError, match="unknown task.*nope.*--task NAME=TYPE:PATH"):
        resolve_tasks("stsb,nope")
    assert [s.name for s in resolve_tasks("mine,stsb", [mine])] == ["mine", "stsb"]


def test_missing_files_and_sampling(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODER2VEC_CACHE", str(tmp_path / "cache"))  # no converted hub copy either
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        build_evaluator(TASKS["stsb"], tmp_path)
    data = LabelledTexts([f"t{i}" for i in range(10)], [f"l{i}" for i in range(10)])
    sample = subsample(data, 4)
    assert len(sample) == 4 and [t[1:] for t in sample.texts] == [label[1:] for label in sample.labels]
    assert sample.texts == sorted(sample.texts) and subsample(data, 4) == sample  # file order, seeded
    assert subsample(data, None) is data and subsample(data, 50) == data


def test_task_file_paths_resolve_against_the_task_files_folder(toy_files, tmp_path, monkeypatch):
    """A relative path in a task file is relative to that file's folder, however the file itself was named."""
    (tmp_path / "tasks" / "data").mkdir(parents=True)
    (tmp_path / "tasks" / "data" / "sts.tsv").write_text(STS_ROWS)
    entries = [
        {"name": "relative", "type": "sts", "files": {"test": "data/sts.tsv"}},
        {"name": "absolute", "type": "sts", "files": {"test": str(toy_files / "sts.tsv")}},
    ]
    (tmp_path / "tasks" / "tasks.json").write_text(json.dumps(entries))
    monkeypatch.chdir(tmp_path)
    relative, absolute = load_task_file("tasks/tasks.json")  # the task file named relative to the working folder
    assert relative.files == {"test": str(tmp_path / "tasks" / "data" / "sts.tsv")}
    assert absolute.files == {"test": str(toy_files / "sts.tsv")}
    elsewhere = tmp_path / "elsewhere"  # a data folder must not be joined in front of either path
    for spec in (relative, absolute):
        scores = build_evaluator(spec, elsewhere)(FakeEncoder(VECTORS))
        assert scores["spearman"] == pytest.approx(80.0)


def test_builtin_task_files_missing_locally_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODER2VEC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "data" / "sts").mkdir(parents=True)
    (tmp_path / "cache" / "data" / "sts" / "stsb_test.tsv").write_text(STS_ROWS)  # as a hub download leaves it
    scores = build_evaluator(TASKS["stsb"], tmp_path / "empty", instruction="")(FakeEncoder(VECTORS))
    assert scores["spearman"] == pytest.approx(80.0)


def test_report_runs_tasks_with_instructions_and_compares(toy_files, tmp_path):
    specs = [
        parse_task_option("toysts=sts:sts.tsv", base=toy_files),
        TaskSpec("toypairs", "pairs", {"test": "pairs.tsv"}, instruction="Find a paraphrase"),
    ]
    encoder = FakeEncoder(VECTORS)
    report = run_tasks(encoder, specs, data_dir=toy_files)
    sts, pairs = report["tasks"]
    assert (sts["main_metric"], sts["main_score"]) == ("spearman", pytest.approx(80.0))
    assert sts["instruction"] is None and pairs["instruction"] == "Find a paraphrase"
    assert pairs["metrics"]["ap"] == pytest.approx((1 + 2 / 3) / 2 * 100)  # cosines 1, .8, .6, 0; labels 1, 0, 1, 0
    assert encoder.calls[-1][1] == "Find a paraphrase"
    assert set(report["versions"]) >= {"decoder2vec", "torch", "transformers", "python"}
    assert "| toysts | sts | spearman | 80.00 |" in markdown_table(report)

    overridden = run_tasks(encoder, specs, data_dir=toy_files, instruction="")  # '' turns instructions off
    assert overridden["tasks"][1]["instruction"] is None and encoder.calls[-1][1] is None

    path = write_report(report, tmp_path / "out" / "a.json")
    assert read_report(path) == json.loads(json.dumps(report))
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary file left behind
    better = json.loads(json.dumps(report))
    better["tasks"][0]["metrics"]["spearman"] = 85.5
    table = compare_table(report, better, labels=("base", "tuned"))
    assert "| toysts | sts | spearman | 80.00 | 85.50 | +5.50 |" in table
    assert "| toypairs | pairs | f1 |" in compare_table(report, better, all_metrics=True)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a decoder2vec eval report"):
        read_report(tmp_path / "junk.json")


def test_eval_command_lines_with_a_tiny_encoder(tiny_llama_dir, toy_files, tmp_path, capsys):
    model = str(tiny_llama_dir)
    task_file = tmp_path / "tasks.json"
    task_file.write_text(
        json.dumps([{"name": "toypairs", "type": "pairs", "files": {"test": str(toy_files / "pairs.tsv")}}])
    )
    causal, bidirectional = tmp_path / "causal.json", tmp_path / "bidirectional.json"
    common = ["--task", f"toysts=sts:{toy_files / 'sts.tsv'}", "--task-file", str(task_file)]
    common += ["--tasks", "toysts,toypairs"]
    assert main(["eval", "--model", model, "--causal", *common, "--output", str(causal)]) == 0
    assert main(["eval", "--model", model, *common, "-o", str(bidirectional), "--instruction", "Compare"]) == 0
    out = capsys.readouterr().out
    assert "| toysts | sts | spearman |" in out and "| toypairs | pairs | ap |" in out
    first, second = read_report(causal), read_report(bidirectional)
    assert first["bidirectional"] is False and second["bidirectional"] is True
    assert first["model"] == model and first["pooling"] == "mean"
    assert second["tasks"][0]["instruction"] == "Compare"
    assert {"spearman", "pearson"} <= set(first["tasks"][0]["metrics"])

    assert main(["eval", "compare", str(causal), str(bidirectional)]) == 0
    assert "| task | type | metric | causal | bidirectional | difference |" in capsys.readouterr().out

    assert main(["eval", "sts", "--data", str(toy_files / "sts.tsv"), "--model", model]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(json.loads(last)) >= {"spearman", "pearson", "pooling", "bidirectional"}

    assert main(["eval", "tasks"]) == 0
    assert "| trec | classification |" in capsys.readouterr().out
    assert main(["eval", "--model", model, "--tasks", "nope"]) == 1
    assert "unknown task(s) nope" in capsys.readouterr().err


def test_a_beir_folder_task_through_the_registry(tmp_path):
    (tmp_path / "beir" / "qrels").mkdir(parents=True)
    corpus = [{"_id": "d1", "text": "a1"}, {"_id": "d2", "text": "b4"}]
    (tmp_path / "beir" / "corpus.jsonl").write_text("\n".join(json.dumps(row) for row in corpus))
    (tmp_path / "beir" / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "b1"}))
    (tmp_path / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td1\t1\n")
    spec = parse_task_option("toyir=retrieval:beir", base=tmp_path)
    spec.instruction = "Find the passage"
    encoder = FakeEncoder(VECTORS)
    [result] = run_tasks(encoder, [spec])["tasks"]
    assert result["main_metric"] == "ndcg@10" and result["main_score"] == pytest.approx(100.0)
    assert encoder.instruction_of("b1") == "Find the passage" and encoder.instruction_of("a1") is None


def test_public_names_load_lazily():
    import decoder2vec.eval as evaluation

    assert set(evaluation.__all__) >= {"STSEvaluator", "RetrievalEvaluator", "ClassificationEvaluator", "run_tasks"}
    assert evaluation.PairClassificationEvaluator.primary_metric == "ap"
