"""accel.support: the entries of a plugin's support table and the generated README block."""

from __future__ import annotations

import pytest

from accel.support import GeneratedBlock, Supported, Unsupported, cell

BLOCK = GeneratedBlock("demo-table", "python -m demo")


def test_cells_say_yes_with_the_note_or_no_with_the_reason():
    assert cell(Supported()) == ("yes", "")
    assert cell(Supported("dense only")) == ("yes", "dense only")
    assert cell(Unsupported("no sdpa")) == ("no", "no sdpa")


def test_write_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BLOCK.start}\nold\n{BLOCK.end}\noutro\n")
    assert BLOCK.main(lambda: "| new |\n", ["--write", str(readme)]) == 0
    text = readme.read_text()
    assert text == f"intro\n{BLOCK.start}\n| new |\n{BLOCK.end}\noutro\n"
    assert BLOCK.current(text) == "| new |\n"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary left behind


def test_missing_markers_are_named_and_the_file_is_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="demo-table:start"):
        BLOCK.write(readme, "| new |\n")
    assert readme.read_text() == "no markers here\n"


def test_main_prints_the_table(capsys):
    assert BLOCK.main(lambda: "| t |\n", []) == 0
    assert capsys.readouterr().out == "| t |\n"
