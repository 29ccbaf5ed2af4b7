"""The grouped GEMM's tile choice: per target and shape from the candidate set; and the Triton
kernels correct on tiles whose three sides differ, cut by masked tails on every side (under
the interpreter, with small stand-ins for the GPU tiles, whose compiles the compile check
covers). Tolerance: fp32 rtol=atol=1e-5 against the indexing + batched-matmul reference."""

from __future__ import annotations

import pytest
import torch

from accel_moe.kernels import scatter_gemm
from accel_moe.kernels.scatter_gemm import (
    Routing,
    Tile,
    choose_tile,
    reference_scattered_linear,
    scattered_linear,
    tile_candidates,
)

AMPERE, HOPPER = (8, 0), (9, 0)


def test_tensor_core_tiles_differ_by_target_and_fit_shared_memory():
    hopper = tile_candidates(HOPPER, torch.bfloat16)
    ampere = tile_candidates(AMPERE, torch.bfloat16)
    assert hopper != ampere
    assert tile_candidates((8, 9), torch.float16) == ampere  # Ada takes the Ampere tiles
    assert tile_candidates((10, 0), torch.bfloat16) == hopper
    for tiles, limit_kb in ((ampere, 163), (hopper, 227)):
        for t in tiles:
            assert 4 <= t.num_warps <= 8 and 3 <= t.num_stages <= 4
            # the pipelined operand buffers of one block, bf16
            smem = t.num_stages * (t.block_m * t.block_k + t.block_k * t.block_n) * 2
            assert smem <= limit_kb * 1024, t
    assert tile_candidates(HOPPER, torch.float32) == tile_candidates(AMPERE, torch.float32)


@pytest.mark.parametrize("capability", [AMPERE, HOPPER], ids=["sm80", "sm90"])
def test_choice_follows_the_shape(capability):
    big, *_, small = tile_candidates(capability, torch.bfloat16)
    assert choose_tile(capability, torch.bfloat16, 1024, 14336) == big
    assert choose_tile(capability, torch.bfloat16, 40, 40) == small
    few_rows = choose_tile(capability, torch.bfloat16, 40, 4096)
    assert few_rows.block_m == 64 and few_rows.block_n == 128
    few_cols = choose_tile(capability, torch.bfloat16, 4096, 40)
    assert few_cols.block_m == 128 and few_cols.block_n == 64
    for rows, cols in ((1, 1), (64, 4096), (10**6, 10**6)):
        assert choose_tile(capability, torch.bfloat16, rows, cols) in tile_candidates(
            capability, torch.bfloat16
        )
        assert choose_tile(capability, torch.float32, rows, cols) in tile_candidates(
            capability, torch.float32
        )


def test_cpu_tensors_take_the_interpreter_tile():
    x = torch.zeros(4, 8)
    assert scatter_gemm._tile_for(x, 1024, 1024) == scatter_gemm.INTERPRETER_TILE


# Small tiles with three different sides, standing in for the GPU candidates in the interpreter.
UNEQUAL = [Tile(16, 32, 64, 4, 3), Tile(32, 64, 16, 4, 4)]


@pytest.mark.parametrize("tile", UNEQUAL, ids=str)
@pytest.mark.parametrize("mode", ["gather", "scatter"])
@pytest.mark.parametrize("transposed", [False, True], ids=["out_in", "in_out"])
def test_kernels_match_reference_on_unequal_tiles(tile, mode, transposed, monkeypatch):
    if not scatter_gemm.triton_interpreting():
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", "triton")
    monkeypatch.setattr(scatter_gemm, "_tile_for", lambda *_: tile)
    g = torch.Generator().manual_seed(3)
    e, tokens, top_k, k, n = 3, 13, 2, 37, 45  # every side is cut by a masked tail
    index = torch.randint(0, e, (tokens, top_k), generator=g)
    routing = Routing.sort(index, e)
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(*((e, k, n) if transposed else (e, n, k)), generator=g) / k**0.5
    up = torch.randn(tokens * top_k, n, generator=g)

    def run(fn):
        xi = x.clone().requires_grad_()
        wi = w.clone().requires_grad_()
        if mode == "gather":
            y = fn(xi, wi, routing, gather=routing.tokens, transposed=transposed)
            y.backward(up[: routing.rows])
            return y.detach(), xi.grad, wi.grad
        rows = x[routing.tokens].clone().requires_grad_()
        y = fn(
            rows, wi, routing, scatter=routing.slots, out_rows=routing.num_slots,
            transposed=transposed,
        )  # fmt: skip
        y.backward(up)
        return y.detach(), rows.grad, wi.grad

    for got, want, what in zip(
        run(scattered_linear), run(reference_scattered_linear), ("output", "dx", "dw")
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_candidate_of_this_gpu(dtype, monkeypatch):
    """Each tile the op may pick on this GPU, compiled for real, against the fp32 reference
    (bf16: within 2e-2 of the largest value, the rounding of bf16 inputs and output)."""
    from accel.testing import assert_close_scaled

    capability = torch.cuda.get_device_capability()
    g = torch.Generator().manual_seed(4)
    e, tokens, top_k, k, n = 4, 300, 2, 200, 328
    index = torch.randint(0, e, (tokens, top_k), generator=g).cuda()
    routing = Routing.sort(index, e)
    x = torch.randn(tokens, k, generator=g).cuda()
    w = (torch.randn(e, n, k, generator=g) / k**0.5).cuda()
    up = torch.randn(routing.rows, n, generator=g).cuda()

    def run(fn, x, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(x, w, routing, gather=routing.tokens)
        y.backward(up.to(y.dtype))
        return y.detach(), x.grad, w.grad

    want = run(reference_scattered_linear, x, w)
    for tile in tile_candidates(capability, dtype):
        monkeypatch.setattr(scatter_gemm, "_tile_for", lambda *_, tile=tile: tile)
        got = run(scattered_linear, x.to(dtype), w.to(dtype))
        for a, b, what in zip(got, want, ("output", "dx", "dw")):
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{tile} {what}")
            else:
                assert_close_scaled(a.float(), b, rel=2e-2, what=f"{tile} {what}")
