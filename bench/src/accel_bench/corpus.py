"""A real multi-domain text corpus, built from files every installation of accel already has.

Domains (documents are whole files or whole entries, never lines):

- ``python``: source files of the Python standard library;
- ``c_headers``: the C/C++ headers the torch wheel ships (``torch/include``);
- ``prose``: English prose: the standard library's documentation topics
  (``pydoc_data.topics``) and the long descriptions in the ``METADATA`` of installed packages;
- ``licenses``: the licence files in the installed packages' ``.dist-info`` folders;
- ``config``: JSON, YAML, TOML, INI/cfg files and ``entry_points.txt`` of the installed
  packages and the standard library;
- ``noise``: random printable characters in random-length words (a generated control: it
  cannot be learnt, so an online mixer must learn to leave it).

Documents are deduplicated (exact, after whitespace normalization; across domains too), each
domain takes documents in the order of their content hash up to its character budget, and
every document goes whole to one split by its hash: train (80%), validation (10%) or held-out
(10%). Each document is then cut into examples of at most ``chunk_chars`` characters at line
breaks. A byte-level BPE tokenizer (``tokenizers``) is trained on the train split.

Nothing depends on file system order or time: the same package versions give the same files,
and ``corpus.json`` records them with the sizes per domain and split and a sha256 over every
example and the tokenizer (``corpus sha256 <hex>``). The folder holds ``<domain>/<split>.jsonl``
(``{"text": ...}`` rows), ``tokenizer/`` (loadable with ``AutoTokenizer``), ``corpus.json``
and ``data_config.yaml`` (a ``--data_config`` over the train files, static uniform mixing).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

BUILDER_VERSION = "1"
DOMAINS = ("python", "c_headers", "prose", "licenses", "config", "noise")
REAL_DOMAINS = DOMAINS[:-1]
SPLITS = ("train", "validation", "held_out")
#: characters of documents each domain takes at most (before the split)
BUDGET = {
    "python": 3_000_000,
    "c_headers": 3_000_000,
    "prose": 3_000_000,
    "licenses": 1_000_000,
    "config": 1_000_000,
    "noise": 1_000_000,
}
MAX_DOC_CHARS = 200_000  # larger files are generated or data, not text written by people
CONFIG_SUFFIXES = (".json", ".yaml", ".yml", ".toml", ".cfg", ".ini")
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


@dataclass
class Document:
    domain: str
    source: str  # where it came from: "<package>==<version>:<path>" or "python <ver>:<path>"
    text: str
    digest: str = field(default="")

    def __post_init__(self) -> None:
        normalized = " ".join(self.text.split())
        self.digest = hashlib.sha256(normalized.encode()).hexdigest()


def split_of(digest: str) -> str:
    """The split a document belongs to, from its content hash alone."""
    bucket = int(digest[:8], 16) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "held_out"


def chunk(text: str, chunk_chars: int) -> list[str]:
    """Cut one document into examples of at most ``chunk_chars`` characters at line breaks
    (a longer line is cut where it reaches the limit)."""
    out: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            if current:
                out.append(current)
                current = ""
            out.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars and current:
            out.append(current)
            current = ""
        current += line
    if current.strip():
        out.append(current)
    return [c for c in out if c.strip()]


# -- sources ---------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_DOC_CHARS:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def _owners() -> dict[Path, str]:
    """Each installed distribution's folder of files, mapped to ``name==version``."""
    owners: dict[Path, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        for f in dist.files or ():
            top = f.parts[0] if f.parts else ""
            if top and not top.endswith((".dist-info", ".egg-info", ".pth")) and top != "..":
                owners.setdefault(Path(dist.locate_file(top)), f"{name}=={dist.version}")
    return owners


def _python_label(path: Path, stdlib: Path) -> str:
    return f"python {sys.version.split()[0]}:{path.relative_to(stdlib).as_posix()}"


def _stdlib_files(stdlib: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    skip = {"site-packages", "__pycache__", "idlelib", "lib2to3", "test", "tests"}
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(suffixes):
                yield Path(root) / name


def python_docs(stdlib: Path) -> Iterator[Document]:
    for path in _stdlib_files(stdlib, (".py",)):
        text = _read(path)
        if text:
            yield Document("python", _python_label(path, stdlib), text)


def header_docs(site: Path, owners: dict[Path, str]) -> Iterator[Document]:
    include = site / "torch" / "include"
    label = owners.get(site / "torch", "torch")
    for root, dirs, files in os.walk(include):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".h", ".hpp", ".cuh")):
                path = Path(root) / name
                text = _read(path)
                if text:
                    yield Document("c_headers", f"{label}:{path.relative_to(site)}", text)


def prose_docs() -> Iterator[Document]:
    from pydoc_data import topics

    label = f"python {sys.version.split()[0]}:pydoc_data.topics"
    for key in sorted(topics.topics):
        yield Document("prose", f"{label}[{key}]", topics.topics[key])
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if isinstance(body, str) and len(body.split()) >= 50:
            yield Document("prose", f"{dist.metadata['Name']}=={dist.version}:METADATA", body)


def license_docs() -> Iterator[Document]:
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        for f in sorted(dist.files or (), key=str):
            name = f.name.upper()
            if ".dist-info" in str(f) and name.startswith(("LICEN", "COPYING", "NOTICE")):
                text = _read(Path(dist.locate_file(f)))
                if text:
                    yield Document("licenses", f"{dist.metadata['Name']}=={dist.version}:{f}", text)


def config_docs(site: Path, stdlib: Path, owners: dict[Path, str]) -> Iterator[Document]:
    for root, dirs, files in os.walk(site):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(CONFIG_SUFFIXES) or name == "entry_points.txt":
                path = Path(root) / name
                text = _read(path)
                if not text:
                    continue
                rel = path.relative_to(site)
                owner = owners.get(site / rel.parts[0])
                if owner is None and rel.parts[0].endswith(".dist-info"):
                    owner = rel.parts[0].removesuffix(".dist-info").replace("-", "==", 1)
                yield Document("config", f"{owner or '?'}:{rel.as_posix()}", text)
    for path in _stdlib_files(stdlib, CONFIG_SUFFIXES):
        text = _read(path)
        if text:
            yield Document("config", _python_label(path, stdlib), text)


def noise_docs(seed: int = 0, count: int = 400) -> Iterator[Document]:
    """Random printable characters in words of random length: no structure to learn."""
    rng = random.Random(f"accel-corpus-noise-{seed}")
    alphabet = [chr(c) for c in range(33, 127)]
    for i in range(count):
        lines = []
        for _ in range(rng.randint(10, 60)):
            words = ["".join(rng.choices(alphabet, k=rng.randint(1, 9))) for _ in range(8)]
            lines.append(" ".join(words))
        yield Document("noise", f"generated:noise-{seed}-{i}", "\n".join(lines) + "\n")


def sources(site: Path | None = None, stdlib: Path | None = None) -> dict[str, Callable]:
    site = site or Path(sysconfig.get_paths()["purelib"])
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    owners = _owners()
    return {
        "python": lambda: python_docs(stdlib),
        "c_headers": lambda: header_docs(site, owners),
        "prose": prose_docs,
        "licenses": license_docs,
        "config": lambda: config_docs(site, stdlib, owners),
        "noise": noise_docs,
    }


# -- the build -------------------------------------------------------------------------------


def select(
    docs_by_domain: dict[str, list[Document]], budget: dict[str, int]
) -> tuple[dict[str, list[Document]], dict[str, int]]:
    """Deduplicate (first domain in ``DOMAINS`` order wins a document found twice) and take
    each domain's documents in content-hash order up to its budget. Returns the kept
    documents and, per domain, how many duplicates were dropped."""
    seen: set[str] = set()
    kept: dict[str, list[Document]] = {}
    dropped: dict[str, int] = {}
    for domain in docs_by_domain:
        unique: dict[str, Document] = {}
        dropped[domain] = 0
        for doc in docs_by_domain[domain]:
            if doc.digest in seen or doc.digest in unique:
                dropped[domain] += 1
                continue
            unique[doc.digest] = doc
        seen.update(unique)
        chosen, total = [], 0
        for digest in sorted(unique):
            doc = unique[digest]
            if total + len(doc.text) > budget[domain] and chosen:
                continue
            chosen.append(doc)
            total += len(doc.text)
        kept[domain] = sorted(chosen, key=lambda d: d.digest)
    return kept, dropped


@dataclass
class Built:
    folder: Path
    sha256: str
    manifest: dict


def build(
    folder: str | Path,
    *,
    scale: float = 1.0,
    chunk_chars: int = 1000,
    vocab_size: int = 4096,
    domain_sources: dict[str, Callable] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Built:
    """Build the corpus into ``folder`` (replaced whole, atomically: a temporary folder beside
    it is renamed into place). ``scale`` multiplies every domain's budget (a small cut for
    tests)."""
    start = time.monotonic()
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    found = domain_sources or sources()
    budget = {d: max(1, int(BUDGET[d] * scale)) for d in found}
    collected = {}
    for domain in found:
        collected[domain] = list(found[domain]())
        log(f"{domain}: {len(collected[domain])} documents found")
    kept, dropped = select(collected, budget)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        digest = hashlib.sha256(f"accel-corpus {BUILDER_VERSION}\n".encode())
        stats: dict[str, dict] = {}
        train_texts: list[str] = []
        for domain, docs in kept.items():
            (tmp / domain).mkdir()
            stats[domain] = {"duplicates_dropped": dropped[domain]}
            for split in SPLITS:
                rows = [
                    c
                    for d in docs
                    if split_of(d.digest) == split
                    for c in chunk(d.text, chunk_chars)
                ]
                in_split = [d for d in docs if split_of(d.digest) == split]
                with open(tmp / domain / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                    for row in rows:
                        line = json.dumps({"text": row}, ensure_ascii=False)
                        fh.write(line + "\n")
                        digest.update(f"{domain}/{split}\n{line}\n".encode())
                stats[domain][split] = {
                    "documents": len(in_split),
                    "examples": len(rows),
                    "chars": sum(len(r) for r in rows),
                }
                if split == "train":
                    train_texts += rows
            log(
                f"{domain}: {len(docs)} documents kept, {dropped[domain]} duplicates dropped, "
                f"{sum(stats[domain][s]['chars'] for s in SPLITS)} characters"
            )
        tok_json = train_tokenizer(train_texts, vocab_size, tmp / "tokenizer")
        digest.update(tok_json.encode())
        sha = digest.hexdigest()
        manifest = {
            "builder_version": BUILDER_VERSION,
            "sha256": sha,
            "chunk_chars": chunk_chars,
            "vocab_size": vocab_size,
            "scale": scale,
            "domains": list(kept),
            "real_domains": [d for d in kept if d != "noise"],
            "sizes": stats,
            "versions": versions(kept),
            "sources": {
                d: sorted({doc.source.split(":", 1)[0] for doc in docs}) for d, docs in kept.items()
            },
            "build_seconds": round(time.monotonic() - start, 1),
        }
        (tmp / "corpus.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        write_data_config(tmp, list(kept), target)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Built(target, sha, manifest)


def versions(kept: dict[str, list[Document]]) -> dict[str, str]:
    """The versions of Python and of every package a document came from."""
    out = {"python": sys.version.split()[0]}
    import tokenizers

    out["tokenizers"] = tokenizers.__version__
    for docs in kept.values():
        for doc in docs:
            head = doc.source.split(":", 1)[0]
            if "==" in head:
                name, version = head.split("==", 1)
                out[name] = version
    return dict(sorted(out.items()))


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> str:
    """A byte-level BPE tokenizer trained on ``texts``, saved in ``folder`` for
    ``AutoTokenizer.from_pretrained``; returns its ``tokenizer.json`` text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.save_pretrained(str(folder))
    return (folder / "tokenizer.json").read_text()


def write_data_config(folder: Path, domains: list[str], final: Path) -> Path:
    """``data_config.yaml``: every domain's train file, static uniform mixing (change
    ``type`` to ``odm`` for online mixing); paths relative to the config file."""
    import yaml

    del final  # paths are relative to the config file, so the folder can move
    config = {
        "dataprocessor": {"type": "default", "seed": 42},
        "datasets": [
            {
                "name": d,
                "data_paths": [f"{d}/train.jsonl"],
                "sampling": round(1 / len(domains), 6),
                "dataset_text_field": "text",
            }
            for d in domains
        ],
    }
    path = folder / "data_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_split(folder: str | Path, domain: str, split: str) -> list[str]:
    """The example texts of one domain's split."""
    path = Path(folder) / domain / f"{split}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def size_table(manifest: dict) -> str:
    """A markdown table of the documents, examples and characters per domain and split."""
    lines = [
        "| domain | "
        + " | ".join(f"{s} docs / examples / chars" for s in SPLITS)
        + " | duplicates dropped |",
        "|---|" + "---:|" * (len(SPLITS) + 1),
    ]
    for domain in manifest["domains"]:
        s = manifest["sizes"][domain]
        cells = [f"{s[x]['documents']} / {s[x]['examples']} / {s[x]['chars']}" for x in SPLITS]
        lines.append(f"| {domain} | " + " | ".join(cells) + f" | {s['duplicates_dropped']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m accel_bench.corpus <folder>``: the same as ``accel corpus <folder>``."""
    from accel.cli.main import main as accel_main

    return accel_main(["corpus", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
