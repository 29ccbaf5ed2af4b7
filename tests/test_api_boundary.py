"""Plugins import from the core only through :mod:`accel.api`, and only the names it lists.

Every Python file under ``plugins/*/src`` is parsed (not imported), so a private import on a
rarely used path is caught as surely as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import accel.api

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted(ROOT.glob("plugins/*/src/**/*.py"))


def _is_core(module: str | None) -> bool:
    return module is not None and (module == "accel" or module.startswith("accel."))


def _core_imports(tree: ast.AST) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(line, module, names)`` of every import of the core package ``accel``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_core(alias.name):
                    found.append((node.lineno, alias.name, ()))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_core(node.module):
            found.append((node.lineno, str(node.module), tuple(a.name for a in node.names)))
    return found


def boundary_violations(source: str, where: str) -> list[str]:
    exported = accel.api.exports()
    problems = []
    for line, module, names in _core_imports(ast.parse(source)):
        if module != "accel.api" or not names:
            problems.append(f"{where}:{line}: imports {module}; import from accel.api only")
            continue
        problems += [f"{where}:{line}: accel.api has no '{n}'" for n in names if n not in exported]
    return problems


def test_there_are_plugin_sources():
    assert len(PLUGIN_SOURCES) > 20
    assert {p.relative_to(ROOT).parts[1] for p in PLUGIN_SOURCES} >= {
        "attention_packing",
        "fused_ops",
        "moe",
        "odm",
        "peft",
    }


def test_plugins_import_the_core_only_through_accel_api():
    problems = []
    for path in PLUGIN_SOURCES:
        text = path.read_text(encoding="utf-8")
        problems += boundary_violations(text, str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("from accel.trainer.loading import default_loader", "imports accel.trainer.loading"),
        ("import accel.errors", "imports accel.errors"),
        ("from accel import ConfigError", "imports accel;"),
        ("def f():\n    from accel.patching import bind", "imports accel.patching"),
        ("from accel.api import not_a_name", "accel.api has no 'not_a_name'"),
    ],
)
def test_the_check_refuses_private_imports(source, problem):
    problems = boundary_violations(source, "x.py")
    assert len(problems) == 1 and problem in problems[0]


def test_the_check_accepts_the_api_and_other_packages():
    source = "from accel.api import ConfigError, hook\nimport accelerate\nfrom accel_peft import x"
    assert boundary_violations(source, "x.py") == []


def test_every_api_name_resolves():
    for name, module in accel.api.exports().items():
        assert getattr(accel.api, name) is getattr(
            __import__(f"accel.{module}", fromlist=["x"]), name
        )
    with pytest.raises(AttributeError, match="has no attribute 'train'"):
        accel.api.train  # noqa: B018
