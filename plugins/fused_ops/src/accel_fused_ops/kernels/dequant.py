"""The frozen base weight of a LoRA layer, materialised on demand.

A fused LoRA op never keeps the dequantised base weight alive between forward and backward:
for a 4-bit model that weight is four times the stored one, and keeping one per layer would
undo the memory saving that made the user quantise in the first place. Instead each op asks a
``FrozenWeight`` for the dense ``(out_features, in_features)`` weight when it needs it (once
in forward, once again in backward) and drops it right after the matmul.

Three sources are understood:

* ``DenseWeight``: a plain ``nn.Linear`` weight (fp32/bf16/fp16), used as is.
* ``Bnb4bitWeight``: a bitsandbytes ``Linear4bit`` (NF4/FP4); dequantised with
  ``bitsandbytes.functional.dequantize_4bit``, which is already a fused CUDA kernel on GPU.
* ``GPTQWeight``: a gptqmodel GPTQ layer (``TorchLinear`` of the TORCH backend, or
  ``TritonV2Linear`` of the TRITON backend, which shares its layout). The Triton kernel below
  decodes 2/4/8-bit int32-packed codes, zero points, scales and ``g_idx`` in one pass with
  fp32 arithmetic; ``gptq_dequantize_torch`` decodes the same layout in PyTorch ops (CPU, or
  CUDA when Triton is not chosen), straight into the compute dtype. gptqmodel's own training
  path wraps its torch code in ``torch.compile`` (its Triton decoder is off in training
  mode): on CPU, inductor's first compile costs 6-20 s and every new layer shape another
  compile, which neither path here has. Layouts neither covers (3/5/6/7 bits, other pack
  dtypes) use the layer's own ``dequantize_weight``. Both paths return what the layer's
  forward multiplies by: the product rounded to the scales' dtype, then cast, when the compute
  dtype is wider than the scales (fp32 over fp16 scales); otherwise rounded once to the
  compute dtype (bf16 over fp16 scales: at most one bf16 ulp from gptqmodel's double
  rounding).

``frozen_weight(layer)`` picks the right class; ``unsupported_reason(layer)`` says in words why
a layer cannot be handled. This module never triggers the import of bitsandbytes or gptqmodel
(seconds each): a layer can only be one of their classes if its library is already loaded, so
``sys.modules`` is consulted.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from torch import nn

from accel_fused_ops.dispatch import choose_impl

# GPTQ bit widths whose codes tile a 32-bit word exactly (the layout the Triton kernel decodes).
_TRITON_GPTQ_BITS = (2, 4, 8)
# Tile of the (in_features, out_features) output one Triton program writes.
_GPTQ_BLOCK_K = 32
_GPTQ_BLOCK_N = 128


# --------------------------------------------------------------------------- Triton kernel


@triton.jit
def _gptq_dequant_kernel(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,
    in_features,
    out_features,
    zeros_cols,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[i, j] = scales[g, j] * (code[i, j] - zero[g, j]) with g = g_idx[i].

    Codes are packed along the input dimension (``32 // BITS`` rows per int32 word of
    ``qweight``), zero points along the output dimension (``32 // BITS`` columns per word of
    ``qzeros``), lowest bits first. Arithmetic is fp32 and rounded once on store.
    """
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < in_features
    col_ok = cols < out_features
    mask = row_ok[:, None] & col_ok[None, :]

    words = tl.load(
        qweight_ptr + (rows // PACK)[:, None] * out_features + cols[None, :], mask=mask, other=0
    )
    codes = (words >> ((rows % PACK) * BITS)[:, None]) & MAXQ

    groups = tl.load(g_idx_ptr + rows, mask=row_ok, other=0)
    zero_words = tl.load(
        qzeros_ptr + groups[:, None] * zeros_cols + (cols // PACK)[None, :], mask=mask, other=0
    )
    zeros = (zero_words >> ((cols % PACK) * BITS)[None, :]) & MAXQ
    scales = tl.load(
        scales_ptr + groups[:, None] * out_features + cols[None, :], mask=mask, other=0.0
    ).to(tl.float32)

    weight = scales * (codes - zeros).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * out_features + cols[None, :],
        weight.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def gptq_dequantize_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    block_k: int = _GPTQ_BLOCK_K,
    block_n: int = _GPTQ_BLOCK_N,
) -> torch.Tensor:
    """Decode a GPTQ int32-packed weight to a dense ``(in_features, out_features)`` tensor.

    Same layout and result as gptqmodel's ``dequantize_weight`` (zero points used as stored,
    the GPTQ "v2" convention its TORCH backend runs on). ``block_k``/``block_n`` set the tile
    per program; the defaults suit GPUs, tests pass small ones to cover the edge masking.
    """
    in_features, out_features = _check_gptq_buffers(qweight, qzeros, scales, g_idx, bits)
    device = qweight.device
    qweight = qweight.contiguous()
    qzeros = qzeros.to(device).contiguous()
    scales = scales.to(device).contiguous()
    g_idx = g_idx.to(device=device, dtype=torch.int32).contiguous()
    out = torch.empty(in_features, out_features, dtype=dtype, device=device)
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(out_features, block_n))
    _gptq_dequant_kernel[grid](
        qweight,
        qzeros,
        scales,
        g_idx,
        out,
        in_features,
        out_features,
        qzeros.shape[1],
        BITS=bits,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
    )
    return out


def _check_gptq_buffers(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> tuple[int, int]:
    """``(in_features, out_features)`` of a GPTQ layout both decoders read; ValueError else."""
    if bits not in _TRITON_GPTQ_BITS:
        raise ValueError(f"bits={bits} is not supported here; expected one of {_TRITON_GPTQ_BITS}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(
            f"qweight/qzeros must be int32-packed, got {qweight.dtype}/{qzeros.dtype}; "
            "use the layer's own dequantize_weight for other pack dtypes"
        )
    in_features = g_idx.numel()
    out_features = qweight.shape[1]
    if scales.shape[1] != out_features or qweight.shape[0] * (32 // bits) < in_features:
        raise ValueError(
            f"inconsistent GPTQ buffers: qweight {tuple(qweight.shape)}, scales "
            f"{tuple(scales.shape)}, g_idx of {in_features} rows, bits={bits}"
        )
    return in_features, out_features


def _contiguous_group_size(g_idx: torch.Tensor, groups: int) -> int | None:
    """The group size when row ``i`` is in group ``i // size`` and every group is full (the
    layout without act-order), else None (act-order, or a partial last group)."""
    in_features = g_idx.numel()
    if groups == 0 or in_features % groups:
        return None
    size = in_features // groups
    rows = torch.arange(in_features, device=g_idx.device, dtype=g_idx.dtype)
    return size if torch.equal(g_idx, rows // size) else None


def gptq_dequantize_torch(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`gptq_dequantize_triton` in PyTorch ops: the dense ``(in_features, out_features)``
    weight, fp32 arithmetic rounded once to ``dtype``.

    With groups of consecutive rows (no act-order) the zero points and scales broadcast over
    a ``(groups, group_size, out_features)`` view, so the only full-size passes are the
    unpack, the zero-point subtraction (in place), the fp32 conversion, the scaling (in
    place) and the final cast; act-order layouts gather a zero point and scale per row."""
    in_features, out_features = _check_gptq_buffers(qweight, qzeros, scales, g_idx, bits)
    pack, maxq = 32 // bits, (1 << bits) - 1
    device = qweight.device
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=device)
    codes = (qweight.unsqueeze(1) >> shifts.view(1, pack, 1)).bitwise_and_(maxq)
    codes = codes.view(-1, out_features)[:in_features]
    qzeros = qzeros.to(device)
    zeros = (qzeros.unsqueeze(2) >> shifts.view(1, 1, pack)).bitwise_and_(maxq)
    zeros = zeros.view(qzeros.shape[0], -1)[:, :out_features]
    scales = scales.to(device=device, dtype=torch.float32)
    g_idx = g_idx.to(device)
    size = _contiguous_group_size(g_idx, scales.shape[0])
    if size is not None:
        groups = scales.shape[0]
        weight = codes.reshape(groups, size, out_features).sub_(zeros.unsqueeze(1))
        weight = weight.to(torch.float32).mul_(scales.unsqueeze(1))
        return weight.view(in_features, out_features).to(dtype)
    rows = g_idx.long()
    weight = (codes - zeros.index_select(0, rows)).to(torch.float32)
    return weight.mul_(scales.index_select(0, rows)).to(dtype)


# --------------------------------------------------------------------------- weight sources


class FrozenWeight:
    """A frozen base linear layer whose dense weight is produced on demand.

    Attributes:
        in_features, out_features: the layer's shape.
        bias: the (frozen) bias tensor or None.
        output_in_input_dtype: True when the layer returns its output in the input's dtype
            whatever it computed in (bitsandbytes does), False when the output keeps the
            compute dtype.
    """

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    output_in_input_dtype: bool = False

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """Dtype the base matmul runs in for an input of ``input_dtype``."""
        raise NotImplementedError

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight, shape ``(out_features, in_features)``, in ``dtype`` (may be a view)."""
        raise NotImplementedError


class DenseWeight(FrozenWeight):
    """An unquantised ``nn.Linear``: the weight is used as stored (cast only under autocast)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.weight = layer.weight
        self.bias = layer.bias
        self.out_features, self.in_features = layer.weight.shape

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return self.weight.dtype

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.detach().to(dtype)


class Bnb4bitWeight(FrozenWeight):
    """A bitsandbytes ``Linear4bit``; mirrors its forward's dtype rules (compute_dtype, or the
    input dtype when none is set, and output cast back to the input dtype)."""

    output_in_input_dtype = True

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.bias = layer.bias
        self.out_features, self.in_features = layer.out_features, layer.in_features

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return self.layer.compute_dtype or input_dtype

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        weight = self.layer.weight
        state = _bnb_quant_state(self.layer)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(_BNB_PACKED_REASON)
        return dequantize_4bit(weight.data, state).to(dtype)


class GPTQWeight(FrozenWeight):
    """A gptqmodel GPTQ layer (TORCH or TRITON backend). Triton decodes it on CUDA tensors,
    PyTorch ops elsewhere, when the layout allows (2/4/8 bits, int32 packing, g_idx over
    every row); otherwise the layer's own ``dequantize_weight`` runs."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.bias = layer.bias
        self.out_features, self.in_features = layer.out_features, layer.in_features

    def compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype

    def triton_eligible(self) -> bool:
        layer = self.layer
        return (
            layer.bits in _TRITON_GPTQ_BITS
            and not getattr(layer, "planar", False)
            and layer.qweight.dtype == torch.int32
            and layer.g_idx.numel() == layer.in_features
        )

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        layer = self.layer
        if not self.triton_eligible():
            return layer.dequantize_weight().to(dtype).t()
        scales = layer.scales
        # wider than the scales (fp32 over fp16): the layer's own forward multiplies by the
        # product rounded to the scales' dtype; reproduce that, then widen
        decoded = scales.dtype if dtype.itemsize > scales.dtype.itemsize else dtype
        decode = (
            gptq_dequantize_triton
            if choose_impl(layer.qweight) == "triton"
            else gptq_dequantize_torch
        )
        weight_t = decode(layer.qweight, layer.qzeros, scales, layer.g_idx, layer.bits, decoded)
        return weight_t.to(dtype).t()


# --------------------------------------------------------------------------- selection

_BNB_PACKED_REASON = (
    "the bitsandbytes 4-bit weight was repacked into its CPU inference layout "
    "(packing_format_for_cpu); dequantize_4bit cannot read that layout"
)


def _bnb_quant_state(layer: nn.Module):
    """The weight's quant_state, or the copy Linear4bit keeps on the module for when the
    parameter was re-created without it (FSDP does that)."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def _bnb_linear4bit_class() -> type | None:
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


# gptqmodel classes that store the standard GPTQ layout and dequantise with TorchLinear's code:
# TorchLinear (TORCH backend, CPU and GPU) and TritonV2Linear (TRITON backend, GPU).
_GPTQ_CLASSES = (
    ("gptqmodel.nn_modules.qlinear.torch", "TorchLinear"),
    ("gptqmodel.nn_modules.qlinear.tritonv2", "TritonV2Linear"),
)


def _is_gptq_linear(layer: nn.Module) -> bool:
    for module_name, class_name in _GPTQ_CLASSES:
        module = sys.modules.get(module_name)
        if module is not None and type(layer) is getattr(module, class_name, None):
            return True
    return False


def _is_plain_linear(layer: nn.Module) -> bool:
    """An nn.Linear (or a subclass that keeps nn.Linear's forward, i.e. its math)."""
    return isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot serve as a fused LoRA base layer, or None when it can."""
    kind = type(layer).__name__
    bnb_cls = _bnb_linear4bit_class()
    if bnb_cls is not None and isinstance(layer, bnb_cls):
        state = _bnb_quant_state(layer)
        if state is None:
            return "the bitsandbytes Linear4bit weight is not quantised yet (no quant_state)"
        if getattr(state, "packing_format_for_cpu", False):
            return _BNB_PACKED_REASON
        return None
    if _is_gptq_linear(layer):
        if getattr(layer, "adapter", None) is not None:
            return (
                f"the GPTQ layer carries its own gptqmodel adapter ({type(layer.adapter).__name__})"
            )
        if getattr(layer, "online_full_had", False) or getattr(layer, "online_partial_had", False):
            return "the GPTQ layer rotates its input (Hadamard rotation)"
        if layer.g_idx is None or layer.g_idx.numel() != layer.in_features:
            return "the GPTQ layer's g_idx does not cover in_features (sharded layout)"
        return None
    if _is_plain_linear(layer):
        if layer.weight.requires_grad:
            return "the base nn.Linear weight requires grad; the fused op treats it as frozen"
        return None
    if "gptqmodel" in type(layer).__module__:
        return (
            f"GPTQ layer class {kind} is not supported; load the model with gptqmodel's TORCH "
            "or TRITON backend (TorchLinear / TritonV2Linear)"
        )
    return (
        f"base layer type {type(layer).__module__}.{kind} is not supported; expected "
        "torch.nn.Linear, bitsandbytes Linear4bit or gptqmodel TorchLinear/TritonV2Linear"
    )


def frozen_weight(layer: nn.Module, checked: bool = False) -> FrozenWeight:
    """Wrap a supported base layer; raises ValueError naming the problem otherwise.

    ``checked=True`` skips ``unsupported_reason`` for a caller that has just run it.
    """
    reason = None if checked else unsupported_reason(layer)
    if reason is not None:
        raise ValueError(f"cannot fuse LoRA over this base layer: {reason}")
    bnb_cls = _bnb_linear4bit_class()
    if bnb_cls is not None and isinstance(layer, bnb_cls):
        return Bnb4bitWeight(layer)
    if _is_gptq_linear(layer):
        return GPTQWeight(layer)
    return DenseWeight(layer)
