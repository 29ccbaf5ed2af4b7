"""ScatterMoE against transformers' eager experts on whole tiny models: logits, loss (with the
router's auxiliary loss) and every parameter's gradient, fp32 tight; bf16 within rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_models import MODEL_TYPES, moe_model

from accel.testing import assert_close_scaled
from accel_moe.experts import register


def _pair(model_type: str, dtype=torch.float32):
    register()
    eager = moe_model(model_type).to(dtype)
    ours = copy.deepcopy(eager)
    eager.set_experts_implementation("eager")
    ours.set_experts_implementation("scattermoe")
    return eager, ours


def _step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fp32_parity_with_eager(model_type):
    eager, ours = _pair(model_type)
    ids = torch.randint(4, 60, (3, 11))
    want, want_grads = _step(eager, ids)
    got, got_grads = _step(ours, ids)
    assert want.aux_loss is not None and got.aux_loss.requires_grad  # router logits flow
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=1e-6)
    assert all(g is not None for g in got_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_triton_kernels_in_a_model(monkeypatch):
    """The Triton path (interpreter on CPU) inside a whole Mixtral forward and backward."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "triton")
    eager, ours = _pair("mixtral")
    ids = torch.randint(4, 60, (2, 9))
    want, want_grads = _step(eager, ids)
    got, got_grads = _step(ours, ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_within_rounding():
    eager, ours = _pair("qwen3_moe", torch.bfloat16)
    ids = torch.randint(4, 60, (2, 9))
    want, _ = _step(eager, ids)
    got, _ = _step(ours, ids)
    assert got.logits.dtype == torch.bfloat16
    assert_close_scaled(got.logits.float(), want.logits.float(), rel=3e-2, what="logits")
    assert abs(got.loss.item() - want.loss.item()) < 2e-2


def test_padding_free_batch_matches_padded():
    """Flattened examples (position_ids restarting per example) give the padded batch's loss."""
    _, ours = _pair("mixtral")
    ours.config.use_cache = False
    a, b = torch.randint(4, 60, (1, 7)), torch.randint(4, 60, (1, 5))
    flat = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    labels = flat.clone()
    labels[0, 7] = -100  # the first token of the second example predicts nothing
    packed = ours(input_ids=flat, position_ids=positions, labels=labels, use_cache=False)
    padded = torch.full((2, 7), 0)
    padded[0], padded[1, :5] = a[0], b[0]
    mask = (torch.arange(7) < torch.tensor([[7], [5]])).long()
    plabels = padded.masked_fill(mask == 0, -100)
    out = ours(input_ids=padded, attention_mask=mask, labels=plabels, use_cache=False)
    torch.testing.assert_close(packed.logits[0, :7], out.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.logits[0, 7:], out.logits[1, :5], rtol=1e-5, atol=1e-5)
    # 6 + 4 predicted tokens either way; the padded router also sees the 2 padding tokens,
    # so only the language-model part of the loss is compared
    lm = packed.loss - ours.config.router_aux_loss_coef * packed.aux_loss
    lm_padded = out.loss - ours.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(lm, lm_padded, rtol=1e-5, atol=1e-6)
