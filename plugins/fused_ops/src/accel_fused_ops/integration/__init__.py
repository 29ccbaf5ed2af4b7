"""Model glue: how the ops in ``accel_fused_ops.kernels`` reach transformers and PEFT modules.

One module per feature, each with a ``rules(settings, model)`` builder that checks the model
and returns the feature's :class:`accel.PatchRule` objects (``features.FEATURES`` names them):

* ``norms``: which RMSNorm class computes which casting mode; the replacement forward.
* ``mlp``: gated MLP forms (separate or fused gate/up projections), their activation; forward.
* ``rope``: the modeling file's ``apply_rotary_pos_emb`` swap, reference counted.
* ``lora``: PEFT LoRA layer checks (``can_fuse``) and the fused forward of a LoRA layer.
* ``heads``: the causal-LM head checks and the loss rules.
* ``loss``: the loss hook (the model's ``loss_function``) and the lm_head pass-through of a
  fused-linear training forward; the loss metrics callback.

Which architecture supports which feature is data, in ``accel_fused_ops.support``.
"""
