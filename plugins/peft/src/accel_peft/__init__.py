"""accel-peft: LoRA on 4-bit bases.

- ``bitsandbytes`` (``--bnb_qlora nf4|fp4``): loads the model in bitsandbytes 4-bit (QLoRA).
- ``auto_gptq`` (``--auto_gptq triton_v2``): loads a GPTQ checkpoint with gptqmodel
  (GPTQ-LoRA); ``accel quantize`` writes such a checkpoint from a local model.
- ``accel export merged``: dequantizes the base, merges the adapters, writes a plain model.

Nothing heavy is imported here: ``accel plugins`` loads the plugin classes without torch.
"""
