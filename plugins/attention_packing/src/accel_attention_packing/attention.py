"""Variable-length ("varlen") attention for packed rows without flash-attn.

A padding-free batch is one row holding several examples. Plain causal attention over that
row lets tokens attend to earlier examples, and costs O(row_length^2). Flash-attn's varlen
kernels avoid both, but flash-attn exists only for CUDA. This module gives the same
semantics everywhere: the row is cut into its example segments and causal
``torch.nn.functional.scaled_dot_product_attention`` runs on each segment, so the cost is
the sum of squared example lengths and no token sees another example.

It plugs into transformers through ``AttentionInterface`` under the name
:data:`VARLEN_ATTENTION_NAME`; ``register_varlen_attention()`` must be called before a model
is built or switched with ``attn_implementation=VARLEN_ATTENTION_NAME``.

No mask function is registered in ``AttentionMaskInterface`` on purpose: for names absent
from that interface, transformers skips mask construction and hands the attention function
the user's 2-D padding mask (or ``None``) unchanged. A packed row therefore never
materialises an O(row_length^2) mask, and padded batches / generation still work because
the 2-D mask is expanded here (causal, key padding, sliding window).

Where segment boundaries come from, in order of precedence:
1. ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments (from the collator), which index
   the flattened ``batch * seq_len`` tokens exactly like flash-attn's ``cu_seqlens``;
2. ``position_ids`` (restarting at 0, or any non-+1 step, starts a new example) when no
   2-D mask is given. Some models (e.g. GPTBigCode) do not forward ``position_ids`` to
   their attention; for them the collator's ``cu_seq_lens`` are required;
3. otherwise each row is one sequence (ordinary causal attention, padding from the mask).
"""

from __future__ import annotations

import importlib.util
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

VARLEN_ATTENTION_NAME = "accel_varlen_sdpa"

_UNSUPPORTED_KWARGS = ("s_aux", "sinks")


# --------------------------------------------------------------------------------------
# segment boundaries
# --------------------------------------------------------------------------------------


class _BoundaryCache:
    """Remember the boundaries computed for one tensor, so the N layers of a forward pass
    convert ``cu_seq_lens`` / ``position_ids`` to python ints (a device sync) only once."""

    def __init__(self) -> None:
        self._ref: weakref.ReferenceType | None = None
        self._key: tuple | None = None
        self._value: list[int] | None = None

    def get(self, tensor: torch.Tensor, key: tuple) -> list[int] | None:
        if self._ref is not None and self._ref() is tensor and self._key == key:
            return self._value
        return None

    def put(self, tensor: torch.Tensor, key: tuple, value: list[int]) -> None:
        self._ref = weakref.ref(tensor)
        self._key = key
        self._value = value


_cu_cache = _BoundaryCache()
_pos_cache = _BoundaryCache()


def _boundaries_from_cu_seq_lens(cu: torch.Tensor, total: int) -> list[int]:
    key = (cu._version, total)
    cached = _cu_cache.get(cu, key)
    if cached is not None:
        return cached
    bounds = [int(x) for x in cu.reshape(-1).tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seq_lens_q must start at 0 and end at batch*seq_len = {total}, got "
            f"{bounds[:3]}...{bounds[-2:]}; build the batch with PaddingFreeCollator and do not "
            "pad it afterwards"
        )
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError("cu_seq_lens_q must be strictly increasing (no empty example)")
    _cu_cache.put(cu, key, bounds)
    return bounds


def _boundaries_from_position_ids(position_ids: torch.Tensor, batch: int, seqlen: int) -> list[int]:
    key = (position_ids._version, batch, seqlen)
    cached = _pos_cache.get(position_ids, key)
    if cached is not None:
        return cached
    pos = position_ids
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    pos = pos.expand(batch, seqlen)
    step = torch.diff(pos, dim=-1) != 1  # (B, S-1): True where a new example starts
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = step
    bounds = starts.reshape(-1).nonzero().view(-1).tolist()
    bounds.append(batch * seqlen)
    _pos_cache.put(position_ids, key, bounds)
    return bounds


# --------------------------------------------------------------------------------------
# attention math
# --------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(..., Hkv, S, D) -> (..., Hkv * n_rep, S, D), each kv head repeated n_rep times."""
    if n_rep == 1:
        return x
    *lead, hkv, s, d = x.shape
    return x.unsqueeze(-3).expand(*lead, hkv, n_rep, s, d).reshape(*lead, hkv * n_rep, s, d)


def _band_mask(
    q_len: int,
    k_len: int,
    sliding_window: int | None,
    causal: bool,
    device: torch.device,
    *,
    always: bool = False,
) -> torch.Tensor | None:
    """Boolean (q_len, k_len) mask of allowed keys; query i sits at absolute k_len - q_len + i.

    Returns None when sdpa's ``is_causal`` (or no mask at all) expresses the same pattern,
    unless ``always`` asks for an explicit tensor."""
    window_matters = sliding_window is not None and k_len > sliding_window
    if not always and not window_matters and (not causal or q_len == k_len):
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if window_matters:
        # transformers' convention: a query sees keys with q - k < sliding_window.
        allowed &= k_pos > q_pos - sliding_window
        if not causal:
            allowed &= k_pos < q_pos + sliding_window
    return allowed


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attention on (B, H, Lq, D) against (B, Hkv, Lk, D), H a multiple of Hkv, with an
    optional boolean mask. ``causal`` is used only when ``mask`` is None and Lq == Lk.

    Inputs stay 4-D: on CPU, 3-D inputs send sdpa to its slow math backend, while 4-D
    views in transformers' (B, S, H, D) memory layout take the fused kernel."""
    n_rep = q.shape[-3] // k.shape[-3]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal and mask is None,
            enable_gqa=n_rep > 1,
        )
    # sdpa has no softcap: do the math explicitly (cost is the same O(L^2) per segment).
    k = _repeat_kv(k, n_rep)
    v = _repeat_kv(v, n_rep)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None and causal:
        mask = _band_mask(q.shape[-2], k.shape[-2], None, True, q.device, always=True)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v)


def _padded_mask(
    attention_mask: torch.Tensor, q_len: int, k_len: int, sliding_window: int | None, causal: bool
) -> torch.Tensor:
    """Expand a 2-D (B, k_len) padding mask into a boolean (B, 1, q_len, k_len) mask."""
    if attention_mask.shape[-1] != k_len:
        raise ValueError(
            f"2-D attention_mask has {attention_mask.shape[-1]} columns but the keys have length "
            f"{k_len}; the mask must cover past and current tokens"
        )
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    band = _band_mask(q_len, k_len, sliding_window, causal, attention_mask.device, always=True)
    allowed = keep & band
    # A query row with no visible key (left padding) would give NaN; let it see itself so
    # the (ignored) output stays finite and gradients stay clean.
    empty = ~allowed.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        diag = torch.zeros(q_len, k_len, dtype=torch.bool, device=allowed.device)
        diag[torch.arange(q_len), torch.arange(k_len - q_len, k_len)] = True
        allowed = allowed | (empty & diag)
    return allowed


def varlen_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function with the signature of transformers' ``AttentionInterface``.

    Shapes: ``query`` (B, H, Sq, D), ``key``/``value`` (B, Hkv, Sk, D) with H a multiple of
    Hkv (GQA / MQA repeat the kv heads). Returns ``(output (B, Sq, H, D), None)``; attention
    weights are never materialised.

    Supported: dropout (as passed by the model, i.e. 0 in eval), ``scaling``, causal or
    bidirectional (``is_causal`` / ``module.is_causal``), ``sliding_window`` (transformers'
    convention ``q - k < window``), ``softcap`` (explicit-math path), KV-cache decoding and
    padded batches (2-D mask). Not supported: attention sinks (``s_aux``), packing together
    with a KV cache (cu_seq_lens with Sq != Sk).
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{VARLEN_ATTENTION_NAME} does not support `{name}` (attention sinks); use "
                "attn_implementation='eager' or a flash/flex implementation for this model"
            )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() not in (2, 4):
        raise ValueError(
            f"{VARLEN_ATTENTION_NAME} expects a 2-D padding mask, a 4-D prepared mask or None; "
            f"got a {attention_mask.dim()}-D mask"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, n_heads, q_len, head_dim = query.shape
    n_kv = key.shape[1]
    k_len = key.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads is not a multiple of {n_kv} key/value heads")
    opts = {"dropout": dropout, "scaling": scaling, "softcap": softcap}

    same_cu = cu_seq_lens_q is None or cu_seq_lens_k is None or cu_seq_lens_q is cu_seq_lens_k
    if not same_cu and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise NotImplementedError(
            f"{VARLEN_ATTENTION_NAME} needs cu_seq_lens_q == cu_seq_lens_k (self-attention "
            "on packed rows)"
        )

    bounds: list[int] | None = None
    packed_hint = cu_seq_lens_q is not None
    if packed_hint:
        if q_len != k_len:
            raise NotImplementedError(
                f"{VARLEN_ATTENTION_NAME}: packed rows (cu_seq_lens) cannot be combined with a "
                "KV cache; train with use_cache=False (see disable_kv_cache)"
            )
        padded = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        if padded and not bool(attention_mask.all()):
            raise ValueError(
                "got both cu_seq_lens (a packed row) and a 2-D attention_mask with padding; "
                "a padding-free batch must not carry an attention_mask"
            )
        bounds = _boundaries_from_cu_seq_lens(cu_seq_lens_q, batch * q_len)
    elif (
        attention_mask is None
        and isinstance(position_ids, torch.Tensor)
        and position_ids.dim() <= 2
        and q_len == k_len
        and q_len > 1
    ):
        bounds = _boundaries_from_position_ids(position_ids, batch, q_len)

    one_per_row = bounds is None or bounds == list(range(0, batch * q_len + 1, q_len))
    if not one_per_row:
        return _segmented(query, key, value, bounds, causal, sliding_window, opts), None

    # Dense path: one sequence per row (plain causal), a padded batch, a 4-D mask, decoding.
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        mask = attention_mask[..., :k_len]
    elif isinstance(attention_mask, torch.Tensor):
        mask = _padded_mask(attention_mask, q_len, k_len, sliding_window, causal)
    else:
        mask = _band_mask(q_len, k_len, sliding_window, causal, query.device)
    out = _attend(query, key, value, mask=mask, causal=causal, **opts)
    return out.transpose(1, 2).contiguous(), None


def _segmented(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    causal: bool,
    sliding_window: int | None,
    opts: dict[str, Any],
) -> torch.Tensor:
    """Run attention independently on each [bounds[i], bounds[i+1]) slice of the flat tokens.

    Returns (B, S, H, D). Slices are 4-D views of the (B*S)-token row (see :func:`_attend`)."""
    batch, n_heads, seqlen, _ = query.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # (B, h, S, D) -> (1, h, B*S, D), a view if it can
        if batch == 1:
            return x
        return x.transpose(1, 2).reshape(1, batch * seqlen, x.shape[1], -1).transpose(1, 2)

    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # split (not slicing): its backward is one concatenation, while each slice's backward
    # would materialise a zero tensor of the whole row.
    q_parts, k_parts, v_parts = (flat(x).split(sizes, dim=2) for x in (query, key, value))
    outs = []
    for q, k, v, length in zip(q_parts, k_parts, v_parts, sizes):
        mask = _band_mask(length, length, sliding_window, causal, q.device)
        out = _attend(q, k, v, mask=mask, causal=causal, **opts)
        outs.append(out.transpose(1, 2))  # (1, L, H, Dv)
    out = torch.cat(outs, dim=1)  # (1, B*S, H, Dv)
    return out.reshape(batch, seqlen, n_heads, -1)


# --------------------------------------------------------------------------------------
# registration and choice of path
# --------------------------------------------------------------------------------------


def register_varlen_attention() -> str:
    """Register :func:`varlen_sdpa_attention_forward` in transformers' ``AttentionInterface``.

    Idempotent; returns the name to pass as ``attn_implementation``. Raises if another
    function already holds the name, rather than silently replacing it.
    """
    from transformers import AttentionInterface

    current = AttentionInterface._global_mapping.get(VARLEN_ATTENTION_NAME)
    if current is varlen_sdpa_attention_forward:
        return VARLEN_ATTENTION_NAME
    if current is not None:
        raise RuntimeError(
            f"attention implementation {VARLEN_ATTENTION_NAME!r} is already registered to "
            f"{getattr(current, '__qualname__', current)!r}; refusing to replace it"
        )
    AttentionInterface.register(VARLEN_ATTENTION_NAME, varlen_sdpa_attention_forward)
    return VARLEN_ATTENTION_NAME


def is_varlen_attention_registered() -> bool:
    """True when :func:`register_varlen_attention` has run in this process."""
    from transformers import AttentionInterface

    return (
        AttentionInterface._global_mapping.get(VARLEN_ATTENTION_NAME)
        is varlen_sdpa_attention_forward
    )


class AttentionChoice(NamedTuple):
    """Result of :func:`choose_attention_path`: ``implementation, reason = choice``."""

    implementation: str
    reason: str


def _flash_attn_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash_attn package is not installed"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # a broken CUDA build raises all sorts of errors
        return False, f"flash_attn is installed but does not import ({type(exc).__name__}: {exc})"
    return True, "flash_attn imports"


def choose_attention_path(model_config: Any, device: torch.device | str | None) -> AttentionChoice:
    """Pick the attention implementation for padding-free training on ``device``.

    ``"flash_attention_2"`` when the device is CUDA and flash-attn imports, otherwise
    :data:`VARLEN_ATTENTION_NAME` (call :func:`register_varlen_attention` before using it).
    Returns an :class:`AttentionChoice` whose ``reason`` is a sentence for the log.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model_type = getattr(model_config, "model_type", None) or type(model_config).__name__
    if dev.type == "cuda":
        ok, why = _flash_attn_importable()
        if ok:
            dtype = getattr(model_config, "dtype", None) or getattr(
                model_config, "torch_dtype", None
            )
            note = ""
            if dtype is not None and str(dtype).endswith("float32"):
                note = " (flash-attn computes in fp16/bf16; fp32 inputs are cast)"
            return AttentionChoice(
                "flash_attention_2",
                f"{model_type} on {dev}: flash_attention_2 varlen kernels, {why}{note}",
            )
        reason = f"{model_type} on {dev}: {why}, using {VARLEN_ATTENTION_NAME} (per-example sdpa)"
        return AttentionChoice(VARLEN_ATTENTION_NAME, reason)
    return AttentionChoice(
        VARLEN_ATTENTION_NAME,
        f"{model_type} on {dev}: flash-attn needs CUDA, using {VARLEN_ATTENTION_NAME} "
        "(per-example sdpa)",
    )


def disable_kv_cache(model: torch.nn.Module) -> bool:
    """Turn the KV cache off for training on packed rows; returns the previous setting.

    With ``use_cache=True`` the model builds a cache during the training forward, and
    transformers then skips its packed-sequence detection: with sdpa/eager attention the
    tokens of a packed row attend across example boundaries. Sets ``config.use_cache`` and,
    when present, ``generation_config.use_cache`` (on the model and any wrapped base model).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"disable_kv_cache expects a transformers model with a `config`, got "
            f"{type(model).__name__}"
        )
    previous = bool(getattr(config, "use_cache", False))
    seen: set[int] = set()
    for obj in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        for attr in ("config", "generation_config"):
            cfg = getattr(obj, attr, None)
            if cfg is not None and hasattr(cfg, "use_cache"):
                cfg.use_cache = False
    return previous
