"""The embedded default: a tiny Llama, its tokenizer and a task it can learn — built locally.

Nothing is downloaded. The task is a letter cipher: the response spells the input with
every letter shifted by a fixed substitution, so the model must learn both the mapping and
to copy position by position; the loss falls from ~ln(vocab) to well under 1 within a
couple of minutes on a laptop CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..testing import RESPONSE_TEMPLATE, TEMPLATE, make_examples, tiny_model, tiny_tokenizer

DEMO_VERSION = "1"


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path
    train_file: Path
    validation_file: Path


def cache_root() -> Path:
    base = os.environ.get("ACCEL_CACHE") or Path.home() / ".cache" / "accel"
    return Path(base) / f"demo-v{DEMO_VERSION}"


def build_tokenizer() -> object:
    """A word-level tokenizer over the demo's alphabet and template words."""
    return tiny_tokenizer()


def build_model(vocab_size: int) -> object:

    return tiny_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        max_position_embeddings=256,
    )


def demo_assets(root: Path | None = None) -> DemoAssets:
    """Return the demo's model and data, building them on first use (atomically)."""
    root = Path(root) if root is not None else cache_root()
    assets = DemoAssets(root / "model", root / "train.jsonl", root / "validation.jsonl")
    if (root / "READY").is_file():
        return assets
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(vocab_size=64)
        model.save_pretrained(staging / "model")
        tokenizer.save_pretrained(staging / "model")
        for name, count, seed in (("train.jsonl", 2000, 1), ("validation.jsonl", 100, 2)):
            with (staging / name).open("w") as fh:
                for row in make_examples(count, seed):
                    fh.write(json.dumps(row) + "\n")
        (staging / "READY").write_text(DEMO_VERSION)
        if root.exists():  # a stale or half-built folder from an older run
            shutil.rmtree(root)
        os.replace(staging, root)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return assets


def demo_arguments(assets: DemoAssets, output_dir: str | None = None) -> dict[str, object]:
    """Trainer arguments of the demo run; the user's own arguments override them. The final
    model is saved in ``<output_dir>/model``, so ``--output_dir X`` keeps everything under X."""
    output_dir = output_dir or "accel-demo-output"
    return {
        "model_name_or_path": str(assets.model_dir),
        "training_data_path": str(assets.train_file),
        "validation_data_path": str(assets.validation_file),
        "data_formatter_template": TEMPLATE,
        "response_template": RESPONSE_TEMPLATE,
        "max_seq_length": 64,
        "output_dir": output_dir,
        "save_model_dir": str(Path(output_dir) / "model"),
        "num_train_epochs": 3,
        "per_device_train_batch_size": 16,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 20,
        "logging_steps": 25,
        "save_strategy": "no",
        "eval_strategy": "epoch",
        "seed": 42,
    }
