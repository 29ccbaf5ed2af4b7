"""cross_entropy against torch.nn.functional.cross_entropy, on both implementations.

The Triton kernel runs on small odd shapes, on CPU under TRITON_INTERPRET=1 and compiled on
CUDA where a GPU is present (see conftest.py).
Tolerances: fp32 inputs rtol=1e-5 (atol 1e-6 for values near zero); bf16 inputs compare
the loss at rtol=1e-5 (both sides compute in fp32 from the same bf16 values) and the
gradient, rounded to bf16 once or twice, at rtol=2e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel_fused_ops.kernels.cross_entropy import (
    _ce_rows_torch,
    _ce_rows_triton,
    cross_entropy,
)

N, V = 37, 129
FP32 = {"rtol": 1e-5, "atol": 1e-6}
BF16_LOSS = {"rtol": 1e-5, "atol": 1e-5}
BF16_GRAD = {"rtol": 2e-2, "atol": 1e-5}


def reference(logits, labels, *, ignore_index=-100, reduction="mean", num_items=None, softcap=None):
    """What transformers does: upcast to fp32, (softcap), F.cross_entropy, / num_items."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if num_items is not None:
        return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum") / num_items
    return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction)


def make_inputs(dtype, n=N, v=V, seed=0, ignore_every=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = -100
    return logits.to(device), labels.to(device)


def run_both(logits, labels, **kw):
    """Loss and logits-gradient of ours and of the reference for a random grad_output."""
    ref_kw = {k if k != "num_items_in_batch" else "num_items": v for k, v in kw.items()}
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = cross_entropy(x1, labels, **kw)
    ref = reference(x2, labels, **ref_kw)
    go = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(ours.device)
    (ours * go).sum().backward()
    (ref * go).sum().backward()
    return ours, ref, x1.grad, x2.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_matches_torch(impl, device, dtype, softcap, reduction):
    logits, labels = make_inputs(dtype, device=device)
    ours, ref, g1, g2 = run_both(logits, labels, reduction=reduction, softcap=softcap)
    assert ours.dtype == torch.float32
    assert g1.dtype == dtype
    loss_tol, grad_tol = (FP32, FP32) if dtype == torch.float32 else (BF16_LOSS, BF16_GRAD)
    torch.testing.assert_close(ours, ref, **loss_tol)
    torch.testing.assert_close(g1.float(), g2.float(), **grad_tol)
    assert torch.all(g1[labels == -100] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(impl, device, reduction, as_tensor):
    logits, labels = make_inputs(torch.float32, device=device)
    num_items = torch.tensor(100, device=device) if as_tensor else 100
    ours, ref, g1, g2 = run_both(logits, labels, reduction=reduction, num_items_in_batch=num_items)
    torch.testing.assert_close(ours, ref, **FP32)
    torch.testing.assert_close(g1, g2, **FP32)
    # sum / num_items: independent of the reduction argument, like transformers.
    expected = F.cross_entropy(logits, labels, reduction="sum") / 100
    torch.testing.assert_close(ours, expected, **FP32)


def test_all_rows_ignored(impl, device):
    logits, _ = make_inputs(torch.float32, n=6, device=device)
    labels = torch.full((6,), -100, device=device)
    x = logits.clone().requires_grad_(True)
    loss = cross_entropy(x, labels)
    assert torch.isnan(loss)  # torch's mean over zero tokens is NaN too
    loss.backward()
    assert torch.all(x.grad == 0)
    assert cross_entropy(logits, labels, reduction="sum").item() == 0.0


def test_ignore_index_inside_vocabulary(impl, device):
    """A pad id used as ignore_index (here 0) is skipped, not treated as a target."""
    logits, labels = make_inputs(torch.float32, device=device)
    labels[labels == -100] = 0
    labels[1:4] = 0
    ours, ref, g1, g2 = run_both(logits, labels, ignore_index=0)
    torch.testing.assert_close(ours, ref, **FP32)
    torch.testing.assert_close(g1, g2, **FP32)


def test_large_offsets_are_stable(impl, device):
    logits, labels = make_inputs(torch.float32, device=device)
    ours, ref, g1, g2 = run_both(logits + 1e4, labels, reduction="sum")
    assert torch.isfinite(ours) and torch.isfinite(g1).all()
    # fp32 spacing near 1e4 is ~1e-3: logsumexp is only known to that, hence the tolerances.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-4)


def test_non_contiguous_logits(impl, device):
    logits, labels = make_inputs(torch.float32, device=device)
    ours, ref, g1, g2 = run_both(logits.t().contiguous().t(), labels)
    torch.testing.assert_close(ours, ref, **FP32)
    torch.testing.assert_close(g1, g2, **FP32)


def test_inplace_backward_through_matmul(impl, device):
    """With inplace_backward the logits buffer becomes the gradient; upstream grads still match."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, 17, generator=g).to(device)
    w = torch.randn(V, 17, generator=g).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    grads = []
    for inplace in (False, True):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = hh @ ww.t()
        loss = cross_entropy(logits, labels, inplace_backward=inplace)
        loss.backward()
        grads.append((loss.detach(), hh.grad, ww.grad))
        if inplace:  # the documented contract: logits now hold d loss / d logits
            assert not torch.allclose(logits.detach(), h @ w.t())
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = reference(hr @ wr.t(), labels)
    ref.backward()
    for loss, gh, gw in grads:
        torch.testing.assert_close(loss, ref.detach(), **FP32)
        torch.testing.assert_close(gh, hr.grad, **FP32)
        torch.testing.assert_close(gw, wr.grad, **FP32)


def test_forward_without_grad(impl, device):
    logits, labels = make_inputs(torch.bfloat16, device=device)
    with torch.no_grad():
        loss = cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss, reference(logits, labels, reduction="none"), **BF16_LOSS)


def test_second_backward_is_refused(impl, device):
    logits, labels = make_inputs(torch.float32, n=4, device=device)
    x = logits.requires_grad_(True)
    loss = cross_entropy(x, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_triton_online_logsumexp_over_blocks(triton_device, block, softcap):
    """Vocabulary split in several blocks, the last one partial (V=129)."""
    logits, labels = make_inputs(torch.float32, n=9, device=triton_device)
    scale = torch.tensor(0.5, device=triton_device)
    g_tri, g_ref = torch.empty_like(logits), torch.empty_like(logits)
    loss_tri = _ce_rows_triton(logits, labels, -100, softcap, scale, g_tri, block_size=block).loss
    loss_ref = _ce_rows_torch(logits, labels, -100, softcap, scale, g_ref).loss
    torch.testing.assert_close(loss_tri, loss_ref, **FP32)
    torch.testing.assert_close(g_tri, g_ref, **FP32)


def test_triton_per_row_scale_and_bf16_inplace(triton_device):
    logits, labels = make_inputs(torch.bfloat16, n=9, device=triton_device)
    scale = torch.linspace(-1.0, 2.0, 9, device=triton_device)
    expected_grad = torch.empty_like(logits)
    loss_ref = _ce_rows_torch(logits, labels, -100, None, scale, expected_grad).loss
    buf = logits.clone()
    loss_tri = _ce_rows_triton(buf, labels, -100, None, scale, buf, block_size=32).loss
    torch.testing.assert_close(loss_tri, loss_ref, **BF16_LOSS)
    torch.testing.assert_close(buf.float(), expected_grad.float(), **BF16_GRAD)


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 64])
def test_torch_row_chunks_do_not_change_results(rows_per_chunk):
    logits, labels = make_inputs(torch.float32)
    scale = torch.tensor(1.0 / 30)
    g_chunked, g_whole = torch.empty_like(logits), torch.empty_like(logits)
    a = _ce_rows_torch(logits, labels, -100, 3.0, scale, g_chunked, rows_per_chunk).loss
    b = _ce_rows_torch(logits, labels, -100, 3.0, scale, g_whole, N).loss
    torch.testing.assert_close(a, b, **FP32)
    torch.testing.assert_close(g_chunked, g_whole, **FP32)


@pytest.mark.parametrize("bad", [V, V + 7, -1, -101])
def test_out_of_range_label(impl, device, bad):
    """Both paths refuse a label outside [0, V) that is not ignore_index, same message."""
    logits, labels = make_inputs(torch.float32, n=4, device=device)
    labels[2] = bad
    with pytest.raises(ValueError, match=f"labels contain {bad}, outside the vocabulary"):
        cross_entropy(logits, labels)


@pytest.mark.parametrize("softcap", [30.0, 3000.0])
def test_small_softcap_ratio_fp32(impl, device, softcap):
    """logits/softcap ~1e-2..1e-4, where tanh by 1 - 2/(e^2x + 1) lost digits: fp32 tolerance."""
    logits, labels = make_inputs(torch.float32, n=7, v=33, device=device)
    ours, ref, g_ours, g_ref = run_both(logits, labels, softcap=softcap, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_triton_tanh_matches_torch(triton_device):
    """The kernel's soft-cap (cap=1) against torch.tanh across both branches of its tanh."""
    x = torch.tensor(
        [[0.0, 1e-6, -1e-3, 1e-3, 0.1, -0.3, 0.49, 0.5, -0.51, 1.0, 3.0, -9.0, 20.0, -50.0]],
        device=triton_device,
    )
    # loss = lse(tanh(x)) - tanh(x[0]) = lse(tanh(x)): compare against the reference loss.
    labels = torch.zeros(1, dtype=torch.long, device=triton_device)
    grad = torch.empty_like(x)
    loss = _ce_rows_triton(x, labels, -100, 1.0, torch.tensor(1.0), grad).loss
    t = torch.tanh(x.double())
    ref_grad = (torch.softmax(t, 1) - F.one_hot(labels, x.shape[1])) * (1 - t * t)
    torch.testing.assert_close(loss.double(), torch.logsumexp(t, 1) - t[:, 0], rtol=1e-7, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-8)


def test_no_grad_skips_gradient(impl, device):
    """Under no_grad an input requiring grad gets the loss only: with inplace_backward the
    logits would otherwise be overwritten by their gradient during forward."""
    logits, labels = make_inputs(torch.float32, n=6, device=device)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        loss = cross_entropy(x, labels, inplace_backward=True)
    torch.testing.assert_close(loss, reference(logits, labels), **FP32)
    assert torch.equal(x.detach(), logits)  # untouched: no gradient was written
    assert loss.grad_fn is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": "avg"}, ValueError, "reduction='avg'"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"reduction": "none", "num_items_in_batch": 3}, ValueError, "reduction='none'"),
        ({"num_items_in_batch": 0}, ValueError, "positive"),
        ({"num_items_in_batch": torch.ones(2)}, ValueError, "one-element"),
        ({"num_items_in_batch": "3"}, TypeError, "num_items_in_batch"),
    ],
)
def test_bad_options(kwargs, error, match):
    logits, labels = make_inputs(torch.float32, n=4)
    with pytest.raises(error, match=match):
        cross_entropy(logits, labels, **kwargs)


def test_bad_shapes_and_dtypes():
    logits, labels = make_inputs(torch.float32, n=4)
    with pytest.raises(ValueError, match="2-D"):
        cross_entropy(logits.unsqueeze(0), labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        cross_entropy(logits, labels[:3])
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(logits, labels.float())
    with pytest.raises(TypeError, match="floating-point"):
        cross_entropy(logits.long(), labels)
