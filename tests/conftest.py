import os
import shutil

import pytest
import torch

from tiny import make_model_dir

torch.set_num_threads(int(os.environ.get("DECODER2VEC_TEST_THREADS", "2")))

# The data folder comes from DECODER2VEC_DATA only (the Makefile sets it to the shared data folder when there is
# one); tests never download: catalog tests that exercise the hub branch turn it back on with a mocked loader.
os.environ.setdefault("DECODER2VEC_HUB", "off")


@pytest.fixture(scope="session")
def _tiny_llama_session(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def tiny_llama_dir(_tiny_llama_session, tmp_path):
    """A fresh copy (per test) of a tiny random Llama model folder with a byte-level BPE tokenizer."""
    target = tmp_path / "tiny-llama"
    shutil.copytree(_tiny_llama_session, target)
    return target


@pytest.fixture(scope="session")
def shared_data():
    """The data folder of DECODER2VEC_DATA (``make test`` sets it to the shared data folder when there is one)."""
    path = os.environ.get("DECODER2VEC_DATA")
    if not path or not os.path.isdir(path):
        pytest.skip(
            f"no data folder: DECODER2VEC_DATA is {path!r} (make test sets it when the shared data folder exists)"
        )
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model (SmolLM2-135M-Instruct), converted once into the cache."""
    from decoder2vec.sources import EMBEDDED_MODELS, resolve_source

    try:
        return resolve_source("smollm2-135m")
    except Exception as error:  # package missing
        pytest.skip(f"smollm2-135m unavailable: {error} ({EMBEDDED_MODELS['smollm2-135m'].install})")
