"""Causal-LM loss through the model's ``loss_function`` extension point.

transformers' causal-LM classes end with ``logits = lm_head(hidden)`` (maybe followed by a
scaling or a soft-cap) and ``loss = self.loss_function(logits, labels, vocab_size, **kw)``;
``loss_function`` reads the instance attribute ``_loss_function`` first, so a per-model loss
needs no copied forward.

* ``cross_entropy`` mode: the loss function shifts the labels as ``ForCausalLMLoss`` does and
  calls the cross-entropy kernel on the logits.
* ``fused_linear`` mode: the logits of a training forward are never built. A wrapper around
  the causal-LM module's forward marks a *training forward with labels* (module in training
  mode, autograd on, ``labels`` given); during it the lm_head returns its input hidden states
  instead of logits and the loss function computes the fused linear cross-entropy of those
  hidden states with the lm_head (its weight for a plain ``nn.Linear``, tied or not; the
  module itself, chunk by chunk, for a LoRA-wrapped or otherwise wrapped head). What the
  model does between head and loss is handled per class (``support.CAUSAL_LM_HEADS``):
  Granite's division by ``logits_scaling`` is linear and commutes with a bias-free head;
  Gemma's final soft-cap is switched off in the model for that forward and applied inside
  the kernel instead. MoE models add their aux loss to the returned loss as before. The
  output's ``logits`` is ``None`` for such a forward; every other forward (eval, generation,
  no labels) is untouched and returns real logits, with the loss from the CE kernel.

Both modes take the loss options of the config (:class:`LossOptions`: label smoothing, which
``--label_smoothing_factor`` feeds, z-loss, token accuracy, the chunk memory budget). Token
accuracy and the z-loss term of training forwards are summed on the device in a
:class:`LossMetrics` kept on the patched model; :func:`metrics_callback` adds their per-token
means since the last log to the trainer's logs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cross_entropy import LossOutput, cross_entropy
from ..kernels.linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_module,
)

Revert = Callable[[], None]


def shifted_labels(
    labels: torch.Tensor, ignore_index: int, shift_labels: torch.Tensor | None
) -> torch.Tensor:
    """Next-token targets, flattened, exactly as ``ForCausalLMLoss`` builds them."""
    if shift_labels is None:
        padded = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    return shift_labels.reshape(-1)


@dataclass(frozen=True)
class LossOptions:
    """The loss settings of the config, as the kernels take them."""

    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    token_accuracy: bool = False
    memory_budget: int | None = None  # bytes, for the fused linear chunks

    @classmethod
    def from_settings(cls, settings: Any) -> LossOptions:
        """From a ``FusedOpsConfig`` (fields missing on older configs take their defaults)."""
        if settings is None:
            return cls()
        budget = getattr(settings, "loss_memory_budget_mib", None)
        return cls(
            label_smoothing=float(getattr(settings, "label_smoothing", 0.0)),
            lse_square_scale=float(getattr(settings, "z_loss", 0.0)),
            token_accuracy=bool(getattr(settings, "token_accuracy", False)),
            memory_budget=int(budget) << 20 if budget is not None else None,
        )

    def kernel_kwargs(self) -> dict[str, Any]:
        return {
            "label_smoothing": self.label_smoothing,
            "lse_square_scale": self.lse_square_scale,
            "return_z_loss": self.lse_square_scale != 0.0,
            "return_token_accuracy": self.token_accuracy,
        }


class LossMetrics:
    """Token accuracy and z-loss of the training forwards since the last log, on the device.

    Sums, not means, so forwards of different sizes and gradient-accumulation micro-batches
    weigh by their tokens; no host sync until :meth:`pop`.
    """

    def __init__(self, options: LossOptions) -> None:
        self.options = options
        self.sums: torch.Tensor | None = None  # [correct tokens, z-loss sum, label tokens]

    def record(
        self,
        out: Any,
        target: torch.Tensor,
        ignore_index: int,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        """Keep the companions of ``out`` (a :class:`LossOutput` or a plain loss); return the
        loss."""
        if not isinstance(out, LossOutput):
            return out
        with torch.no_grad():
            n = (target != ignore_index).sum().to(torch.float32)
            zero = torch.zeros((), dtype=torch.float32, device=n.device)
            correct = out.token_accuracy * n if out.token_accuracy is not None else zero
            z = zero
            if out.z_loss is not None:  # reduced as the loss: times its normaliser = the sum
                if num_items_in_batch is None:
                    z = out.z_loss * n
                elif isinstance(num_items_in_batch, torch.Tensor):
                    z = out.z_loss * num_items_in_batch.to(n.device, torch.float32)
                else:
                    z = out.z_loss * float(num_items_in_batch)
            row = torch.stack([correct, z, n]).nan_to_num_(0.0)
            self.sums = row if self.sums is None else self.sums + row.to(self.sums.device)
        return out.loss

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Per-token means since the last call (summed over processes by ``reduce``)."""
        sums, self.sums = self.sums, None
        if not self.options.token_accuracy and not self.options.lse_square_scale:
            return {}
        if sums is None:  # still joins the reduce: every process calls it at every log
            sums = torch.zeros(3)
        if reduce is not None:
            sums = reduce(sums)
        correct, z, n = (float(v) for v in sums.tolist())
        if n <= 0:
            return {}
        values = {}
        if self.options.token_accuracy:
            values["token_accuracy"] = correct / n
        if self.options.lse_square_scale:
            values["z_loss"] = z / n
        return values


#: attribute under which the patched model keeps its :class:`LossMetrics`
METRICS_ATTRIBUTE = "accel_fused_loss_metrics"


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    *,
    options: LossOptions | None = None,
    metrics: LossMetrics | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Drop-in for transformers' ``ForCausalLMLoss`` computed by the cross-entropy kernel."""
    options = options or LossOptions()
    target = shifted_labels(labels, ignore_index, shift_labels).to(logits.device)
    out = cross_entropy(
        logits.reshape(-1, vocab_size),
        target,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        **options.kernel_kwargs(),
    )
    if metrics is None:
        return out.loss if isinstance(out, LossOutput) else out
    return metrics.record(out, target, ignore_index, num_items_in_batch)


@dataclass
class _ForwardState:
    """Per model: whether the current forward is a fused one, and the soft-cap to apply."""

    active: bool = False
    softcap: float | None = None


class _HeadProjection:
    """The lm_head's own computation, callable on a chunk of hidden states (module variant)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], out_features: int):
        self.forward = forward
        self.out_features = out_features

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.forward(hidden)


def head_bias(head: nn.Module) -> torch.Tensor | None:
    """The bias of the head's base linear layer (PEFT wrappers keep it on the base layer)."""
    base = head.get_base_layer() if hasattr(head, "get_base_layer") else head
    return getattr(base, "bias", None)


def head_out_features(head: nn.Module, model: nn.Module) -> int:
    base = head.get_base_layer() if hasattr(head, "get_base_layer") else head
    out = getattr(base, "out_features", None)
    if isinstance(out, int):
        return out
    return int(model.config.get_text_config().vocab_size)


def _labels_position(forward: Callable[..., Any]) -> int | None:
    """Index of ``labels`` among the positional parameters of a bound forward."""
    params = list(inspect.signature(forward).parameters.values())
    for i, p in enumerate(params):
        if p.name == "labels":
            ok = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            return i if ok else None
    return None


def _without_logits(output: Any) -> Any:
    """The model output with ``logits`` removed (they were hidden states, not logits)."""
    if isinstance(output, tuple):
        return (output[0], None, *output[2:])
    if isinstance(output, dict) and "logits" in output:
        kept = {k: v for k, v in output.items() if k != "logits"}
        return type(output)(**kept)
    return output


def install_fused_linear_loss(model: nn.Module, head_kind: str, settings: Any = None) -> Revert:
    """Patch one causal-LM module for the fused linear cross-entropy; return the revert.

    ``head_kind`` is the class's entry of ``support.CAUSAL_LM_HEADS``; ``settings`` the
    plugin's ``FusedOpsConfig`` (its loss options). Patches four things on instances only:
    the model's forward (wrapper), the lm_head's forward (pass-through during a fused
    forward), the model's ``_loss_function`` and its :class:`LossMetrics` attribute.
    """
    from accel.api import set_attribute

    options = LossOptions.from_settings(settings)
    metrics = LossMetrics(options)
    head = model.get_output_embeddings()
    state = _ForwardState()
    head_forward = head.forward  # instance or class forward, e.g. the fused LoRA one
    plain = type(head) is nn.Linear
    projection = _HeadProjection(head_forward, head_out_features(head, model))

    def lm_head_forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if state.active:
            return hidden
        return head_forward(hidden, *args, **kwargs)

    def loss_function(
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not state.active:
            return cross_entropy_loss(
                logits,
                labels,
                vocab_size,
                num_items_in_batch,
                ignore_index,
                shift_labels,
                options=options,
                metrics=metrics if model.training else None,
            )
        hidden = logits.reshape(-1, logits.shape[-1])  # the lm_head input, not logits
        target = shifted_labels(labels, ignore_index, shift_labels).to(hidden.device)
        kw = {
            "ignore_index": ignore_index,
            "num_items_in_batch": num_items_in_batch,
            "softcap": state.softcap,
            "memory_budget": options.memory_budget,
            **options.kernel_kwargs(),
        }
        if plain:
            out = fused_linear_cross_entropy(hidden, head.weight, target, head.bias, **kw)
        else:
            params = [p for p in head.parameters() if p.requires_grad]
            out = fused_linear_cross_entropy_module(hidden, projection, target, params=params, **kw)
        return metrics.record(out, target, ignore_index, num_items_in_batch)

    model_forward = model.forward
    labels_at = _labels_position(model_forward)
    config = model.config

    @functools.wraps(model_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        if state.active or labels is None or not model.training or not torch.is_grad_enabled():
            return model_forward(*args, **kwargs)
        cap = config.final_logit_softcapping if head_kind == "softcap" else None
        state.active, state.softcap = True, cap
        if cap is not None:
            config.final_logit_softcapping = None  # applied inside the kernel instead
        try:
            output = model_forward(*args, **kwargs)
        finally:
            state.active, state.softcap = False, None
            if cap is not None:
                config.final_logit_softcapping = cap
        return _without_logits(output)

    reverts = [
        set_attribute(model, "_loss_function", loss_function),
        set_attribute(model, METRICS_ATTRIBUTE, metrics),
        set_attribute(head, "forward", lm_head_forward),
        set_attribute(model, "forward", forward),
    ]

    def revert() -> None:
        while reverts:
            reverts.pop()()

    return revert


def install_cross_entropy_loss(model: nn.Module, settings: Any = None) -> Revert:
    """Set the model's ``_loss_function`` to the cross-entropy kernel version."""
    from accel.api import set_attribute

    options = LossOptions.from_settings(settings)
    metrics = LossMetrics(options)

    def loss_function(*args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("options", None)
        kwargs.pop("metrics", None)
        tracked = metrics if model.training else None
        return cross_entropy_loss(*args, options=options, metrics=tracked, **kwargs)

    reverts = [
        set_attribute(model, "_loss_function", loss_function),
        set_attribute(model, METRICS_ATTRIBUTE, metrics),
    ]

    def revert() -> None:
        while reverts:
            reverts.pop()()

    return revert


def metrics_callback(model: nn.Module, accelerator: Any = None) -> Any:
    """A ``TrainerCallback`` adding ``token_accuracy`` / ``z_loss`` to the training logs.

    Reads the :class:`LossMetrics` of every patched module of ``model`` at each log; the sums
    are added over processes (``accelerator.reduce``) so every rank logs the global mean. The
    values are also put into the trainer's ``log_history`` entry of that step.
    """
    from transformers import TrainerCallback

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
            return t
        return accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()

    class LossMetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
            if logs is None or "loss" not in logs:  # training logs only
                return
            values: dict[str, float] = {}
            for module in model.modules():
                metrics = getattr(module, METRICS_ATTRIBUTE, None)
                if isinstance(metrics, LossMetrics):
                    values.update(metrics.pop(reduce))
            logs.update(values)
            history = state.log_history
            if values and history and history[-1].get("step") == state.global_step:
                history[-1].update(values)

    return LossMetricsCallback()
