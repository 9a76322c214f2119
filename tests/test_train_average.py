import json

import numpy as np
import pytest
import torch

from decoder2vec import Encoder
from decoder2vec.train import average_adapters
from tiny import CORPUS

TEXTS = CORPUS[:7]
# peft reads `is_gradient_checkpointing`, which transformers 5 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _random_adapter(model_dir, folder, seed: int, r: int = 4, alpha: int = 8):
    """A LoRA adapter on every linear layer with random (non-zero) A and B, saved as a PEFT folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    return folder


def _merged_weights(model_dir, adapter) -> dict[str, torch.Tensor]:
    encoder = Encoder.from_pretrained(str(model_dir), adapter=str(adapter), device="cpu")  # merged on loading
    return {k: v.clone() for k, v in encoder.model.state_dict().items()}


def test_average_equals_mean_of_merged_weights(tiny_llama_dir, tmp_path):
    folders = [
        _random_adapter(tiny_llama_dir, tmp_path / "a", seed=1, r=4, alpha=8),
        _random_adapter(tiny_llama_dir, tmp_path / "b", seed=2, r=4, alpha=8),
        _random_adapter(tiny_llama_dir, tmp_path / "c", seed=3, r=2, alpha=16),  # another rank and scale
    ]
    weights = [0.5, 0.25, 0.25]
    averaged = average_adapters(folders, tmp_path / "avg", weights=weights)
    assert json.loads((averaged / "adapter_config.json").read_text())["r"] == 10

    each = [_merged_weights(tiny_llama_dir, f) for f in folders]
    expected = {k: sum(w * m[k] for w, m in zip(weights, each, strict=True)) for k in each[0]}
    got = _merged_weights(tiny_llama_dir, averaged)
    assert set(got) == set(expected)
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert worst < 1e-6

    # and not the naive average of A and B, which differs: the test can tell the two apart
    naive = {k: sum(m[k] for m in each[:2]) / 2 for k in each[0]}
    avg2 = _merged_weights(tiny_llama_dir, average_adapters(folders[:2], tmp_path / "avg2"))
    assert max((avg2[k] - naive[k]).abs().max().item() for k in naive) < 1e-6


def test_scale_moves_the_merged_weights_toward_the_base_model(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    folders = [_random_adapter(tiny_llama_dir, tmp_path / n, seed=i) for i, n in enumerate("ab")]
    full = _merged_weights(tiny_llama_dir, average_adapters(folders, tmp_path / "full"))
    half = _merged_weights(tiny_llama_dir, average_adapters(folders, tmp_path / "half", scale=0.5))
    assert set(half) == set(full) <= set(base)
    worst = max((half[k] - (base[k] + 0.5 * (full[k] - base[k]))).abs().max().item() for k in half)
    assert worst < 1e-6
    assert max((full[k] - base[k]).abs().max().item() for k in full) > 1e-3  # the update is not negligible
    record = json.loads((tmp_path / "half" / "decoder2vec_average.json").read_text())
    assert record["scale"] == 0.5 and record["weights"] == [0.25, 0.25]
    with pytest.raises(ValueError, match="scale must be a positive"):
        average_adapters(folders, tmp_path / "zero", scale=0)
    assert not (tmp_path / "zero").exists()


def test_average_of_one_adapter_encodes_like_it(tiny_llama_dir, tmp_path):
    folder = _random_adapter(tiny_llama_dir, tmp_path / "a", seed=4)
    single = Encoder.from_pretrained(str(tiny_llama_dir), adapter=str(folder), device="cpu").encode(TEXTS)
    averaged = average_adapters([folder], tmp_path / "avg")
    again = Encoder.from_pretrained(str(tiny_llama_dir), adapter=str(averaged), device="cpu").encode(TEXTS)
    assert np.abs(single - again).max() < 1e-5


def test_average_rejects_unlike_adapters(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    full = _random_adapter(tiny_llama_dir, tmp_path / "full", seed=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="other modules"):
        average_adapters([full, tmp_path / "q"], tmp_path / "avg")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        average_adapters([full, tmp_path], tmp_path / "avg")
    with pytest.raises(ValueError, match="weights"):
        average_adapters([full, full], tmp_path / "avg", weights=[1.0])
    assert not (tmp_path / "avg").exists()
