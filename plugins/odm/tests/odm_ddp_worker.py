"""One rank of an odm run under torchrun: ``accel.train`` with the JSON arguments in argv[1];
writes ``RECORD_DIR/rank{R}.json``: the bandit's (step, weights) after every update, the
examples drawn per dataset and the final parameters' checksum."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import accel

if __name__ == "__main__":
    args = json.loads(Path(sys.argv[1]).read_text())
    result = accel.train(args)
    plugin = result.framework.get("odm")
    rank = os.environ.get("RANK", "0")
    record = {
        "history": plugin.history,
        "counts": list(plugin.sampler.counts),
        "summary": result.summary,
    }
    Path(os.environ["RECORD_DIR"], f"rank{rank}.json").write_text(json.dumps(record))
