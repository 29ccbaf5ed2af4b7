"""A dataset of identifiable examples, written as JSONL for the trainer."""

from __future__ import annotations

import json
import random
from pathlib import Path


def identifiable_examples(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Example i starts with tokens (2, 4 + i // 50, 4 + i % 50): its identity survives packing."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        body = [rng.randrange(4, 60) for _ in range(rng.choice([2, 3, 5, 8, 13, 21, 30]))]
        ids = [2, 4 + i // 50, 4 + i % 50, *body, 3]
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def identity(input_ids: list[int]) -> int:
    return (input_ids[1] - 4) * 50 + (input_ids[2] - 4)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
