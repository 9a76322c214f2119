import pytest
import torch
from transformers import AutoModelForCausalLM

from decoder2vec.train import MNTPConfig
from decoder2vec.train.fused_lora import draw_keep_mask, fuse_lora
from decoder2vec.train.run import _add_lora


def _peft(model_dir, dropout: float, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = _add_lora(model, MNTPConfig(lora_r=4, lora_alpha=8, lora_dropout=dropout))  # every projection
    with torch.no_grad():  # peft starts B at zero: give the adapter a visible effect
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    loss = (hidden**2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_without_dropout_equals_peft_in_loss_and_gradients(tiny_llama_dir):
    model = _peft(tiny_llama_dir, dropout=0.0)
    model.train()
    ids = torch.randint(5, 300, (3, 11))
    loss, grads = _loss_and_grads(model, ids)
    undo = fuse_lora(model)
    fused_loss, fused_grads = _loss_and_grads(model, ids)
    assert torch.allclose(fused_loss, loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == fused_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name
    undo()
    assert "forward" not in vars(model.base_model.model.model.layers[0].self_attn.q_proj)
    assert torch.equal(_loss_and_grads(model, ids)[0], loss)


def test_eval_mode_and_undo_give_peft_outputs(tiny_llama_dir):
    model = _peft(tiny_llama_dir, dropout=0.3)
    model.eval()
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        undo = fuse_lora(model)
        fused = model(input_ids=ids).logits
        undo()
        restored = model(input_ids=ids).logits
    assert torch.allclose(fused, expected, atol=1e-5)
    assert torch.equal(restored, expected)


def test_dropout_matches_the_reference_formula_with_the_drawn_mask(tiny_llama_dir):
    """With dropout, the fused layer computes base(x) + s/(1-p) ((keep*x) A^T) B^T and its exact gradients."""
    model = _peft(tiny_llama_dir, dropout=0.25)
    model.train()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    fuse_lora(model)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    out.backward(torch.ones_like(out))
    torch.manual_seed(7)
    keep = draw_keep_mask(x.shape, 0.25)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    reference_x = x.detach().clone().requires_grad_()
    ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    scale = layer.scaling["default"] / 0.75
    expected = layer.base_layer(reference_x) + ((reference_x * keep) @ ref_a.t() @ ref_b.t()) * scale
    expected.backward(torch.ones_like(expected))
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(x.grad, reference_x.grad, atol=1e-5)
    assert torch.allclose(a.grad, ref_a.grad, atol=1e-5)
    assert torch.allclose(b.grad, ref_b.grad, atol=1e-5)


def test_projections_reading_one_input_share_a_mask_and_new_inputs_draw_anew(tiny_llama_dir):
    model = _peft(tiny_llama_dir, dropout=0.5)
    model.train()
    attention = model.base_model.model.model.layers[0].self_attn
    fuse_lora(model)
    x = torch.randn(4, 6, attention.q_proj.in_features)

    def lora_term(projection, inputs):
        return projection(inputs) - projection.base_layer(inputs)

    def expected(projection, keep):
        a, b = projection.lora_A["default"].weight, projection.lora_B["default"].weight
        return ((x * keep) @ a.t() @ b.t()) * projection.scaling["default"] / 0.5

    with torch.no_grad():
        torch.manual_seed(3)
        q, k = lora_term(attention.q_proj, x), lora_term(attention.k_proj, x)
        q_again = lora_term(attention.q_proj, x.clone())  # another tensor, same values: a new draw
        torch.manual_seed(3)
        keep = draw_keep_mask(x.shape, 0.5)
        assert torch.allclose(q, expected(attention.q_proj, keep), atol=1e-5)
        assert torch.allclose(k, expected(attention.k_proj, keep), atol=1e-5)  # k reused q's mask
        assert not torch.allclose(q_again, q, atol=1e-3)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_mask_rate_and_seeding(p):
    torch.manual_seed(0)
    mask = draw_keep_mask(torch.Size([300, 1001]), p)
    assert mask.dtype == torch.float32 and mask.shape == (300, 1001)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(1 - mask.mean().item() - p) < 0.003
    assert draw_keep_mask(torch.Size([4, 4]), p, dtype=torch.bfloat16).dtype == torch.bfloat16
    torch.manual_seed(0)
    assert torch.equal(draw_keep_mask(torch.Size([300, 1001]), p), mask)
    assert not torch.equal(draw_keep_mask(torch.Size([300, 1001]), p), mask)
    assert draw_keep_mask(torch.Size([5, 7]), 0.0).eq(1).all()
