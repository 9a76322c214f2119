"""Checks run inside the fresh venvs of .ci/wheel_check, against the installed wheel (never the source tree).

python check_wheel.py core WORK           every module imports with the core dependencies alone; tiny model
python check_wheel.py requirements EXTRA  print the extra's declared requirements (from the wheel's metadata)
python check_wheel.py extra EXTRA WORK    the extra's modules import and work with exactly those packages
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from importlib import metadata
from pathlib import Path

# modules that import an extra's package at import time, and that extra
NEEDS_EXTRA = {"decoder2vec.eval.mteb": "mteb", "decoder2vec.st_modules": "onnx"}
TEXTS = ["A man is playing a guitar.", "Someone plays music.", "The cat sleeps."]


def _installed_package() -> Path:
    import decoder2vec

    folder = Path(decoder2vec.__file__).resolve().parent
    if "site-packages" not in folder.parts:
        sys.exit(f"decoder2vec was imported from {folder}, not from an installed wheel")
    return folder


def core(work: Path) -> None:
    folder = _installed_package()
    failures = []
    for module in pkgutil.walk_packages([str(folder)], prefix="decoder2vec."):
        try:
            importlib.import_module(module.name)
        except ImportError as error:
            if module.name not in NEEDS_EXTRA:
                failures.append(f"{module.name}: {error}")
    if failures:
        sys.exit("modules that do not import with the core dependencies alone:\n  " + "\n  ".join(failures))
    from decoder2vec.train.recipes import available_recipes

    if not available_recipes():
        sys.exit("the wheel ships no training recipes (decoder2vec/recipes/*.yaml)")
    sys.path.insert(0, str(work))  # tiny.py, copied from tests/
    from tiny import make_model_dir

    make_model_dir(work / "tiny", "llama")
    (work / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    print(f"core: {sum(1 for _ in pkgutil.walk_packages([str(folder)]))} modules import; tiny model in {work}/tiny")


def requirements(extra: str) -> None:
    found = []
    for text in metadata.requires("decoder2vec") or []:  # 'fastapi>=0.165; extra == "serve"'
        requirement, _, marker = text.partition(";")
        if re.fullmatch(rf"""\s*extra\s*==\s*["']{re.escape(extra)}["']\s*""", marker):
            found.append(requirement.strip())
    if not found:
        sys.exit(f"the wheel declares no extra {extra!r}")
    print("\n".join(found))


def extra(name: str, work: Path) -> None:
    _installed_package()
    from decoder2vec import Encoder

    encoder = Encoder.from_pretrained(str(work / "tiny"), device="cpu")
    if name == "serve":
        from decoder2vec.serve import create_app

        paths = {route.path for route in create_app(encoder).routes}
        assert {"/health", "/v1/embeddings"} <= paths, paths
    elif name == "export":
        import numpy as np
        from sentence_transformers import SentenceTransformer

        from decoder2vec.export import export_model

        folder = export_model(encoder, work / "st-export", "sentence-transformers")
        theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
        difference = float(np.abs(theirs - encoder.encode(TEXTS)).max())
        assert difference < 1e-4, difference
    elif name in ("data", "eval"):
        import os

        import datasets

        from decoder2vec import catalog

        os.environ["DECODER2VEC_CACHE"] = str(work / f"cache-{name}")
        os.environ.pop("DECODER2VEC_DATA", None)
        rows = {"sentence1": ["a"], "sentence2": ["b"], "score": [0.5]}
        datasets.load_dataset = lambda *args, **kwargs: datasets.Dataset.from_dict(rows)  # no network in CI
        catalog._check_hub_reachable = lambda: None
        path = catalog.resolve_dataset("stsb", "test")
        assert path.read_text() == "sentence1\tsentence2\tscore\na\tb\t2.5\n", path.read_text()
        importlib.import_module("pyarrow.parquet")
    elif name == "onnx":
        import os

        import numpy as np
        from sentence_transformers import SentenceTransformer

        from decoder2vec.export import export_model

        os.environ["DECODER2VEC_CACHE"] = str(work / "cache-onnx")  # the int8 graph below is exported there
        folder = export_model(encoder, work / "onnx-export", "onnx")
        ours = encoder.encode(TEXTS)
        for loaded in (
            Encoder.from_pretrained(str(folder)).encode(TEXTS),
            SentenceTransformer(str(folder), backend="onnx", trust_remote_code=True, device="cpu").encode(TEXTS),
        ):
            difference = float(np.abs(loaded - ours).max())
            assert difference < 1e-4, difference
        int8 = Encoder.from_pretrained(str(work / "tiny"), quantize="int8").encode(TEXTS, normalize=True)
        cosine = np.sum(int8 * encoder.encode(TEXTS, normalize=True), axis=1).min()
        assert cosine >= 0.99, cosine
    elif name == "mteb":
        from decoder2vec.eval.mteb import MTEBEncoder

        MTEBEncoder(encoder)
    else:
        sys.exit(f"no check written for extra {name!r}")
    print(f"extra {name}: ok")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "core":
        core(Path(rest[0]))
    elif command == "requirements":
        requirements(rest[0])
    elif command == "extra":
        extra(rest[0], Path(rest[1]))
    else:
        sys.exit(__doc__)
