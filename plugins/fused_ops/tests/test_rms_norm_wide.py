"""RMSNorm's column-looped ("wide") Triton kernels against the PyTorch reference.

Rows wider than the register limit of a pass take kernels that walk the row in ``BLOCK_D``
column chunks. The limits and tile sizes are lowered here (a 67-column row split into
16-column chunks with a masked tail, 2 rows per tile) so the interpreter stays fast; one test
runs a row wider than 65536 with the real limits.

Tolerances: fp32 rtol=atol=1e-5 (only the reduction order differs). bf16: max abs error <=
2e-2 * max |expected|: the chunked sum of squares can move ``rstd`` by an fp32 ulp, enough to
round Llama's bf16 ``normed`` to its neighbour (one bf16 ulp, up to 2**-7 of it, times |w|)
before the output's own rounding (2**-8): a little over 1e-2 of the largest value at worst.
"""

from __future__ import annotations

import pytest
import torch

from accel.testing import assert_close_scaled
from accel_fused_ops.kernels import rms_norm as module
from accel_fused_ops.kernels.rms_norm import _launch_config, rms_norm, rms_norm_reference

ODD = (3, 7, 67)  # 21 rows of 67 columns: masks on rows and on the last column chunk

# (forward limit, backward limit): both passes wide, or only the backward one
LIMITS = {"both_wide": (32, 32), "backward_wide": (128, 32)}


@pytest.fixture(params=sorted(LIMITS))
def wide(request, triton_device, monkeypatch) -> torch.device:
    """Small limits and tiles, the Triton implementation forced; yields the device."""
    fwd, bwd = LIMITS[request.param]
    monkeypatch.setattr(module, "_FWD_MAX_COLS", {2: fwd, 4: fwd})
    monkeypatch.setattr(module, "_BWD_MAX_COLS", {2: bwd, 4: bwd})
    monkeypatch.setattr(module, "_WIDE_BLOCK_D", 16)
    monkeypatch.setattr(module, "_WIDE_BLOCK_M", 2)
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "triton")
    assert _launch_config(ODD[-1], backward=True).wide
    assert _launch_config(ODD[-1]).wide == (request.param == "both_wide")
    return triton_device


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        assert_close_scaled(actual, expected, 2e-2)


def _reference_grads(x, weight, offset, casting, grad_out):
    """Reference output and gradients; bf16 ``casting="none"`` is compared with fp32 (the
    kernel rounds once, the bf16 reference at every step)."""
    up = casting == "none" and x.dtype != torch.float32
    xr = (x.detach().float() if up else x.detach().clone()).requires_grad_()
    wr = None
    if weight is not None:
        wr = (weight.detach().float() if up else weight.detach().clone()).requires_grad_()
    y = rms_norm_reference(xr, wr, 1e-5, offset=offset, casting=casting)
    wanted = (xr,) if wr is None else (xr, wr)
    return y, torch.autograd.grad(y, wanted, grad_out.to(y.dtype))


@pytest.mark.parametrize("casting", ["llama", "gemma", "none"])
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_forward_and_backward(wide, dtype, casting, affine):
    torch.manual_seed(7)
    x = (2.0 * torch.randn(ODD)).to(wide, dtype).requires_grad_()
    weight = None
    if affine:
        weight = torch.randn(ODD[-1]).mul_(0.5).to(wide, dtype).requires_grad_()
    offset = 1.0 if affine and casting == "gemma" else 0.0
    grad_out = torch.randn(ODD).to(wide)
    expected, exp_grads = _reference_grads(x, weight, offset, casting, grad_out)

    out = rms_norm(x, weight, 1e-5, offset=offset, casting=casting)
    got = (x,) if weight is None else (x, weight)
    grads = torch.autograd.grad(out, got, grad_out.to(out.dtype))
    assert_close(out, expected.to(out.dtype))
    for g, e in zip(grads, exp_grads, strict=True):
        assert g.dtype == e.dtype or dtype != torch.float32
        assert_close(g, e.to(g.dtype))


def test_wide_frozen_weight_and_non_contiguous_input(wide):
    """Only dx when the weight is frozen; a transposed input (row stride != width)."""
    torch.manual_seed(8)
    base = torch.randn(ODD[-1], 41).to(wide).requires_grad_()
    w = torch.randn(ODD[-1]).to(wide)
    x = base.t()
    expected = rms_norm_reference(x, w, 1e-6)
    grad_out = torch.randn_like(expected)
    (exp_dx,) = torch.autograd.grad(expected, base, grad_out)
    out = rms_norm(x, w, 1e-6)
    (dx,) = torch.autograd.grad(out, base, grad_out)
    assert_close(out, expected)
    assert_close(dx, exp_dx)


@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_wide_in_place_backward(wide, casting):
    torch.manual_seed(9)
    x = torch.randn(ODD).to(wide).requires_grad_()
    weight = torch.randn(ODD[-1]).to(wide).requires_grad_()
    grad_out = torch.randn(ODD).to(wide)
    exp_dx, exp_dw = torch.autograd.grad(
        rms_norm_reference(x, weight, 1e-5, casting=casting), (x, weight), grad_out
    )
    buffer = grad_out.clone()
    y = rms_norm(x, weight, 1e-5, casting=casting, in_place=True)
    dx, dw = torch.autograd.grad(y, (x, weight), buffer)
    assert dx.data_ptr() == buffer.data_ptr(), "dx must be written into the dy buffer"
    assert_close(dx, exp_dx)
    assert_close(dw, exp_dw)


def test_launch_config_never_refuses_a_width():
    """Every width gets a launch; rows past the register limits take the wide kernels, whose
    tile does not grow with the row."""
    for n_cols in (1, 67, 4096, 8192, 16384, 16385, 65536, 65537, 1 << 20, 10**7):
        for itemsize in (2, 4):
            fwd = _launch_config(n_cols, itemsize=itemsize)
            bwd = _launch_config(n_cols, backward=True, itemsize=itemsize)
            assert fwd.wide == (n_cols > module._FWD_MAX_COLS[itemsize])
            assert bwd.wide == (n_cols > module._BWD_MAX_COLS[itemsize])
            for launch in (fwd, bwd):
                assert launch.wide or launch.block_d >= n_cols
                assert not launch.wide or launch.block_d * launch.block_m <= 8192
                # two blocks of this many threads fit an SM's 64K registers under the cap
                assert 2 * 32 * launch.num_warps * launch.maxnreg <= 65536


def test_row_wider_than_65536_with_the_real_limits(triton_device, monkeypatch):
    """A 70001-column row (over the old 65536 limit) runs with no setting, forward and
    backward, and matches the reference."""
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "triton")
    torch.manual_seed(10)
    x = torch.randn(3, 70001).to(triton_device).requires_grad_()
    w = torch.randn(70001).to(triton_device).requires_grad_()
    grad_out = torch.randn(3, 70001).to(triton_device)
    expected = rms_norm_reference(x, w, 1e-6)
    exp_dx, exp_dw = torch.autograd.grad(expected, (x, w), grad_out)
    out = rms_norm(x, w, 1e-6)
    dx, dw = torch.autograd.grad(out, (x, w), grad_out)
    assert_close(out, expected)
    assert_close(dx, exp_dx)
    assert_close(dw, exp_dw)
