"""Support-table entries and generated README blocks, shared by every plugin's support table.

A plugin's per-architecture table maps a ``config.model_type`` to :class:`Supported` (tested
at model level) or :class:`Unsupported` with the reason users see. A :class:`GeneratedBlock`
keeps a README table equal to what the code renders from that table: ``write`` replaces the
text between two markers (temporary file, then rename), ``current`` reads it back for the
drift test.

Pure data and text: importing it loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GeneratedBlock", "Support", "Supported", "Unsupported"]


@dataclass(frozen=True)
class Supported:
    """The feature works on this architecture (a model-level test says so)."""

    note: str = ""
    supported = True


@dataclass(frozen=True)
class Unsupported:
    """The feature is refused on this architecture, and why (shown to the user)."""

    reason: str
    supported = False


Support = Supported | Unsupported


def cell(support: Support) -> tuple[str, str]:
    """``("yes"|"no", note or reason)`` for a README table cell."""
    return ("yes", support.note) if support.supported else ("no", support.reason)


@dataclass(frozen=True)
class GeneratedBlock:
    """A README block between ``<!-- {name}:start ... -->`` and ``<!-- {name}:end -->``."""

    name: str
    #: the command that regenerates it, written into the start marker
    command: str

    @property
    def start(self) -> str:
        return f"<!-- {self.name}:start (generated: {self.command}) -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def _check(self, text: str) -> None:
        if self.start not in text or self.end not in text:
            raise ValueError(f"the markers {self.start!r} and {self.end!r} are missing")

    def replace(self, text: str, table: str) -> str:
        """``text`` with the block between the markers replaced by ``table``."""
        self._check(text)
        head, rest = text.split(self.start, 1)
        _, tail = rest.split(self.end, 1)
        return f"{head}{self.start}\n{table}{self.end}{tail}"

    def current(self, text: str) -> str:
        """The block now in ``text``."""
        self._check(text)
        return text.split(self.start, 1)[1].split(self.end, 1)[0].lstrip("\n")

    def write(self, path: Path, table: str) -> None:
        """Replace the block in ``path`` in place, atomically."""
        text = self.replace(path.read_text(), table)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def main(self, render: Callable[[], str], argv: list[str] | None = None) -> int:
        """``python -m <module>`` prints the table; ``--write README.md`` updates the file."""
        parser = argparse.ArgumentParser(description=f"print or write the {self.name} block")
        parser.add_argument("--write", type=Path, help="README to update in place")
        args = parser.parse_args(argv)
        if args.write is None:
            sys.stdout.write(render())
        else:
            self.write(args.write, render())
        return 0
