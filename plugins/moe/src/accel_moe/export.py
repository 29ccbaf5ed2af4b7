"""``accel moe export <checkpoint> <output>``: a Trainer checkpoint of an expert-parallel run
(``--fast_moe N``; also ``fsdp_size``) as a plain Hugging Face model.

Such checkpoints hold sharded ``torch.distributed.checkpoint`` state, the layout the core's
Trainer writes for every model sharded at load time (``accel.trainer.sharded_checkpoint``), so
a save gathers nothing. DCP records every tensor's global shape, so the export, read in one
process without ``torchrun``, holds every expert of every layer; it is written in the
checkpoint format transformers saves (safetensors + config + tokenizer), which
``AutoModelForCausalLM.from_pretrained`` loads. The final model of a run (``save_model_dir``)
is already plain and needs no export.
"""

from __future__ import annotations

from pathlib import Path


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> str:
    """Write the plain model of ``checkpoint`` into the new folder ``output``; return its path."""
    from accel.api import export_checkpoint as export

    return export(checkpoint, output)
