"""Argument dataclasses of the thin trainer (fms-hf-tuning's names).

Training options are transformers' ``TrainingArguments`` plus ``save_model_dir``; the
acceleration flags are not fields here: they come from the installed plugins
(:mod:`accel.flags`) and are parsed next to these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import transformers


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="", metadata={"help": "Model directory or hub id (required unless --demo)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer location; defaults to the model's."}
    )
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Dtype the model weights are loaded in."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, flex_attention, flash_attention_2, ..."}
    )
    fsdp_size: int | None = field(
        default=None,
        metadata={
            "help": "Shard the model at load time over this many processes with transformers' "
            "own FSDP2 (DistributedConfig(fsdp_size=N); fewer than the processes: the groups "
            "replicate, HSDP). Works on CPU/gloo; launch with torchrun; checkpoints are "
            "sharded DCP state that resumes."
        },
    )


@dataclass
class DataArguments:
    training_data_path: str = field(
        default="", metadata={"help": "JSON, JSONL, parquet or arrow file (or a folder of them)."}
    )
    validation_data_path: str | None = field(default=None, metadata={"help": "Same formats."})
    data_config: str | None = field(
        default=None,
        metadata={
            "help": "YAML data config (fms-hf-tuning layout) listing several datasets with "
            "sampling weights and per-dataset formatting; instead of training_data_path."
        },
    )
    dataset_text_field: str | None = field(
        default=None, metadata={"help": "Column holding the full training text."}
    )
    data_formatter_template: str | None = field(
        default=None,
        metadata={
            "help": "Template with {{column}} placeholders, e.g. '### Input: {{input}} ### Response: {{output}}'."
        },
    )
    response_template: str | None = field(
        default=None,
        metadata={
            "help": "Text that starts the response; loss is computed only on what follows it."
        },
    )
    max_seq_length: int = field(
        default=1024, metadata={"help": "Truncate examples to this many tokens."}
    )
    add_eos_token: bool = field(
        default=True, metadata={"help": "Append the EOS token to text examples."}
    )


@dataclass
class TuningArguments:
    peft_method: Literal["none", "lora", "alora", "pt"] = field(
        default="none",
        metadata={"help": "none (full fine-tuning), lora, alora or pt (prompt tuning)."},
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={
            "help": "Modules to adapt; 'all-linear' adapts every linear layer except the output "
            "layer (other names next to it are ignored); to adapt 'lm_head', name it with the "
            "other layers, without 'all-linear'.",
            "nargs": "+",
        },
    )
    invocation_string: str | None = field(
        default=None, metadata={"help": "aLoRA: text whose tokens activate the adapter."}
    )
    num_virtual_tokens: int = field(default=8, metadata={"help": "Prompt tuning: virtual tokens."})
    prompt_tuning_init_text: str | None = field(
        default=None, metadata={"help": "Prompt tuning: initialise from this text (else random)."}
    )


@dataclass
class AccelerationArguments:
    acceleration_config: str | None = field(
        default=None,
        metadata={
            "help": "YAML acceleration config (fms-acceleration layout), or the name of a "
            "sample from `accel configs` (e.g. fast-kernels)."
        },
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments with fms-hf-tuning's additions."""

    output_dir: str = field(default="output", metadata={"help": "Checkpoints and logs go here."})
    save_model_dir: str | None = field(
        default=None,
        metadata={
            "help": "Save the final model here (may be output_dir; files already there that "
            "are not a previous model's are kept)."
        },
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    logging_first_step: bool = field(
        default=True,
        metadata={"help": "Log the first step too (the summary's first_loss is its loss)."},
    )
    save_strategy: str = field(default="epoch", metadata={"help": "no, steps or epoch."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Unset: resume from the newest intact full-state checkpoint in output_dir "
            "if there is one; False: start fresh; a path: resume from that checkpoint."
        },
    )
