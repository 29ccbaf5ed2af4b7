"""Rotary position embedding (RoPE), a drop-in for transformers' ``apply_rotary_pos_emb``.

``cos``/``sin`` are what a model's rotary-embedding module returns for ``position_ids``:
one row per token, shape (B or 1, S, R). Because they are per token, packed (padding-free)
batches whose positions restart inside a row are handled with no extra argument.

Semantics, for the rotated width ``R = cos.shape[-1]`` (normally the head dim):
``out[..., :R] = x[..., :R] * cos + rotate_half(x[..., :R]) * sin`` and
``out[..., R:] = x[..., R:]`` (partial rotary, as in Phi3; Llama-style models use ``R = D``).

Backward applies the transposed rotation, so nothing but ``cos``/``sin`` is kept. The Triton
kernel runs one program per block of tokens and rotates every q and k head of those tokens,
loading their cos/sin once; it works on strided q/k (the usual ``view(...).transpose(1, 2)`` projections).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel_fused_ops.dispatch import TRITON_DTYPES, choose_impl, last_dim_contiguous

# Elements of the larger of the q/k tiles per program: short rows share a program.
_TILE_ELEMS = 4096


# --------------------------------------------------------------------------- Triton kernel


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    b,
    s,
    s_mask,
    n_heads,
    x_sb,
    x_sh,
    x_ss,
    o_sb,
    o_sh,
    o_ss,
    c1,
    c2,
    s1,
    s2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotate all heads of a block of tokens: tiles are [tokens, heads, half of R]."""
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    tok = s[:, None, None]
    mask = s_mask[:, None, None] & (heads < n_heads) & (d < HALF)
    src = x_ptr + b * x_sb + tok * x_ss + heads * x_sh + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the forward rotation (equals "rotate with -sin" when the halves of
        # sin agree, which is what rotary-embedding modules produce).
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    dst = out_ptr + b * o_sb + tok * o_ss + heads * o_sh + d
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    seq_len,
    n_q_heads,
    n_k_heads,
    q_sb,
    q_sh,
    q_ss,
    k_sb,
    k_sh,
    k_ss,
    qo_sb,
    qo_sh,
    qo_ss,
    ko_sb,
    ko_sh,
    ko_ss,
    cos_sb,
    cos_ss,
    sin_sb,
    sin_ss,
    HALF: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per (batch row, block of BLOCK_S tokens); cos/sin are loaded once and
    # shared by every q and k head of those tokens.
    pid = tl.program_id(0).to(tl.int64)
    n_s_blocks = tl.cdiv(seq_len, BLOCK_S)
    b = pid // n_s_blocks
    s = (pid % n_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < seq_len
    d = tl.arange(0, BLOCK_HALF)
    cs_mask = s_mask[:, None] & (d < HALF)[None, :]
    cos_rows = cos_ptr + b * cos_sb + s[:, None] * cos_ss + d[None, :]
    sin_rows = sin_ptr + b * sin_sb + s[:, None] * sin_ss + d[None, :]
    c1 = tl.load(cos_rows, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(cos_rows + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(sin_rows, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(sin_rows + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    _rotate_heads(
        q_ptr, qo_ptr, b, s, s_mask, n_q_heads, q_sb, q_sh, q_ss, qo_sb, qo_sh, qo_ss,
        c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_HALF, BACKWARD,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, ko_ptr, b, s, s_mask, n_k_heads, k_sb, k_sh, k_ss, ko_sb, ko_sh, ko_ss,
        c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_HALF, BACKWARD,
    )  # fmt: skip


def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _triton_rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: int,
    q_out_dtype: torch.dtype,
    k_out_dtype: torch.dtype,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q/k (heads on dim ``layout``, last dim contiguous) with (B|1, S, R) cos/sin."""
    q_out = torch.empty_like(q, dtype=q_out_dtype)  # same layout as the caller's tensor
    k_out = torch.empty_like(k, dtype=k_out_dtype)
    rot = cos.shape[-1]
    if rot < q.shape[-1]:
        q_out[..., rot:] = q[..., rot:]
    if rot < k.shape[-1]:
        k_out[..., rot:] = k[..., rot:]
    if layout == 2:  # the kernel indexes (B, H, S, D) views
        q, k, q_out_v, k_out_v = (t.transpose(1, 2) for t in (q, k, q_out, k_out))
    else:
        q_out_v, k_out_v = q_out, k_out
    batch, n_q_heads, seq_len, _ = q.shape
    n_k_heads = k.shape[1]
    block_hq = triton.next_power_of_2(n_q_heads)
    block_hk = triton.next_power_of_2(n_k_heads)
    block_half = triton.next_power_of_2(rot // 2)
    if batch * seq_len == 0:
        return q_out, k_out
    per_token = max(block_hq, block_hk) * block_half
    block_s = max(1, min(16, _TILE_ELEMS // per_token, triton.next_power_of_2(seq_len)))
    num_warps = min(8, max(1, block_s * per_token // 256))
    _rope_kernel[(batch * triton.cdiv(seq_len, block_s),)](
        q,
        k,
        cos,
        sin,
        q_out_v,
        k_out_v,
        seq_len,
        n_q_heads,
        n_k_heads,
        *_bhs_strides(q),
        *_bhs_strides(k),
        *_bhs_strides(q_out_v),
        *_bhs_strides(k_out_v),
        cos.stride(0) if cos.shape[0] > 1 else 0,
        cos.stride(1),
        sin.stride(0) if sin.shape[0] > 1 else 0,
        sin.stride(1),
        HALF=rot // 2,
        BLOCK_S=block_s,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        BACKWARD=backward,
        num_warps=num_warps,
    )
    return q_out, k_out


# --------------------------------------------------------------------------- PyTorch path


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformers formula (with Phi3-style partial rotary); autograd differentiates it."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if rot == x.shape[-1]:
            return (x * cos) + (_rotate_half(x) * sin)
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat(((x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass), dim=-1)

    return rotate(q), rotate(k)


def _torch_rotate_one(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: int,
    out_dtype: torch.dtype,
    backward: bool,
) -> torch.Tensor:
    """Rotate ``x`` (heads on dim ``layout``); rounds exactly like the reference formula."""
    cos, sin = cos.unsqueeze(layout), sin.unsqueeze(layout)
    rot = cos.shape[-1]
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:rot]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if backward:
        parts = [x1 * c1 + x2 * s2, x2 * c2 - x1 * s1]
    else:
        parts = [x1 * c1 - x2 * s1, x2 * c2 + x1 * s2]
    if rot < x.shape[-1]:
        parts.append(x[..., rot:])
    return torch.cat([p.to(out_dtype) for p in parts], dim=-1)


def _torch_rotate(q, k, cos, sin, layout, q_out_dtype, k_out_dtype, backward):
    return (
        _torch_rotate_one(q, cos, sin, layout, q_out_dtype, backward),
        _torch_rotate_one(k, cos, sin, layout, k_out_dtype, backward),
    )


# --------------------------------------------------------------------------- autograd + API


class RoPEFunction(torch.autograd.Function):
    """Rotate q and k (heads on dim ``layout``); backward rotates the gradients back."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, layout, impl):
        rotate = _triton_rotate if impl == "triton" else _torch_rotate
        q_dtype = torch.promote_types(q.dtype, cos.dtype)
        k_dtype = torch.promote_types(k.dtype, cos.dtype)
        q_out, k_out = rotate(q, k, cos, sin, layout, q_dtype, k_dtype, False)
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.impl, ctx.q_dtype, ctx.k_dtype = layout, impl, q.dtype, k.dtype
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        if ctx.impl == "triton":
            rotate = _triton_rotate
            dq_out, dk_out = last_dim_contiguous(dq_out), last_dim_contiguous(dk_out)
        else:
            rotate = _torch_rotate
        dq, dk = rotate(dq_out, dk_out, cos, sin, ctx.layout, ctx.q_dtype, ctx.k_dtype, True)
        return dq, dk, None, None, None, None


def _fits_fused_path(q, k, cos, sin, layout) -> bool:
    """Whether 4-D q, k and 3-D cos/sin (heads on dim ``layout``) take the fused path."""
    seq_dim = 3 - layout
    batch, seq_len, rot = q.shape[0], q.shape[seq_dim], cos.shape[-1]
    return (
        k.dim() == 4
        and k.shape[0] == batch
        and k.shape[seq_dim] == seq_len
        and cos.shape[0] in (1, batch)
        and cos.shape[1] == seq_len
        and rot % 2 == 0
        and 0 < rot <= min(q.shape[-1], k.shape[-1])
        and q.dtype == k.dtype
        and cos.dtype == sin.dtype
        and all(t.dtype in TRITON_DTYPES for t in (q, cos))
        and not (cos.requires_grad or sin.requires_grad)
    )


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (same arguments, same result).

    q: (B, Hq, S, D), k: (B, Hk, S, D) (or (B, S, H, D) with ``unsqueeze_dim=2``);
    cos/sin: (B or 1, S, R) with R <= D, already gathered per token by the model's rotary
    module, or (S, R), shared by the whole batch. ``position_ids`` is accepted for the older signature and ignored: cos/sin carry
    the positions. Uses the Triton kernel on CUDA (``ACCEL_KERNEL_IMPL`` overrides); inputs
    outside the fused layout (other ranks, odd R, cos/sin that need gradients, mixed q/k
    dtypes) run the reference formula.
    """
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        raise TypeError(
            "apply_rotary_pos_emb: position_ids must be a tensor or None, got "
            f"{type(position_ids).__name__}; pass unsqueeze_dim by keyword "
            "(apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=...))"
        )
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"apply_rotary_pos_emb: {name} must be a tensor, got {type(t)}")
    if cos.shape != sin.shape:
        raise ValueError(
            f"apply_rotary_pos_emb: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have "
            "the same shape (both come from the model's rotary-embedding module)"
        )

    if q.dim() == 4 and cos.dim() == 2:
        # One (S, R) table shared by every sequence of the batch: add the batch dim, which
        # the 3-D path broadcasts (unsqueezing it on the heads dim alone would not line up).
        seq_len = q.shape[3 - unsqueeze_dim % 4] if unsqueeze_dim % 4 in (1, 2) else None
        if seq_len is None or cos.shape[0] != seq_len:
            raise ValueError(
                f"apply_rotary_pos_emb: 2-D cos/sin {tuple(cos.shape)} must be (seq_len, "
                f"rotary_dim) with seq_len={q.shape[2 if unsqueeze_dim % 4 == 1 else 1]} "
                f"matching q {tuple(q.shape)} (unsqueeze_dim={unsqueeze_dim}); pass "
                "(batch or 1, seq_len, rotary_dim) tables otherwise"
            )
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    layout = unsqueeze_dim % 4 if q.dim() == 4 and cos.dim() == 3 else None
    if layout not in (1, 2) or not _fits_fused_path(q, k, cos, sin, layout):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    impl = choose_impl(q)
    if impl == "triton":
        q, k, cos, sin = (last_dim_contiguous(t) for t in (q, k, cos, sin))
    return RoPEFunction.apply(q, k, cos, sin, layout, impl)
