"""Artificial datasets of ``accel bench``: the reference's ids and shapes, generated locally.

The ids follow ado's SFTTrainer actuator (``ado-sfttrainer-experiments.md``):

- ``news-chars-<N>-entries-<M>``: M entries, each ``N`` characters of text, a 127-character
  prompt (ending in the response template ``\\n### Response:``), then ``N`` more characters
  ("samples of 512 + 127 (prompt) + 512 characters" for ``news-chars-512-entries-4096``);
- ``news-tokens-<N>plus-entries-<M>``: M entries of at least ``N`` tokens each (counted with
  the bench tokenizer, which every model of :mod:`accel_bench.models` uses);
- ``news-longtail-<N>-entries-<M>`` (accel's addition, for padding-free and multipack): the two
  text parts are log-normally distributed in length up to ``N`` characters each, so a batch
  mixes a few long entries with many short ones, as real instruction data does;
- ``news-mix-<K>-entries-<M>`` (accel's addition, for online data mixing): K datasets of M
  entries each, dataset ``i`` (``part<i>``, i = 0..K-1) with text parts of
  ``MIX_BASE_CHARS * 2**i`` characters drawn from its own slice of the vocabulary, so the
  parts differ in length and content (and in loss). The harness turns the id into a
  ``--data_config`` (see :func:`write_data_config`): ``dataprocessor.type: odm`` with the
  ``odm`` parameter, ``type: default`` (every part once per epoch) without it.

The reference's ids (``news-chars-512-entries-4096``, ``news-chars-1024-entries-4096``,
``news-chars-2048-entries-4096``, ``news-tokens-16384plus-entries-4096``) are the same
patterns; smaller ones (``news-chars-128-entries-256``) suit a CPU. Every entry is one
``{"output": text}`` row (the reference trains with ``--dataset_text_field output``).

Generation is deterministic by seed (same id and seed: byte-identical file), cached under
``$ACCEL_CACHE/bench/datasets`` (default ``~/.cache/accel``) and written atomically (a
temporary file renamed into place), so concurrent or interrupted runs never see half a file.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from accel.errors import ConfigError

GENERATOR_VERSION = "1"
RESPONSE_TEMPLATE = "\n### Response:"
_INSTRUCTION = (
    "\n\n### Instruction:\nRewrite the news text above as a short news report of the same length."
)
#: exactly 127 characters, as in the reference ("512 + 127 (prompt) + 512 characters")
PROMPT = (_INSTRUCTION + " " * 127)[: 126 - len(RESPONSE_TEMPLATE)] + RESPONSE_TEMPLATE + " "
assert len(PROMPT) == 127, len(PROMPT)

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0-3, as accel.testing.SPECIAL_IDS
PUNCTUATION = (".", ",")
PROMPT_WORDS = tuple(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", PROMPT)))
_SYLLABLES = (
    "ba",
    "ce",
    "di",
    "fo",
    "gu",
    "ha",
    "je",
    "ki",
    "lo",
    "mu",
    "na",
    "pe",
    "ri",
    "so",
    "tu",
    "va",
    "we",
    "xi",
    "yo",
    "za",
    "st",
    "tr",
    "pl",
    "cr",
)


def _news_words() -> tuple[str, ...]:
    """A fixed vocabulary of 230 pseudo-words of 1 to 9 letters (every length present, so a
    text can end exactly on its character budget without cutting a word)."""
    rng = random.Random(1234)
    words: dict[str, None] = {w: None for w in ("a", "an", "in", "on", "to", "of", "is", "it")}
    while len(words) < 230:
        length = rng.randint(1, 9)
        word = "".join(rng.choice(_SYLLABLES) for _ in range(math.ceil(length / 2)))[:length]
        words[word] = None
    for n in range(1, 10):  # one word of every length
        words.setdefault("n" * n, None)
    return tuple(words)


NEWS_WORDS = _news_words()
_BY_LENGTH: dict[int, list[str]] = {}
for _w in NEWS_WORDS:
    _BY_LENGTH.setdefault(len(_w), []).append(_w)
MAX_WORD = max(_BY_LENGTH)


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset id: ``kind`` is chars, tokens or longtail; ``size`` the N of the id."""

    dataset_id: str
    kind: str
    size: int
    entries: int


_PATTERNS = (
    ("mix", re.compile(r"news-mix-(\d+)-entries-(\d+)")),
    ("chars", re.compile(r"news-chars-(\d+)-entries-(\d+)")),
    ("tokens", re.compile(r"news-tokens-(\d+)plus-entries-(\d+)")),
    ("longtail", re.compile(r"news-longtail-(\d+)-entries-(\d+)")),
)
REFERENCE_IDS = (
    "news-chars-512-entries-4096",
    "news-chars-1024-entries-4096",
    "news-chars-2048-entries-4096",
    "news-tokens-16384plus-entries-4096",
)


def parse_dataset_id(dataset_id: str) -> DatasetSpec:
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(str(dataset_id))
        if match:
            size, entries = int(match.group(1)), int(match.group(2))
            if size < 1 or entries < 1 or (kind == "mix" and not 2 <= size <= MIX_MAX_PARTS):
                break
            return DatasetSpec(str(dataset_id), kind, size, entries)
    raise ConfigError(
        f"dataset_id {dataset_id!r} is not a bench dataset; use news-chars-<N>-entries-<M>, "
        f"news-tokens-<N>plus-entries-<M>, news-longtail-<N>-entries-<M> or news-mix-<K>-entries-<M> "
        f"(K = 2..{MIX_MAX_PARTS} datasets; the reference's: "
        f"{', '.join(REFERENCE_IDS)})"
    )


MIX_BASE_CHARS = 48
MIX_MAX_PARTS = 6


def is_mixture(dataset_id: str) -> bool:
    """Whether ``dataset_id`` names several datasets (``news-mix-<K>-entries-<M>``)."""
    return parse_dataset_id(dataset_id).kind == "mix"


def mixture_parts(spec: DatasetSpec) -> list[tuple[str, int, tuple[str, ...]]]:
    """Per part of a mixture: its name, its text-part length in characters, its vocabulary
    (a disjoint slice of the news words, so the parts' contents differ)."""
    k = spec.size
    chunk = len(NEWS_WORDS) // k
    return [
        (f"part{i}", MIX_BASE_CHARS * 2**i, NEWS_WORDS[i * chunk : (i + 1) * chunk])
        for i in range(k)
    ]


def tokens_of(text: str) -> list[str]:
    """The bench tokenizer's pre-tokenization (whitespace, then words and punctuation runs)."""
    return re.findall(r"\w+|[^\w\s]+", text)


def _text_of_chars(rng: random.Random, chars: int, vocabulary: tuple[str, ...] = NEWS_WORDS) -> str:
    """Words and sentence punctuation, exactly ``chars`` characters long (the words from
    ``vocabulary``, the last one from every length so the budget is met exactly)."""
    parts: list[str] = []
    length = 0
    while length < chars:
        left = chars - length - (1 if parts else 0)  # a space before every word but the first
        if left <= 0:  # only the space would fit: end the sentence instead
            parts[-1] += "."
            length += 1
            continue
        word = rng.choice(vocabulary) if left > MAX_WORD else rng.choice(_BY_LENGTH[left])
        if left > MAX_WORD + 2 and rng.random() < 0.08:
            word += rng.choice(PUNCTUATION)
        parts.append(word)
        length += len(word) + (1 if len(parts) > 1 else 0)
    return " ".join(parts)


def _text_of_tokens(rng: random.Random, tokens: int) -> str:
    words: list[str] = []
    count = 0
    while count < tokens:
        word = rng.choice(NEWS_WORDS)
        count += 1
        if rng.random() < 0.08 and count < tokens:
            word += rng.choice(PUNCTUATION)
            count += 1
        words.append(word)
    return " ".join(words)


def _longtail_chars(rng: random.Random, limit: int) -> int:
    """Log-normal lengths (median ~limit/8) clipped to [8, limit]: a long tail of long ones."""
    value = rng.lognormvariate(math.log(max(limit / 8, 8)), 0.9)
    return int(min(max(value, 8), limit))


def generate_part(spec: DatasetSpec, part: int, seed: int = 0) -> list[dict[str, str]]:
    """The entries of part ``part`` of the mixture ``spec`` (deterministic by ``seed``)."""
    name, chars, vocabulary = mixture_parts(spec)[part]
    rng = random.Random(f"{spec.dataset_id}/{name}/{seed}")
    return [
        {
            "output": _text_of_chars(rng, chars, vocabulary)
            + PROMPT
            + _text_of_chars(rng, chars, vocabulary)
        }
        for _ in range(spec.entries)
    ]


def generate_rows(spec: DatasetSpec, seed: int = 0) -> list[dict[str, str]]:
    """The entries of ``spec`` (deterministic by ``seed``); a mixture's parts one after the
    other."""
    if spec.kind == "mix":
        return [row for i in range(spec.size) for row in generate_part(spec, i, seed)]
    rng = random.Random(f"{spec.dataset_id}/{seed}")
    rows = []
    prompt_tokens = len(tokens_of(PROMPT))
    for _ in range(spec.entries):
        if spec.kind == "chars":
            first, second = _text_of_chars(rng, spec.size), _text_of_chars(rng, spec.size)
        elif spec.kind == "longtail":
            first = _text_of_chars(rng, _longtail_chars(rng, spec.size))
            second = _text_of_chars(rng, _longtail_chars(rng, spec.size))
        else:  # tokens: the prompt's tokens count, +1 for the tokenizer's <s>
            body = max(spec.size - prompt_tokens - 1, 2)
            first = _text_of_tokens(rng, body // 2)
            second = _text_of_tokens(rng, body - body // 2)
        rows.append({"output": first + PROMPT + second})
    return rows


def cache_dir() -> Path:
    base = os.environ.get("ACCEL_CACHE") or Path.home() / ".cache" / "accel"
    return Path(base) / "bench" / "datasets"


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dataset_path(dataset_id: str, seed: int = 0, root: Path | None = None) -> Path:
    """The JSONL file of ``dataset_id``, generated on first use (atomically) and cached. For
    a mixture: its first part (see :func:`mixture_paths` for all of them)."""
    spec = parse_dataset_id(dataset_id)
    if spec.kind == "mix":
        return mixture_paths(dataset_id, seed, root)[0][1]
    root = Path(root) if root is not None else cache_dir()
    path = root / f"v{GENERATOR_VERSION}" / f"{spec.dataset_id}-seed{seed}.jsonl"
    if not path.is_file():
        _write_rows(path, generate_rows(spec, seed))
    return path


def mixture_paths(
    dataset_id: str, seed: int = 0, root: Path | None = None
) -> list[tuple[str, Path]]:
    """``(name, JSONL file)`` of every part of the mixture ``dataset_id``, each generated on
    first use (atomically) and cached."""
    spec = parse_dataset_id(dataset_id)
    if spec.kind != "mix":
        raise ConfigError(f"dataset_id {dataset_id!r} is not a mixture (news-mix-<K>-entries-<M>)")
    root = Path(root) if root is not None else cache_dir()
    folder = root / f"v{GENERATOR_VERSION}" / f"{spec.dataset_id}-seed{seed}"
    out = []
    for i, (name, _, _) in enumerate(mixture_parts(spec)):
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            _write_rows(path, generate_part(spec, i, seed))
        out.append((name, path))
    return out


def write_data_config(
    dataset_id: str,
    path: Path,
    odm: str | None,
    seed: int = 0,
    data_seed: int = 42,
    root: Path | None = None,
) -> Path:
    """Write (atomically) the ``--data_config`` of a mixture: its parts as the datasets, with
    ``dataprocessor.type: odm`` and ``reward_type: odm`` when ``odm`` is given, else
    ``type: default`` without weights (every part once per epoch: the same examples, so the
    run without odm is the baseline of the run with it)."""
    import yaml

    processor: dict[str, object] = {"type": "odm" if odm else "default", "seed": data_seed}
    if odm:
        processor["odm"] = {"reward_type": odm}
    config = {
        "dataprocessor": processor,
        "datasets": [
            {"name": name, "data_paths": [str(p.resolve())]}
            for name, p in mixture_paths(dataset_id, seed, root)
        ],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(config, fh, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def reference_token_counts(path: str | Path, tokenizer: object, max_seq_length: int) -> list[int]:
    """Per entry, the reference's dataset token count:
    ``min(len(tokens(entry["output"])), tokenizer.model_max_length, max_seq_length)``."""
    limit = min(int(getattr(tokenizer, "model_max_length", max_seq_length)), max_seq_length)
    counts = []
    with open(path) as fh:
        for line in fh:
            ids = tokenizer(json.loads(line)["output"])["input_ids"]  # type: ignore[operator]
            counts.append(min(len(ids), limit))
    return counts
