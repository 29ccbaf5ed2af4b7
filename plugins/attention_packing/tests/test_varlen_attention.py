"""The varlen attention function against an explicit per-example reference, plus
registration and path choice. Tolerance: fp32, atol 1e-5."""

import importlib.util
import math

import pytest
import torch
from transformers import AttentionInterface

from accel_attention_packing import attention as att
from accel_attention_packing.attention import (
    VARLEN_ATTENTION_NAME,
    choose_attention_path,
    disable_kv_cache,
    is_varlen_attention_registered,
    register_varlen_attention,
    varlen_sdpa_attention_forward,
)


class _Module(torch.nn.Module):
    is_causal = True


def _reference(q, k, v, bounds, *, scaling, window=None, softcap=None, causal=True):
    """Per-segment attention written out with explicit masks, on (H, T, D) tensors."""
    n_rep = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(n_rep, 0)
    v = v.repeat_interleave(n_rep, 0)
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        scores = q[:, s:e] @ k[:, s:e].transpose(-1, -2) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(e - s)[:, None]
        j = torch.arange(e - s)[None, :]
        allowed = (j <= i) if causal else torch.ones(e - s, e - s, dtype=torch.bool)
        if window is not None:
            allowed = allowed & (i - j < window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v[:, s:e])
    return torch.cat(outs, 1)  # (H, T, D)


def _qkv(total, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, total, dim, generator=g)
    k = torch.randn(1, kv_heads, total, dim, generator=g)
    v = torch.randn(1, kv_heads, total, dim, generator=g)
    return q, k, v


BOUNDS = [0, 5, 6, 15, 19]


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"sliding_window": 3},
        {"softcap": 2.0},
        {"sliding_window": 4, "softcap": 5.0},
        {"is_causal": False},
    ],
)
@pytest.mark.parametrize("source", ["cu_seq_lens", "position_ids"])
def test_matches_per_segment_reference(opts, source):
    q, k, v = _qkv(BOUNDS[-1])
    scaling = 0.3
    if source == "cu_seq_lens":
        cu = torch.tensor(BOUNDS, dtype=torch.int32)
        kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    else:
        pos = torch.cat([torch.arange(e - s) for s, e in zip(BOUNDS[:-1], BOUNDS[1:])])
        kw = {"position_ids": pos[None]}
    out, weights = varlen_sdpa_attention_forward(
        _Module(), q, k, v, None, dropout=0.0, scaling=scaling, **opts, **kw
    )
    assert weights is None
    assert out.shape == (1, BOUNDS[-1], 4, 8)
    ref = _reference(
        q[0],
        k[0],
        v[0],
        BOUNDS,
        scaling=scaling,
        window=opts.get("sliding_window"),
        softcap=opts.get("softcap"),
        causal=opts.get("is_causal", True),
    )
    torch.testing.assert_close(out[0].transpose(0, 1), ref, rtol=0, atol=1e-5)


def test_two_rows_with_packed_position_ids():
    """Batch of 2 packed rows: boundaries at row starts and at position resets."""
    q, k, v = _qkv(20)
    q, k, v = (t.reshape(t.shape[1], 2, 10, 8).transpose(0, 1) for t in (q, k, v))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 0, 1, 0, 1]])
    out, _ = varlen_sdpa_attention_forward(_Module(), q, k, v, None, position_ids=pos)
    bounds = [0, 3, 10, 16, 18, 20]
    flat = [t.transpose(0, 1).reshape(t.shape[1], 20, 8) for t in (q, k, v)]
    ref = _reference(*flat, bounds, scaling=8**-0.5)  # (H, 20, D)
    torch.testing.assert_close(out.reshape(20, 4, 8).transpose(0, 1), ref, rtol=0, atol=1e-5)


def test_cost_is_per_segment_not_per_row():
    """The longest attention call is the longest example, not the packed row."""
    seen = []
    original = att._attend

    def spy(q, k, v, **kw):
        seen.append(q.shape[-2])
        return original(q, k, v, **kw)

    q, k, v = _qkv(19)
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    att._attend = spy
    try:
        varlen_sdpa_attention_forward(_Module(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    finally:
        att._attend = original
    assert seen == [5, 1, 9, 4]


def test_backward_matches_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(19, seed=3))
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    out, _ = varlen_sdpa_attention_forward(
        _Module(), q, k, v, None, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu
    )
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = _reference(q2[0], k2[0], v2[0], BOUNDS, scaling=0.5)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_boundaries_and_unsupported_features_raise():
    q, k, v = _qkv(19)
    bad = torch.tensor([0, 5, 18], dtype=torch.int32)
    with pytest.raises(ValueError, match="end at batch\\*seq_len = 19"):
        varlen_sdpa_attention_forward(_Module(), q, k, v, None, cu_seq_lens_q=bad)
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="s_aux"):
        varlen_sdpa_attention_forward(
            _Module(), q, k, v, None, cu_seq_lens_q=cu, s_aux=torch.zeros(4)
        )
    mask = torch.ones(1, 19, dtype=torch.long)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="must not carry an attention_mask"):
        varlen_sdpa_attention_forward(_Module(), q, k, v, mask, cu_seq_lens_q=cu)


def test_register_is_explicit_and_idempotent(monkeypatch):
    monkeypatch.delitem(AttentionInterface._global_mapping, VARLEN_ATTENTION_NAME, raising=False)
    assert not is_varlen_attention_registered()
    assert register_varlen_attention() == VARLEN_ATTENTION_NAME
    assert register_varlen_attention() == VARLEN_ATTENTION_NAME
    assert AttentionInterface._global_mapping[VARLEN_ATTENTION_NAME] is (
        varlen_sdpa_attention_forward
    )
    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN_ATTENTION_NAME, math.sqrt)
    with pytest.raises(RuntimeError, match="already registered"):
        register_varlen_attention()


def test_choose_attention_path_without_flash_attn():
    cfg = type("Cfg", (), {"model_type": "llama"})()
    impl, reason = choose_attention_path(cfg, "cpu")
    assert impl == VARLEN_ATTENTION_NAME
    assert "needs CUDA" in reason and "llama" in reason
    if importlib.util.find_spec("flash_attn") is None:
        impl, reason = choose_attention_path(cfg, torch.device("cuda", 0))
        assert impl == VARLEN_ATTENTION_NAME
        assert "flash_attn package is not installed" in reason


def test_disable_kv_cache_rejects_non_models():
    with pytest.raises(TypeError, match="transformers model"):
        disable_kv_cache(torch.nn.Linear(2, 2))
