"""Loading never runs code a model folder brings along unless the user asks (trust_remote_code stays off)."""

import json

import numpy as np

from decoder2vec import Encoder

EVIL = """
from pathlib import Path
Path(__file__).with_name("code-ran").write_text("yes")
"""


def test_a_model_folder_with_custom_code_loads_without_running_it(tiny_llama_dir):
    config_file = tiny_llama_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config_file.write_text(json.dumps(config))
    (tiny_llama_dir / "evil.py").write_text(EVIL)
    tokenizer_config = tiny_llama_dir / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    tokenizer_config.write_text(json.dumps(settings))

    vectors = Encoder.from_pretrained(str(tiny_llama_dir), device="cpu").encode(["A man plays a guitar."])
    assert np.isfinite(vectors).all()
    assert not (tiny_llama_dir / "code-ran").exists()  # the built-in Llama classes were used, evil.py never ran
