"""Writing the final model into ``save_model_dir``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def save_model_atomically(trainer: Any, target: str) -> str:
    """Save the final model (and tokenizer) into ``target`` without ever leaving it half-written:
    write to a sibling temporary folder, then swap it in; an existing model there is replaced
    only once the new one is complete."""
    final = Path(target).resolve()
    staging = final.with_name(f".{final.name}.tmp")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank calls it: FSDP gathers the weights
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        final.parent.mkdir(parents=True, exist_ok=True)
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return str(final)
