"""Training data: load files, format, tokenize, mask the prompt, truncate.

Every example ends up as ``input_ids`` + ``labels`` (``-100`` where no loss is taken), so
the collators and plugins downstream see one shape whatever the input format was:
pretokenized rows, a text column, or records rendered by ``data_formatter_template``.

Bad data is an error that names the argument, the file and the line (or row), never a silent
change: a JSON/JSONL file is checked before the model loads (:func:`check_data_file`: syntax,
no examples, the columns the template or text field needs, null values); a null text value is an
error, not the text ``"None"`` (fill or drop such rows yourself, so what is trained is what you
chose); responses that truncation cuts off entirely are reported as such.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
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


def data_files(path: str, key: str = "training_data_path") -> tuple[str, list[Path]]:
    """The format and files of a data argument (one file, or a folder of one format)."""
    target = Path(path)
    if not target.exists():
        raise ConfigError(f"{key} '{path}' does not exist")
    files = (
        sorted(p for p in target.iterdir() if p.suffix in _SUFFIX_FORMATS)
        if target.is_dir()
        else [target]
    )
    if not files:
        raise ConfigError(f"{key} '{path}' holds no .json, .jsonl, .parquet or .arrow files")
    kinds = {_SUFFIX_FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"{key} '{path}': expected files ending in .json, .jsonl, .parquet or .arrow "
            f"(one format), got {sorted({f.suffix or '(none)' for f in files})}"
        )
    return kinds.pop(), files  # type: ignore[return-value]


def load_data_file(path: str, key: str = "training_data_path") -> Any:
    """Load one JSON/JSONL/parquet/arrow file (or a folder of one format) as a Dataset."""
    import datasets

    kind, files = data_files(path, key)
    try:
        if kind == "arrow":
            parts = [datasets.Dataset.from_file(str(f)) for f in files]
            return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as err:
        raise ConfigError(f"{key}: could not read '{path}' as {kind}: {err}") from None


def json_records(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, record)`` of a JSON array file or a JSON-lines file; a syntax error names the
    line."""
    text = file.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}:{err.lineno}: not valid JSON: {err.msg}") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{file}: item {i} is not a JSON object ({{column: value}})")
            yield i + 1, row
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{file}:{number}: not valid JSON ({err.msg}); each line of a JSON-lines file "
                "must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(f"{file}:{number}: not a JSON object ({{column: value}})")
        yield number, row


def check_data_file(path: str, key: str, data_args: DataArguments) -> None:
    """Cheap checks of a data argument before any model loads: JSON and JSONL files are read
    through (syntax, emptiness, columns, null values); parquet and arrow files as tables of
    just the columns used."""
    check_template(data_args.data_formatter_template)
    kind, files = data_files(path, key)
    where = f"{key} '{path}'"
    if kind != "json":
        for file in files:
            _check_table(file, kind, where, data_args)
        return
    used: list[str] | None = None
    for file in files:
        for number, row in json_records(file):
            if used is None:
                used = _used_columns(check_columns(list(row), data_args, where), data_args)
            for column in used:
                if row.get(column) is None:
                    raise ConfigError(
                        f"{file}:{number}: column '{column}' is "
                        f"{'null' if column in row else 'missing'} ({key}); fill it in or remove "
                        "the example"
                    )
    if used is None:
        raise ConfigError(f"{where} holds no examples (empty file)")


def _check_table(file: Path, kind: str, where: str, data_args: DataArguments) -> None:
    """A parquet or arrow file: readable, not empty, the columns used present and not null."""
    import pyarrow.compute as pc

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(file).names
            used = _used_columns(check_columns(columns, data_args, where), data_args)
            table = pq.read_table(file, columns=used)
        else:
            import datasets

            table = datasets.Dataset.from_file(str(file)).data.table  # memory-mapped
            used = _used_columns(check_columns(table.column_names, data_args, where), data_args)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{where}: could not read {file} as {kind}: {err}") from None
    if table.num_rows == 0:
        raise ConfigError(f"{where} holds no examples ({file.name} is empty)")
    for column in used:
        nulls = pc.is_null(table.column(column))
        if pc.any(nulls).as_py():
            row = pc.index(nulls, True).as_py()
            raise ConfigError(
                f"{file}, row {row}: column '{column}' is null ({where.split()[0]}); fill it in "
                "or remove the example"
            )


def _used_columns(mode: str, data_args: DataArguments) -> list[str]:
    if mode == "template":
        return _PLACEHOLDER.findall(data_args.data_formatter_template or "")
    if mode == "text":
        return [data_args.dataset_text_field or ""]
    return ["input_ids"]


def check_template(template: str | None) -> None:
    """A template without ``{{column}}`` would make every example the same literal text."""
    if template is not None and not _PLACEHOLDER.search(template):
        raise ConfigError(
            f"data_formatter_template {template!r} has no {{{{column}}}} placeholder, so every "
            "example would be the same text; name the columns, e.g. "
            "'### Input: {{input}}\\n### Response: {{output}}'"
        )


def render_template(template: str, record: dict[str, Any], where: str = "the dataset") -> str:
    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in record:
            raise ConfigError(
                f"data_formatter_template uses '{{{{{key}}}}}', but {where} has no column "
                f"'{key}'; columns: {', '.join(record)}"
            )
        if record[key] is None:
            raise ConfigError(f"{where}: column '{key}' is null; fill it in or remove the example")
        return str(record[key])

    return _PLACEHOLDER.sub(fill, template)


def check_columns(columns: list[str], data_args: DataArguments, where: str) -> str:
    """Decide how a dataset is read: 'pretokenized', 'template' or 'text'."""
    if "input_ids" in columns:
        return "pretokenized"
    if data_args.data_formatter_template:
        check_template(data_args.data_formatter_template)
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

        def cut(row: dict[str, Any], index: int) -> dict[str, Any]:
            if row["input_ids"] is None:
                raise ConfigError(f"{where}: row {index}: input_ids is null")
            ids = list(row["input_ids"])[:max_len]
            labels = list(row["labels"])[:max_len] if row.get("labels") is not None else list(ids)
            return {"input_ids": ids, "labels": labels}

        keep = {"input_ids", "labels"}
        return dataset.map(
            cut,
            with_indices=True,
            remove_columns=[c for c in dataset.column_names if c not in keep],
        )

    response = data_args.response_template
    eos = tokenizer.eos_token if data_args.add_eos_token and tokenizer.eos_token else ""

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        if mode == "template":
            text = render_template(data_args.data_formatter_template, row, f"{where}, row {index}")
        else:
            text = row[data_args.dataset_text_field]
            if text is None:
                raise ConfigError(
                    f"{where}, row {index}: column '{data_args.dataset_text_field}' is null; "
                    "fill it in or remove the example"
                )
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
        cut_at = 0  # tokens needed before the response when truncation removed all of it
        if response is not None:
            at = text.find(response)
            if at < 0:
                labels = [IGNORE_INDEX] * len(ids)
                cut_at = -1
            else:
                start = at + len(response)
                labels = [
                    IGNORE_INDEX if end <= start else tok
                    for tok, (_, end) in zip(ids, enc["offset_mapping"])
                ]
                if all(t == IGNORE_INDEX for t in labels):
                    cut_at = (
                        len(tokenizer(text[:start], add_special_tokens=True)["input_ids"])
                        if len(ids) >= max_len
                        else EMPTY_RESPONSE
                    )
        return {"input_ids": ids, "labels": labels, _CUT: cut_at}

    out = dataset.map(encode, with_indices=True, remove_columns=list(dataset.column_names))
    cuts = out[_CUT]
    out = out.remove_columns(_CUT)
    if response is not None:
        _report_responses(cuts, where, response, max_len)
    return out


_CUT = "_accel_response_cut"
EMPTY_RESPONSE = -2


def _report_responses(cuts: list[int], where: str, response: str, max_len: int) -> None:
    """Examples without response tokens: an error when that is every example, else a warning
    that says how many lack the template, lost the response to truncation, or have none."""
    missing = sum(1 for c in cuts if c == -1)
    empty = sum(1 for c in cuts if c == EMPTY_RESPONSE)
    truncated = [c for c in cuts if c > 0]
    if not missing and not truncated and not empty:
        return
    parts = []
    if missing:
        parts.append(f"{missing} do not contain response_template {response!r}")
    if truncated:
        parts.append(
            f"{len(truncated)} lose the whole response to truncation at max_seq_length "
            f"{max_len} (their prompts take {min(truncated)} to {max(truncated)} tokens; raise "
            f"max_seq_length above {min(truncated)})"
        )
    if empty:
        parts.append(f"{empty} have nothing after response_template {response!r}")
    if missing + len(truncated) + empty < len(cuts):
        import logging

        logging.getLogger("accel").warning(
            "%d of %d examples of %s contribute no loss: %s",
            missing + len(truncated) + empty,
            len(cuts),
            where,
            "; ".join(parts),
        )
    elif missing == len(cuts):
        raise ConfigError(
            f"response_template {response!r} was not found in any example of {where}; "
            "check that it matches the text exactly (spaces and newlines included)"
        )
    elif len(truncated) == len(cuts):
        raise ConfigError(
            f"every example of {where} loses its whole response to truncation at "
            f"max_seq_length {max_len} (the prompts take {min(truncated)} to "
            f"{max(truncated)} tokens); raise max_seq_length above {min(truncated)}"
        )
    else:
        raise ConfigError(f"no example of {where} has response tokens: {'; '.join(parts)}")
