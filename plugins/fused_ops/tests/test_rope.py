"""RoPE kernels against transformers' ``apply_rotary_pos_emb`` and ``LlamaRotaryEmbedding``.

Tolerances: fp32 rtol=1e-5, atol=1e-6 (the rotation is two products and a sum per element).
bf16: max abs error <= 1e-2 * max |expected| (transformers rounds each product to bf16, the
kernel rounds once). Packed rows against separate examples: exact (same per-token inputs,
same arithmetic). The PyTorch path reproduces the forward bit for bit (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_rope
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as hf_partial_rope

from accel.testing import assert_close_scaled
from accel_fused_ops.kernels.rope import apply_rotary_pos_emb

B, H, HKV, S = 2, 3, 1, 37  # GQA: 3 query heads share 1 key head; 74 programs


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.float32:
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert_close_scaled(actual, expected, 1e-2)


def rotary(head_dim: int, device="cpu") -> LlamaRotaryEmbedding:
    config = LlamaConfig(
        hidden_size=H * head_dim,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        head_dim=head_dim,
        max_position_embeddings=256,
    )
    return LlamaRotaryEmbedding(config).to(device)


def projections(dtype, head_dim, heads_dim=1, seed=0, device="cpu"):
    """q, k as a model makes them: (B, S, H, D) projections, transposed for heads_dim=1."""
    torch.manual_seed(seed)
    q = torch.randn(B, S, H, head_dim, dtype=dtype).to(device)
    k = torch.randn(B, S, HKV, head_dim, dtype=dtype).to(device)
    if heads_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q.requires_grad_(), k.requires_grad_()


def forward_backward(fn, q, k, cos, sin, grads, **kw):
    q_out, k_out = fn(q, k, cos, sin, **kw)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), grads)
    return q_out, k_out, dq, dk


def check_against(fn_ref, q, k, cos, sin, impl, **kw):
    expected = fn_ref(q, k, cos, sin, **kw)
    grads = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
    expected = forward_backward(fn_ref, q, k, cos, sin, grads, **kw)
    got = forward_backward(apply_rotary_pos_emb, q, k, cos, sin, grads, **kw)
    for g, e in zip(got, expected):
        assert_close(g, e)
    if impl == "torch":
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    return got


def test_matches_transformers(impl, device, dtype):
    q, k = projections(dtype, head_dim=24, device=device)
    position_ids = torch.stack([torch.arange(S), torch.arange(5, 5 + S)]).to(device)
    cos, sin = rotary(24, device)(q, position_ids)
    check_against(hf_rope, q, k, cos, sin, impl)


def test_packed_rows_equal_separate_examples(impl, device):
    """position_ids restarting inside a row (padding-free batches) rotate each example as if
    it ran alone, because cos/sin are gathered per token."""
    lengths = [4, 3, 2, 11, 17]
    assert sum(lengths) == S
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # [[0,1,2,3,0,1,2,0,1,...]]
    position_ids = position_ids.to(device)
    emb = rotary(24, device)
    torch.manual_seed(1)
    q = torch.randn(1, H, S, 24).to(device).requires_grad_()
    k = torch.randn(1, HKV, S, 24).to(device).requires_grad_()
    grads = (torch.randn(1, H, S, 24).to(device), torch.randn(1, HKV, S, 24).to(device))

    cos, sin = emb(q, position_ids)
    packed = forward_backward(apply_rotary_pos_emb, q, k, cos, sin, grads)
    # The packed call also equals transformers on the same packed inputs.
    for g, e in zip(packed, forward_backward(hf_rope, q, k, cos, sin, grads)):
        assert_close(g, e)

    start = 0
    for n in lengths:
        part = slice(start, start + n)
        q_i = q.detach()[:, :, part].clone().requires_grad_()
        k_i = k.detach()[:, :, part].clone().requires_grad_()
        cos_i, sin_i = emb(q_i, torch.arange(n, device=device)[None])
        grads_i = (grads[0][:, :, part], grads[1][:, :, part])
        alone = forward_backward(apply_rotary_pos_emb, q_i, k_i, cos_i, sin_i, grads_i)
        for p, a in zip(packed, alone):
            assert torch.equal(p[:, :, part], a)
        start += n


def test_heads_on_dim_2_with_shared_positions(impl, device):
    """(B, S, H, D) layout with unsqueeze_dim=2, head_dim 40, cos/sin of batch 1."""
    q, k = projections(torch.float32, head_dim=40, heads_dim=2, seed=2, device=device)
    cos, sin = rotary(40, device)(q, torch.arange(S, device=device)[None])
    assert cos.shape[0] == 1
    q_out, k_out, _, _ = check_against(hf_rope, q, k, cos, sin, impl, unsqueeze_dim=2)
    assert q_out.shape == (B, S, H, 40) and k_out.shape == (B, S, HKV, 40)


def test_partial_rotary_matches_phi3(impl, device):
    """Rotary dim 16 of head dim 24: the last 8 dims pass through (Phi3 semantics)."""
    q, k = projections(torch.float32, head_dim=24, seed=3, device=device)
    config = Phi3Config(
        hidden_size=H * 24,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        partial_rotary_factor=16 / 24,
        max_position_embeddings=256,
    )
    position_ids = torch.stack([torch.arange(S), torch.arange(7, 7 + S)]).to(device)
    cos, sin = Phi3RotaryEmbedding(config).to(device)(q, position_ids)
    assert cos.shape[-1] == 16
    check_against(hf_partial_rope, q, k, cos, sin, impl)


def test_position_ids_argument_is_ignored_and_checked():
    q, k = projections(torch.float32, head_dim=24)
    position_ids = torch.arange(S).expand(B, S)
    cos, sin = rotary(24)(q, position_ids)
    with_ids = apply_rotary_pos_emb(q, k, cos, sin, position_ids)
    without = apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(with_ids, without))
    with pytest.raises(TypeError, match="pass unsqueeze_dim by keyword"):
        apply_rotary_pos_emb(q, k, cos, sin, 2)
    with pytest.raises(ValueError, match="must have the same shape"):
        apply_rotary_pos_emb(q, k, cos, sin[..., :12])


def test_cos_sin_requiring_grad_fall_back_to_autograd(impl, device):
    q, k = projections(torch.float32, head_dim=24, seed=4, device=device)
    cos, sin = rotary(24, device)(q, torch.arange(S, device=device).expand(B, S))
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    d_cos, d_sin = torch.autograd.grad((q_out.sum() + k_out.sum()), (cos, sin))
    e_q, e_k = hf_rope(q, k, cos, sin)
    e_cos, e_sin = torch.autograd.grad((e_q.sum() + e_k.sum()), (cos, sin))
    torch.testing.assert_close(d_cos, e_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_sin, e_sin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads_dim", [1, 2])
def test_two_dim_tables_broadcast_over_batch(impl, device, heads_dim):
    """(S, R) cos/sin mean one table for every sequence: equal to the (1, S, R) result of
    transformers' formula, forward and backward, fp32 at rtol=1e-5, atol=1e-6."""
    q, k = projections(torch.float32, head_dim=10, heads_dim=heads_dim, device=device)
    position_ids = torch.arange(S, device=device).unsqueeze(0)
    cos, sin = rotary(10, device)(q, position_ids)
    grads = (torch.randn_like(q), torch.randn_like(k))
    expected = forward_backward(hf_rope, q, k, cos, sin, grads, unsqueeze_dim=heads_dim)
    got = forward_backward(
        apply_rotary_pos_emb, q, k, cos[0], sin[0], grads, unsqueeze_dim=heads_dim
    )
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


def test_two_dim_tables_of_wrong_length_are_refused():
    q, k = projections(torch.float32, head_dim=10)
    cos, sin = rotary(10)(q, torch.arange(S - 1).unsqueeze(0))
    with pytest.raises(ValueError, match=r"2-D cos/sin \(36, 10\) must be \(seq_len"):
        apply_rotary_pos_emb(q, k, cos[0], sin[0])


# ------------------------------------------------------------------ other modeling-file forms


def _against(fused, reference, q, k, cos, sin):
    expected = reference(q, k, cos, sin)
    grads = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
    want = forward_backward(reference, q, k, cos, sin, grads)
    got = forward_backward(fused, q, k, cos, sin, grads)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype
        assert_close(g, e)


def test_gpt_oss_half_width_form(impl, device, dtype):
    """GPT-OSS rotates the halves with (B, S, D/2) tables; the fused op gets them doubled."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    from accel_fused_ops.integration.rope import fused_half_width_rope, rope_replacement

    assert rope_replacement(modeling_gpt_oss) is fused_half_width_rope
    head_dim = 22
    q, k = projections(dtype, head_dim, device=device)
    angles = torch.rand(B, S, head_dim // 2) * 6.0
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    _against(fused_half_width_rope, modeling_gpt_oss.apply_rotary_pos_emb, q, k, cos, sin)


def test_olmo2_cast_back_form(impl, device):
    """OLMo2 rotates in the promoted dtype (bf16 q/k, fp32 cos/sin) and casts back."""
    from transformers.models.olmo2 import modeling_olmo2

    from accel_fused_ops.integration.rope import fused_cast_back_rope, rope_replacement

    assert rope_replacement(modeling_olmo2) is fused_cast_back_rope
    head_dim = 22
    q, k = projections(torch.bfloat16, head_dim, device=device)
    position_ids = torch.arange(S).expand(B, S).to(device)
    cos, sin = rotary(head_dim, device)(torch.zeros(1, device=device), position_ids)
    _against(fused_cast_back_rope, modeling_olmo2.apply_rotary_pos_emb, q, k, cos, sin)
