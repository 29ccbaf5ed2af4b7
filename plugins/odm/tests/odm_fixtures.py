"""Three small datasets of different difficulty for odm runs, and the run arguments."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml


def write_datasets(root: Path, sizes=(40, 24, 16), seed: int = 0) -> list[Path]:
    """``easy``: one repeated letter; ``medium``: the alphabet from a random start; ``hard``:
    random letters (words of the demo tokenizer's vocabulary, letters a-p)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnop"
    makers = [
        lambda i: " ".join(["a"] * 8),
        lambda i: " ".join(letters[(i + j) % 16] for j in range(8)),
        lambda i: " ".join(rng.choice(letters) for _ in range(8)),
    ]
    paths = []
    for name, size, make in zip(("easy", "medium", "hard"), sizes, makers):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": make(i)}) + "\n" for i in range(size)))
        paths.append(path)
    return paths


def write_odm_config(root: Path, paths: list[Path], *, split: bool = False, **odm) -> Path:
    datasets = []
    for path in paths:
        entry = {"name": path.stem, "data_paths": [str(path)]}
        if split:
            entry["split"] = {"train": 0.75, "validation": 0.25}
        datasets.append(entry)
    config = {
        "dataprocessor": {"type": "odm", "seed": 3, **({"odm": odm} if odm else {})},
        "datasets": datasets,
    }
    out = root / "odm.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def odm_args(model_dir: Path, data_config: Path, out: Path, **extra) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "data_config": str(data_config),
        "dataset_text_field": "text",
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 1,
        "odm": ["train_loss"],
        **extra,
    }


def odm_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "odm.jsonl").read_text().splitlines()]
