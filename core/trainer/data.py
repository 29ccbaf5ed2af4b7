"""Training data: load files, format, tokenize, mask the prompt, truncate.

Every example ends up as ``input_ids`` + ``labels`` (``-100`` where no loss is taken), so
the collators and plugins downstream see one shape whatever the input format was:
pretokenized rows, a text column, or records rendered by ``data_formatter_template``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .arguments import DataArguments

IGNORE_INDEX = -100
_SUFFIX_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_PLACEHOLDER = re.compile(r"\{\{\s*([^}\s]+)\s*\}\}")


def load_data_file(path: str) -> Any:
    """Load one JSON/JSONL/parquet/arrow file (or a folder of one format) as a Dataset."""
    import datasets

    target = Path(path)
    if not target.exists():
        raise ConfigError(f"training data '{path}' does not exist")
    files = (
        sorted(p for p in target.iterdir() if p.suffix in _SUFFIX_FORMATS)
        if target.is_dir()
        else [target]
    )
    if not files:
        raise ConfigError(f"'{path}' holds no .json, .jsonl, .parquet or .arrow files")
    kinds = {_SUFFIX_FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"'{path}': expected files ending in .json, .jsonl, .parquet or .arrow (one format), "
            f"got {sorted({f.suffix or '(none)' for f in files})}"
        )
    kind = kinds.pop()
    try:
        if kind == "arrow":
            parts = [datasets.Dataset.from_file(str(f)) for f in files]
            return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as err:
        raise ConfigError(f"could not read '{path}' as {kind}: {err}") from None


def render_template(template: str, record: dict[str, Any]) -> str:
    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in record:
            raise ConfigError(
                f"data_formatter_template uses '{{{{{key}}}}}', but the dataset has no column "
                f"'{key}'; columns: {', '.join(record)}"
            )
        return str(record[key])

    return _PLACEHOLDER.sub(fill, template)


def check_columns(columns: list[str], data_args: DataArguments, where: str) -> str:
    """Decide how a dataset is read: 'pretokenized', 'template' or 'text'."""
    if "input_ids" in columns:
        return "pretokenized"
    if data_args.data_formatter_template:
        missing = [
            k for k in _PLACEHOLDER.findall(data_args.data_formatter_template) if k not in columns
        ]
        if missing:
            raise ConfigError(
                f"data_formatter_template uses {', '.join('{{' + m + '}}' for m in missing)}, but "
                f"{where} has columns {', '.join(columns)}"
            )
        return "template"
    field = data_args.dataset_text_field
    if field is None:
        raise ConfigError(
            f"{where} has columns {', '.join(columns)}: set dataset_text_field to the text column, "
            "or data_formatter_template to build the text, or provide pretokenized input_ids"
        )
    if field not in columns:
        raise ConfigError(
            f"dataset_text_field '{field}' is not a column of {where}; columns: {', '.join(columns)}"
        )
    return "text"


def tokenize_dataset(dataset: Any, tokenizer: Any, data_args: DataArguments, where: str) -> Any:
    """Turn ``dataset`` into ``input_ids``/``labels`` rows, truncated to ``max_seq_length``."""
    mode = check_columns(list(dataset.column_names), data_args, where)
    max_len = data_args.max_seq_length
    if mode == "pretokenized":

        def cut(row: dict[str, Any]) -> dict[str, Any]:
            ids = list(row["input_ids"])[:max_len]
            labels = list(row["labels"])[:max_len] if row.get("labels") is not None else list(ids)
            return {"input_ids": ids, "labels": labels}

        keep = {"input_ids", "labels"}
        return dataset.map(cut, remove_columns=[c for c in dataset.column_names if c not in keep])

    response = data_args.response_template
    eos = tokenizer.eos_token if data_args.add_eos_token and tokenizer.eos_token else ""

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        if mode == "template":
            text = render_template(data_args.data_formatter_template, row)
        else:
            text = row[data_args.dataset_text_field]
        text = f"{text}{eos}"
        enc = tokenizer(
            text,
            add_special_tokens=True,
            truncation=True,
            max_length=max_len,
            return_offsets_mapping=response is not None,
        )
        ids = enc["input_ids"]
        labels = list(ids)
        if response is not None:
            at = text.find(response)
            if at < 0:
                labels = [IGNORE_INDEX] * len(ids)  # counted and reported by the caller
            else:
                start = at + len(response)
                labels = [
                    IGNORE_INDEX if end <= start else tok
                    for tok, (_, end) in zip(ids, enc["offset_mapping"])
                ]
        return {"input_ids": ids, "labels": labels}

    out = dataset.map(encode, remove_columns=list(dataset.column_names))
    if response is not None:
        empty = sum(1 for labels in out["labels"] if all(t == IGNORE_INDEX for t in labels))
        if empty == len(out):
            raise ConfigError(
                f"response_template {response!r} was not found in any example of {where}; "
                "check that it matches the text exactly (spaces and newlines included)"
            )
        if empty:
            import logging

            logging.getLogger("accel").warning(
                "%d of %d examples of %s have no tokens after response_template %r (not found or "
                "truncated); they contribute no loss",
                empty,
                len(out),
                where,
                response,
            )
    return out
