"""The scattered grouped GEMM against the indexing + batched-matmul reference: forward and
every gradient, both implementations (PyTorch on CPU; Triton under the interpreter on CPU, and
on CUDA where a GPU is visible), both weight layouts, gather and scatter, routing ids of other
ranks' experts, odd shapes (the padded path) and 16-byte aligned ones (``torch._grouped_mm``)."""

from __future__ import annotations

import pytest
import torch

from accel.testing import assert_close_scaled
from accel_moe.kernels.scatter_gemm import Routing, reference_scattered_linear, scattered_linear

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)]


@pytest.fixture(params=["torch", "triton"])
def impl(request, monkeypatch) -> str:
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", request.param)
    return request.param


def _case(e, tokens, top_k, k, n, *, transposed, foreign=0, dtype=torch.float32, device="cpu"):
    """Inputs drawn on the CPU from a fixed seed; ``foreign`` extra expert ids stand for other
    ranks' experts (expert parallelism) and must be skipped."""
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, e + foreign, (tokens, top_k), generator=g)
    x = torch.randn(tokens, k, generator=g)
    shape = (e, k, n) if transposed else (e, n, k)
    w = torch.randn(*shape, generator=g) / k**0.5
    up = torch.randn(tokens * top_k, n, generator=g)
    return [t.to(device) for t in (index, x.to(dtype), w.to(dtype), up.to(dtype))]


def _run(fn, x, w, routing, mode, transposed, upstream):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    if mode == "gather":  # first projection: rows gathered from the tokens, sorted output
        y = fn(x, w, routing, gather=routing.tokens, transposed=transposed)
        grad = upstream[: routing.rows]
    else:  # second projection: sorted rows in, scattered to the token-expert slots
        rows = x[routing.tokens].detach().requires_grad_()
        x = rows
        y = fn(
            rows,
            w,
            routing,
            scatter=routing.slots,
            out_rows=routing.num_slots,
            transposed=transposed,
        )
        grad = upstream
    y.backward(grad)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["gather", "scatter"])
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize(
    "shape", [(3, 7, 2, 5, 6, 0), (4, 9, 2, 8, 12, 0), (3, 11, 3, 8, 4, 2)],
    ids=["odd", "aligned", "foreign-ids"],
)  # fmt: skip
def test_matches_reference_fp32(impl, device, mode, transposed, shape):
    e, tokens, top_k, k, n, foreign = shape
    index, x, w, up = _case(
        e, tokens, top_k, k, n, transposed=transposed, foreign=foreign, device=device
    )
    routing = Routing.sort(index, e)
    if foreign:
        assert routing.rows < tokens * top_k  # ids of other ranks' experts were cut off
    got = _run(scattered_linear, x, w, routing, mode, transposed, up)
    want = _run(reference_scattered_linear, x, w, routing, mode, transposed, up)
    for a, b, what in zip(got, want, ("output", "input grad", "weight grad")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_within_rounding(impl, device):
    """bf16 inputs, fp32 accumulation: within a few bf16 ulps of the fp32 reference."""
    e, tokens, top_k, k, n = 3, 10, 2, 16, 24
    index, x, w, up = _case(e, tokens, top_k, k, n, transposed=False, device=device)
    routing = Routing.sort(index, e)
    got = _run(
        scattered_linear, x.bfloat16(), w.bfloat16(), routing, "gather", False, up.bfloat16()
    )
    want = _run(reference_scattered_linear, x, w, routing, "gather", False, up)
    for a, b, what in zip(got, want, ("output", "input grad", "weight grad")):
        assert a.dtype == torch.bfloat16
        assert_close_scaled(a.float(), b, rel=2e-2, what=what)


def test_routing_sorts_once_and_cuts_foreign_ids():
    index = torch.tensor([[2, 0], [5, 2], [1, 4]])  # 4 and 5: experts of other ranks
    routing = Routing.sort(index, 3)
    assert routing.experts.tolist() == [0, 1, 2, 2]
    assert routing.slots.tolist() == [1, 4, 0, 3]
    assert routing.tokens.tolist() == [0, 2, 0, 1]
    assert routing.counts.tolist() == [1, 1, 2] and routing.ends.tolist() == [1, 2, 4]
    expert, row0 = routing.blocks(16)
    assert expert.tolist() == [0, 1, 2] and row0.tolist() == [0, 1, 2]


def test_empty_experts_get_zero_weight_grad(impl):
    index = torch.zeros(5, 2, dtype=torch.long)  # every token to expert 0 of 3
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 12, 8, requires_grad=True)
    routing = Routing.sort(index, 3)
    scattered_linear(x, w, routing, gather=routing.tokens).sum().backward()
    assert w.grad[1:].abs().max() == 0 and w.grad[0].abs().max() > 0
