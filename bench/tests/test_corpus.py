"""The corpus builder: deterministic, split by document, deduplicated."""

from __future__ import annotations

import json

from accel_bench import corpus


def fake_sources():
    """Small real-shaped domains (the installed files are read by the full build)."""

    def python():
        for i in range(40):
            body = "".join(f"def f{i}_{j}(x):\n    return x + {j}\n\n" for j in range(30))
            yield corpus.Document("python", f"pkg==1.0:m{i}.py", body)
        yield corpus.Document("python", "pkg==1.0:copy.py", "def f0_0(x):\n    return x + 0\n")

    def prose():
        for i in range(30):
            text = " ".join(f"word{(i * 7 + k) % 50} is here." for k in range(200))
            yield corpus.Document("prose", f"pkg==1.0:doc{i}", text)
        # the same text, other whitespace: a duplicate
        yield corpus.Document("prose", "other==2.0:dup", "  word0 is here." + "\n")
        yield corpus.Document("prose", "other==2.0:dup2", "word0   is here.")

    return {"python": python, "prose": prose, "noise": lambda: corpus.noise_docs(count=20)}


def test_two_builds_give_the_same_hash_and_files(tmp_path):
    a = corpus.build(tmp_path / "a", domain_sources=fake_sources(), vocab_size=300)
    b = corpus.build(tmp_path / "b", domain_sources=fake_sources(), vocab_size=300)
    assert a.sha256 == b.sha256
    for d in ("python", "prose", "noise"):
        for s in corpus.SPLITS:
            assert (a.folder / d / f"{s}.jsonl").read_bytes() == (
                b.folder / d / f"{s}.jsonl"
            ).read_bytes()
    manifest = json.loads((a.folder / "corpus.json").read_text())
    assert manifest["sha256"] == a.sha256
    assert manifest["versions"]["pkg"] == "1.0"
    assert (a.folder / "tokenizer" / "tokenizer.json").is_file()
    assert (a.folder / "data_config.yaml").is_file()


def test_every_document_goes_whole_to_one_split(tmp_path):
    built = corpus.build(tmp_path / "c", domain_sources=fake_sources(), vocab_size=300)
    docs = list(fake_sources()["python"]())
    owner = {}
    for d in docs:
        for piece in corpus.chunk(d.text, 1000):
            owner[piece] = corpus.split_of(d.digest)
    for split in corpus.SPLITS:
        for row in corpus.load_split(built.folder, "python", split):
            assert owner[row] == split
    sizes = built.manifest["sizes"]["python"]
    assert sizes["train"]["documents"] > sizes["held_out"]["documents"] > 0


def test_duplicates_are_dropped_after_whitespace_normalization():
    kept, dropped = corpus.select({"prose": list(fake_sources()["prose"]())}, {"prose": 10**9})
    assert dropped["prose"] == 1
    assert len(kept["prose"]) == 31


def test_chunks_cut_at_line_breaks_and_keep_all_text():
    text = "".join(f"line {i}\n" for i in range(100)) + "x" * 25 + "\n"
    pieces = corpus.chunk(text, 20)
    assert "".join(pieces) == text
    assert all(len(p) <= 20 for p in pieces)
