"""The core and its commands know no plugin by name: they read what plugins declare.

Every Python file under ``core/`` and ``cli/`` is parsed; identifiers and string constants
(docstrings aside: documentation may name the first-party plugins) must not contain a
first-party plugin's name. What the core must know of the first-party packages to name the
install command of a missing one is data: the ``CATALOG`` table of ``core/registry.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAMES = (
    "auto_gptq",
    "bitsandbytes",
    "fused_ops",
    "odm",
    "scattermoe",
    "multipack",
    "padding_free",
)
NAME = re.compile(rf"(?<![A-Za-z0-9])({'|'.join(PLUGIN_NAMES)})(?![A-Za-z0-9])")
#: the module whose ``CATALOG`` table names the first-party packages (data, not logic)
CATALOG_FILE = "core/registry.py"
#: (file, text) of third-party names that happen to equal a plugin name
ALLOWED = {
    # the bitsandbytes library's own logger, whose CPU-fallback message is filtered
    ("core/quiet.py", "bitsandbytes.backends.cpu.ops"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _catalog(tree: ast.AST) -> set[int]:
    """The nodes of the first-party catalog (``CATALOG = (...)``): a table of data that names
    each first-party package, its paths and flags, for the install hint of a missing one."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "CATALOG" for t in targets):
                ids.update(id(n) for n in ast.walk(node))
    return ids


def _texts(tree: ast.AST, where: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every identifier and string constant that is not a docstring."""
    skip = _docstrings(tree) | (_catalog(tree) if where == CATALOG_FILE else set())
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((line, node.value))
        elif isinstance(node, ast.Name):
            found.append((line, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((line, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((line, node.name))
        elif isinstance(node, ast.arg) or isinstance(node, ast.keyword) and node.arg:
            found.append((line, node.arg))
        elif isinstance(node, ast.alias):
            found.append((line, node.name))
            if node.asname:
                found.append((line, node.asname))
        elif isinstance(node, (ast.ImportFrom)) and node.module:
            found.append((line, node.module))
    return found


def plugin_names_in(source: str, where: str) -> list[str]:
    hits = []
    for line, text in _texts(ast.parse(source), where):
        if (where, text) in ALLOWED:
            continue
        for match in NAME.finditer(text):
            hits.append(f"{where}:{line}: '{match.group(1)}' in {text!r}")
    return hits


def _sources() -> list[Path]:
    return sorted(p for folder in ("core", "cli") for p in (ROOT / folder).rglob("*.py"))


def test_the_core_and_cli_name_no_plugin():
    assert len(_sources()) > 30
    hits = []
    for path in _sources():
        where = path.relative_to(ROOT).as_posix()
        hits += plugin_names_in(path.read_text(encoding="utf-8"), where)
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize(
    "source",
    [
        'x = "odm"',
        "if name == 'training.odm.odm': pass",
        "framework.get('fused_ops')",
        "def check_bitsandbytes(): pass",
        "run(padding_free=True)",
        "from accel_x import multipack",
        'f"--auto_gptq {x}"',
    ],
)
def test_the_check_finds_a_plugin_name(source):
    assert plugin_names_in(source, "x.py")


def test_the_check_skips_docstrings_and_longer_words():
    source = '"""Mentions odm and fused_ops."""\ndef f():\n    """For auto_gptq."""\n    odmx = 1\n'
    assert plugin_names_in(source, "x.py") == []


def test_the_catalog_table_alone_is_exempt():
    source = 'CATALOG = (("odm", "training.odm.odm"),)\nx = "odm"\n'
    assert plugin_names_in(source, CATALOG_FILE) == [f"{CATALOG_FILE}:2: 'odm' in 'odm'"]
    assert len(plugin_names_in(source, "core/other.py")) == 4  # training.odm.odm: twice
