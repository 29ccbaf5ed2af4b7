"""Run under torchrun: train with padding-free + multipack through accel.train and record,
per rank, the identity of every example each collator call received."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trainer_fixtures import identity  # noqa: E402

import accel  # noqa: E402
from accel_attention_packing import collator as collator_module  # noqa: E402

RECORD = Path(os.environ["RECORD_DIR"]) / f"rank{os.environ['RANK']}.jsonl"
_original_call = collator_module.PaddingFreeCollator.__call__


def recording_call(self, features):
    with RECORD.open("a") as fh:
        fh.write(json.dumps([identity(list(f["input_ids"])) for f in features]) + "\n")
    return _original_call(self, features)


collator_module.PaddingFreeCollator.__call__ = recording_call

if __name__ == "__main__":
    accel.train(json.loads(Path(sys.argv[1]).read_text()))
