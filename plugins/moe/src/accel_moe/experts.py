"""The ScatterMoE experts forward, registered in transformers' ``ExpertsInterface``.

Every architecture whose experts class carries ``@use_experts_implementation`` (Mixtral,
Qwen2/3-MoE, GraniteMoe, ...) calls the function registered under the name its config's
``_experts_implementation`` holds, with the module itself (weights, ``act_fn``, layout flags)
and the router's ``top_k_index`` / ``top_k_weights``. The router stays the model's own, so its
logits and the auxiliary load-balancing loss are untouched.

Under transformers' expert parallelism the module holds only the local experts and the ids of
other ranks' experts are ``>= self.num_experts``; :meth:`Routing.sort` cuts them off.
"""

from __future__ import annotations

import torch

from . import IMPLEMENTATION
from .kernels.scatter_gemm import Routing, scattered_linear
from .lora import lora_folded


def scattermoe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Sort the routing once, run the up and down projections as grouped GEMMs over the
    scattered tokens (gather fused into the first, scatter into the second) and combine the
    top-k outputs of every token with its routing weights."""
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.size(-1)
    routing = Routing.sort(top_k_index, self.num_experts)
    transposed = self.is_transposed
    plain = not (self.has_bias or self.has_post_expert_norm)

    up = lora_folded(self, "gate_up_proj" if self.has_gate else "up_proj")
    down = lora_folded(self, "down_proj")  # the local LoRA factors folded in under EP
    h = scattered_linear(hidden_states, up, routing, gather=routing.tokens, transposed=transposed)
    if self.has_bias:
        bias = self.gate_up_proj_bias if self.has_gate else self.up_proj_bias
        h = h + bias[routing.experts]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)

    slots = num_tokens * top_k
    if plain:  # the scatter back to token-expert slots is part of the GEMM
        y = scattered_linear(
            h, down, routing, scatter=routing.slots, out_rows=slots, transposed=transposed
        )
    else:  # bias / post-expert norm act on the sorted rows before the scatter
        y = scattered_linear(h, down, routing, transposed=transposed)
        if self.has_bias:
            y = y + self.down_proj_bias[routing.experts]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y.new_zeros(slots, y.shape[-1]).index_copy(0, routing.slots, y)

    weights = top_k_weights.to(y.dtype).reshape(num_tokens, top_k, 1)
    out = (y.view(num_tokens, top_k, hidden) * weights).sum(dim=1)
    return out.to(hidden_states.dtype)


def register() -> None:
    """Make ``experts_implementation="scattermoe"`` known to transformers in this process (every
    rank must do it before loading; registering again is harmless)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, scattermoe_experts_forward)
