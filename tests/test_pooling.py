import pytest
import torch

from decoder2vec.pooling import POOLING_MODES, pool

# One row of three text tokens (values 1, 2, 3 / 10, 20, 30) after a BOS-like token (value 100).
HIDDEN_RIGHT = torch.tensor([[[100.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [-7.0, -7.0]]])
ATTENTION_RIGHT = torch.tensor([[1, 1, 1, 1, 0]])
POOL_RIGHT = torch.tensor([[0, 1, 1, 1, 0]])
# The same row with left padding.
HIDDEN_LEFT = torch.tensor([[[-7.0, -7.0], [100.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]])
ATTENTION_LEFT = torch.tensor([[0, 1, 1, 1, 1]])
POOL_LEFT = torch.tensor([[0, 0, 1, 1, 1]])

EXPECTED = {
    "mean": [2.0, 20.0],
    "weighted_mean": [(1 * 1 + 2 * 2 + 3 * 3) / 6, (10 * 1 + 20 * 2 + 30 * 3) / 6],
    "last_token": [3.0, 30.0],
    "bos": [100.0, 0.0],
}


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize(
    "hidden,attention,pool_mask",
    [(HIDDEN_RIGHT, ATTENTION_RIGHT, POOL_RIGHT), (HIDDEN_LEFT, ATTENTION_LEFT, POOL_LEFT)],
    ids=["right-padding", "left-padding"],
)
def test_pooling_hand_computed(mode, hidden, attention, pool_mask):
    result = pool(hidden, attention, pool_mask, mode)
    assert result.shape == (1, 2)
    torch.testing.assert_close(result[0], torch.tensor(EXPECTED[mode]), rtol=0, atol=1e-6)


def test_rows_of_different_lengths_in_one_batch():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # values 0..7
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    pool_mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    assert pool(hidden, attention, pool_mask, "mean")[:, 0].tolist() == [2.0, 5.0]
    assert pool(hidden, attention, pool_mask, "last_token")[:, 0].tolist() == [3.0, 5.0]
    assert pool(hidden, attention, pool_mask, "bos")[:, 0].tolist() == [0.0, 4.0]


@pytest.mark.parametrize("mode", ["mean", "weighted_mean"])
def test_text_without_tokens_falls_back_to_all_real_tokens(mode):
    hidden = torch.tensor([[[4.0], [6.0], [99.0]]])
    attention = torch.tensor([[1, 1, 0]])
    nothing = torch.tensor([[0, 0, 0]])
    expected = 5.0 if mode == "mean" else (4.0 * 1 + 6.0 * 2) / 3
    assert pool(hidden, attention, nothing, mode)[0, 0].item() == pytest.approx(expected)


def test_unknown_mode_lists_choices():
    with pytest.raises(ValueError, match="mean, weighted_mean, last_token, bos"):
        pool(HIDDEN_RIGHT, ATTENTION_RIGHT, POOL_RIGHT, "cls_token")
