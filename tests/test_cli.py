"""The command line: encode (file or stdin -> .npy) and eval sts, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from decoder2vec.cli import main


def test_encode_file_to_npy(tiny_llama_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\nsecond line\nthird 🙂\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    assert main(["encode", str(texts), "-o", str(out), "--model", str(tiny_llama_dir), "--normalize"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["texts"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_encode_from_stdin(tiny_llama_dir, tmp_path):
    out = tmp_path / "stdin.npy"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "decoder2vec.cli",
            "encode",
            "-",
            "-o",
            str(out),
            "--model",
            str(tiny_llama_dir),
            "--pooling",
            "last_token",
            "--causal",
        ],
        input="one\ntwo\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert np.load(out).shape == (2, 32)


def write_sts(path):
    rows = [
        ("A man is playing a guitar.", "A man plays a guitar.", 4.8),
        ("A woman is slicing an onion.", "A woman cuts an onion.", 4.2),
        ("The cat sits on the mat.", "A dog runs in the park.", 0.6),
        ("Paris is the capital of France.", "France's capital is Paris.", 4.9),
        ("Numbers like 3.14 appear.", "The cat sleeps.", 0.2),
    ]
    lines = ["sentence1\tsentence2\tscore\tgenre"] + [f"{a}\t{b}\t{s}\tx" for a, b, s in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_eval_sts_prints_json_last(tiny_llama_dir, tmp_path, capsys):
    data = write_sts(tmp_path / "sts.tsv")
    assert (
        main(["eval", "sts", "--model", str(tiny_llama_dir), "--data", str(data), "--pooling", "weighted_mean"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert -100 <= result["spearman"] <= 100 and -100 <= result["pearson"] <= 100
    assert result["pooling"] == "weighted_mean" and result["bidirectional"] is True


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["encode", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x.npy")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "sts", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "nope.tsv")]) == 1
    assert "decoder2vec: error:" in capsys.readouterr().err


def test_missing_optional_package_names_the_extra(monkeypatch, capsys):
    import decoder2vec.cli as cli

    def needs_fastapi(args):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(handler=needs_fastapi)
    assert cli.main([]) == 1
    assert 'pip install "decoder2vec[serve]"' in capsys.readouterr().err

    def needs_something_else(args):
        raise ModuleNotFoundError("No module named 'nonexistent_pkg'", name="nonexistent_pkg")

    parser.set_defaults(handler=needs_something_else)
    with pytest.raises(ModuleNotFoundError):
        cli.main([])
