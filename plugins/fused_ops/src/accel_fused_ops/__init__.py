"""accel-fused-ops: fused kernels for Hugging Face causal LMs, reached through patch rules.

``kernels/`` holds the ops (Triton kernel, PyTorch reference, autograd Function, public op;
no transformers or PEFT import), ``integration/`` the model glue, ``features`` one record per
config switch, ``support`` the per-architecture table, and ``rules.build_rules`` turns a
:class:`~accel_fused_ops.config.FusedOpsConfig` into :class:`accel.PatchRule` objects for one
model, and ``support`` lists the architectures each feature supports. Nothing heavy is
imported here: ``accel plugins`` loads the plugin class without torch.
"""
