"""The matrix the gate compiles: every Triton kernel of accel, called through its public op on
the shapes of real models, in every dtype the op supports, forward and backward.

A :class:`Case` calls the op inside :func:`standin.stand_in_gpu` with fake CUDA tensors; each
launch the op makes (its own block, warp and tile choice) becomes one compile. Shapes are the
models' own (hidden size, vocabulary, heads, experts); 4096 tokens per step throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .standin import StandIn

TOKENS = 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    op: str  # the public op, e.g. "rms_norm"
    config: str  # the model shape, e.g. "Llama-3-8B h=4096"
    dtype: str
    call: Callable[[StandIn, torch.dtype], None]
    #: RMSNorm's promise: at least this many blocks per SM by registers (None: no promise)
    min_blocks: int | None = None


# --------------------------------------------------------------------------- RMSNorm

_NORM_WIDTHS = [
    ("Qwen3 q/k-norm h=128", 128, TOKENS * 32),
    ("Llama-3.2-1B h=2048", 2048, TOKENS),
    ("Llama-3.2-3B h=3072", 3072, TOKENS),
    ("Llama-3-8B h=4096", 4096, TOKENS),
    ("Llama-2-13B h=5120", 5120, TOKENS),
    ("Llama-3-70B h=8192", 8192, TOKENS),
    ("Llama-3.1-405B h=16384", 16384, TOKENS),
    ("wide row h=32768", 32768, TOKENS),
    ("wide row h=65536", 65536, 1024),
    ("wide row h=131072", 131072, 256),
]
_QUICK_NORM = {"Llama-3-8B h=4096", "Llama-3.1-405B h=16384", "wide row h=65536"}


def _rms_norm(width: int, rows: int, casting: str, offset: float, weight: bool):
    def call(gpu: StandIn, dtype: torch.dtype) -> None:
        from accel_fused_ops.kernels.rms_norm import rms_norm

        x = gpu.cuda((rows, width), dtype)
        w = gpu.cuda(width, dtype) if weight else None
        rms_norm(x, w, 1e-6, offset=offset, casting=casting)
        gpu.backward()

    return call


def rms_norm_cases(quick: bool) -> list[Case]:
    cases = []
    for config, width, rows in _NORM_WIDTHS:
        if quick and config not in _QUICK_NORM:
            continue
        floor = 2 if width <= 8192 else None
        for dtype in ("bf16",) if quick else ("fp32", "bf16", "fp16"):
            call = _rms_norm(width, rows, "llama", 0.0, True)
            cases.append(Case("rms_norm", f"{config} llama", dtype, call, floor))
        if not quick:
            gemma = _rms_norm(width, rows, "gemma", 1.0, True)
            cases.append(Case("rms_norm", f"{config} gemma offset=1", "bf16", gemma, floor))
            none = _rms_norm(width, rows, "none", 0.0, True)
            cases.append(Case("rms_norm", f"{config} casting=none", "bf16", none, floor))
    if not quick:
        bare = _rms_norm(4096, TOKENS, "llama", 0.0, False)
        cases.append(Case("rms_norm", "Llama-3-8B h=4096 no weight", "bf16", bare, 2))
    return cases


# --------------------------------------------------------------------------- SwiGLU / GeGLU


def _gated(kind: str, approximate: str, width: int):
    def call(gpu: StandIn, dtype: torch.dtype) -> None:
        from accel_fused_ops.kernels.swiglu import gated_activation

        gate, up = gpu.cuda((TOKENS, width), dtype), gpu.cuda((TOKENS, width), dtype)
        gated_activation(gate, up, kind, approximate)
        gpu.backward()

    return call


def gated_cases(quick: bool) -> list[Case]:
    dtypes = ("bf16",) if quick else ("fp32", "bf16", "fp16")
    cases = [
        Case("swiglu", "Llama-3-8B ffn=14336", d, _gated("swiglu", "tanh", 14336)) for d in dtypes
    ]
    cases += [
        Case("geglu", "Gemma-2-9B ffn=14336 tanh", d, _gated("geglu", "tanh", 14336))
        for d in dtypes
    ]
    if not quick:
        cases.append(Case("geglu", "Gemma ffn=16384 erf", "bf16", _gated("geglu", "none", 16384)))
    return cases


# --------------------------------------------------------------------------- RoPE

_ROPE = [
    ("Llama-3-8B q32 kv8 d128", 32, 8, 128, 128),
    ("Llama-3-70B q64 kv8 d128", 64, 8, 128, 128),
    ("Qwen2.5-1.5B q12 kv2 d128", 12, 2, 128, 128),
    ("Gemma-2-9B q16 kv8 d256", 16, 8, 256, 256),
    ("partial rotary q32 kv32 d128 r64", 32, 32, 128, 64),
]


def _rope(hq: int, hk: int, head_dim: int, rot: int, heads_first: bool):
    def call(gpu: StandIn, dtype: torch.dtype) -> None:
        from accel_fused_ops.kernels.rope import apply_rotary_pos_emb

        def qk(heads: int) -> torch.Tensor:
            shape = (1, heads, TOKENS, head_dim) if heads_first else (1, TOKENS, heads, head_dim)
            return gpu.cuda(shape, dtype)

        cos, sin = gpu.cuda((1, TOKENS, rot), dtype), gpu.cuda((1, TOKENS, rot), dtype)
        apply_rotary_pos_emb(qk(hq), qk(hk), cos, sin, unsqueeze_dim=1 if heads_first else 2)
        gpu.backward()

    return call


def rope_cases(quick: bool) -> list[Case]:
    cases = []
    for i, (config, hq, hk, d, rot) in enumerate(_ROPE):
        if quick and i > 0:
            break
        dtypes = ("fp32", "bf16", "fp16") if i == 0 and not quick else ("bf16",)
        for dtype in dtypes:
            cases.append(Case("rope", config, dtype, _rope(hq, hk, d, rot, True)))
    if not quick:
        cases.append(Case("rope", "Llama-3-8B (B,S,H,D)", "bf16", _rope(32, 8, 128, 128, False)))
    return cases


# --------------------------------------------------------------------------- cross-entropy

_VOCABS = [
    ("Llama-2 V=32000", 32000),
    ("Llama-3 V=128256", 128256),
    ("Qwen2.5 V=151936", 151936),
    ("Gemma V=256000", 256000),
]


def _cross_entropy(vocab: int, grad: bool = True, **options):
    def call(gpu: StandIn, dtype: torch.dtype) -> None:
        from accel_fused_ops.kernels.cross_entropy import cross_entropy

        logits = gpu.cuda((TOKENS, vocab), dtype)
        labels = gpu.cuda(TOKENS, torch.int64)
        if "weight" in options:
            options["weight"] = gpu.cuda(vocab, torch.float32)
        with torch.set_grad_enabled(grad):
            cross_entropy(logits, labels, **options)
        gpu.backward()

    return call


def cross_entropy_cases(quick: bool) -> list[Case]:
    cases = []
    for config, vocab in _VOCABS[1:2] if quick else _VOCABS:
        for dtype in ("bf16",) if quick else ("fp32", "bf16", "fp16"):
            cases.append(Case("cross_entropy", config, dtype, _cross_entropy(vocab)))
    if quick:
        return cases
    variants = [
        ("Gemma-2 V=256000 softcap=30", 256000, {"softcap": 30.0}),
        ("Llama-3 V=128256 label_smoothing=0.1", 128256, {"label_smoothing": 0.1}),
        (
            "Llama-3 V=128256 z-loss + accuracy",
            128256,
            {"lse_square_scale": 1e-4, "return_z_loss": True, "return_token_accuracy": True},
        ),
        ("Llama-3 V=128256 class weight", 128256, {"weight": True}),
        ("Llama-3 V=128256 inplace_backward", 128256, {"inplace_backward": True}),
    ]
    for config, vocab, options in variants:
        cases.append(Case("cross_entropy", config, "bf16", _cross_entropy(vocab, **options)))
    cases.append(
        Case("cross_entropy", "Llama-3 V=128256 eval", "bf16", _cross_entropy(128256, False))
    )
    return cases


def _linear_ce(hidden: int, vocab: int, **options):
    def call(gpu: StandIn, dtype: torch.dtype) -> None:
        from accel_fused_ops.kernels.linear_cross_entropy import fused_linear_cross_entropy

        h, w = gpu.cuda((TOKENS, hidden), dtype), gpu.cuda((vocab, hidden), dtype)
        fused_linear_cross_entropy(h, w, gpu.cuda(TOKENS, torch.int64), **options)
        gpu.backward()

    return call


def linear_ce_cases(quick: bool) -> list[Case]:
    op = "fused_linear_cross_entropy"
    cases = [Case(op, "Llama-3-8B h=4096 V=128256", "bf16", _linear_ce(4096, 128256))]
    if not quick:
        cases.append(Case(op, "Llama-3-8B h=4096 V=128256", "fp32", _linear_ce(4096, 128256)))
        cases.append(Case(op, "Llama-3-8B h=4096 V=128256", "fp16", _linear_ce(4096, 128256)))
        gemma = _linear_ce(3584, 256000, softcap=30.0)
        cases.append(Case(op, "Gemma-2-9B h=3584 V=256000 softcap=30", "bf16", gemma))
    return cases


# --------------------------------------------------------------------------- GPTQ dequant


def _gptq(in_features: int, out_features: int, bits: int, group: int):
    def call(gpu: StandIn, dtype: torch.dtype) -> None:
        from accel_fused_ops.kernels.dequant import gptq_dequantize_triton

        pack = 32 // bits
        groups = in_features // group
        qweight = gpu.cuda((in_features // pack, out_features), torch.int32)
        qzeros = gpu.cuda((groups, out_features // pack), torch.int32)
        scales = gpu.cuda((groups, out_features), torch.float16)
        g_idx = gpu.cuda(in_features, torch.int32)
        gptq_dequantize_triton(qweight, qzeros, scales, g_idx, bits, dtype)

    return call


def gptq_cases(quick: bool) -> list[Case]:
    cases = []
    for bits in (4,) if quick else (2, 4, 8):
        for dtype in ("fp16",) if quick else ("fp16", "bf16"):
            config = f"Llama-3-8B up_proj 4096x14336 {bits}-bit g128"
            cases.append(Case("gptq_dequantize", config, dtype, _gptq(4096, 14336, bits, 128)))
    return cases


# --------------------------------------------------------------------------- MoE grouped GEMM

_MOE = [
    ("Mixtral-8x7B E=8 top2 h=4096 ffn=14336", 8, 2, 4096, 14336, False),
    ("OLMoE-1B-7B E=64 top8 h=2048 ffn=1024", 64, 8, 2048, 1024, False),
    ("GPT-OSS-20B E=32 top4 h=2880 ffn=2880 (E,in,out)", 32, 4, 2880, 2880, True),
]


def _fake_routing(gpu: StandIn, experts: int, top_k: int):
    """A Routing of ``TOKENS`` tokens: the sizes from a real (CPU) uniform routing, the index
    tensors fake CUDA ones of those sizes (only shapes and dtypes reach a compile)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from accel_moe.kernels.scatter_gemm import Routing

    with unset_fake_temporarily():
        generator = torch.Generator().manual_seed(0)
        ids = torch.rand(TOKENS, experts, generator=generator).topk(top_k, dim=-1).indices
        real = Routing.sort(ids, experts)
        counts = real.counts.clone()

    def like(t: torch.Tensor) -> torch.Tensor:
        return gpu.cuda(tuple(t.shape), t.dtype)

    routing = Routing(
        experts=like(real.experts),
        tokens=like(real.tokens),
        slots=like(real.slots),
        counts=like(real.counts),
        ends=like(real.ends),
        num_experts=experts,
        num_slots=real.num_slots,
    )

    def blocks(block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        with unset_fake_temporarily():
            n = int(((counts + block_m - 1) // block_m).sum())
        return gpu.cuda(n, torch.int32), gpu.cuda(n, torch.int32)

    routing.blocks = blocks  # the grid size is all the kernels take from it
    return routing


def _moe(experts: int, top_k: int, hidden: int, ffn: int, transposed: bool):
    def call(gpu: StandIn, dtype: torch.dtype) -> None:
        from accel_moe.kernels.scatter_gemm import scattered_linear

        routing = _fake_routing(gpu, experts, top_k)
        up_shape = (experts, hidden, 2 * ffn) if transposed else (experts, 2 * ffn, hidden)
        down_shape = (experts, ffn, hidden) if transposed else (experts, hidden, ffn)
        x = gpu.cuda((TOKENS, hidden), dtype)
        up, down = gpu.cuda(up_shape, dtype), gpu.cuda(down_shape, dtype)
        h = scattered_linear(x, up, routing, gather=routing.tokens, transposed=transposed)
        scattered_linear(
            h[:, :ffn].contiguous(),
            down,
            routing,
            scatter=routing.slots,
            out_rows=TOKENS * top_k,
            transposed=transposed,
        )
        gpu.backward()

    return call


def _moe_every_tile(experts: int, top_k: int, hidden: int, ffn: int):
    """The op forced onto each candidate tile of every target family in turn (the chooser
    picks one per target and shape; any of them may be launched somewhere)."""
    call = _moe(experts, top_k, hidden, ffn, False)

    def every(gpu: StandIn, dtype: torch.dtype) -> None:
        from unittest import mock

        from accel_moe.kernels import scatter_gemm

        tiles = {t for cap in ((8, 0), (9, 0)) for t in scatter_gemm.tile_candidates(cap, dtype)}
        for tile in sorted(tiles, reverse=True):
            with mock.patch.object(scatter_gemm, "_tile_for", lambda *_, tile=tile: tile):
                call(gpu, dtype)

    return every


def moe_cases(quick: bool) -> list[Case]:
    cases = []
    for i, (config, e, k, h, f, t) in enumerate(_MOE):
        if quick and i > 0:
            break
        dtypes = ("fp32", "bf16", "fp16") if i == 0 and not quick else ("bf16",)
        for dtype in dtypes:
            cases.append(Case("scattered_linear", config, dtype, _moe(e, k, h, f, t)))
    config, e, k, h, f, _ = _MOE[0]
    for dtype in ("bf16",) if quick else ("fp32", "bf16"):
        every = _moe_every_tile(e, k, h, f)
        cases.append(Case("scattered_linear", f"{config} every candidate tile", dtype, every))
    return cases


def all_cases(quick: bool = False) -> list[Case]:
    return [
        *rms_norm_cases(quick),
        *gated_cases(quick),
        *rope_cases(quick),
        *cross_entropy_cases(quick),
        *linear_ce_cases(quick),
        *gptq_cases(quick),
        *moe_cases(quick),
    ]
