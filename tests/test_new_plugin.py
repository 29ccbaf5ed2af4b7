"""``accel new plugin NAME``: the package it writes installs (into a folder of its own, not
this environment), is listed and used by the CLI, and its own tests pass; bad names and
existing folders are one error line and leave everything as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accel.cli.main import main

NAME = "scale_demo"


def accel(*args: str, site: Path | None = None, cwd: Path | None = None):
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(the generated package, the folder it is installed into, the files written)."""
    root = tmp_path_factory.mktemp("new-plugin")
    out = accel("-m", "accel.cli", "new", "plugin", NAME, "--dir", str(root / "work"))
    assert out.returncode == 0, out.stderr
    package = root / "work" / NAME
    files = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file())
    left = [p.name for p in package.parent.iterdir() if p.name != NAME]  # no staging folder
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "--no-index", "--target", str(site), str(package)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return package, site, files + [f"left over: {name}" for name in left]


def test_writes_a_complete_package(generated):
    package, site, files = generated
    assert files == [
        "README.md",
        "pyproject.toml",
        "src/accel_scale_demo/__init__.py",
        "src/accel_scale_demo/plugin.py",
        "tests/test_plugin.py",
    ]
    pyproject = (package / "pyproject.toml").read_text()
    assert '[project.entry-points."accel.plugins"]' in pyproject
    assert 'scale_demo = "accel_scale_demo.plugin:ScaleDemoPlugin"' in pyproject
    assert (site / "accel_scale_demo" / "plugin.py").is_file()


def test_installed_package_is_listed_and_its_flag_trains(generated, tmp_path):
    _, site, _ = generated
    out = accel("-m", "accel.cli", "plugins", "--json", site=site)
    assert out.returncode == 0, out.stderr
    row = next(r for r in json.loads(out.stdout)["installed"] if r["name"] == NAME)
    assert row["package"] == "accel-scale-demo" and row["flags"] == [f"--{NAME}"]

    args = ["train", "--demo", "--max_steps", "2", f"--{NAME}", "2.0"]
    out = accel("-m", "accel.cli", *args, "--output_dir", str(tmp_path / "out"), site=site)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{NAME}.scale_embeddings -> 1 module(s)" in out.stdout
    assert "input embeddings x 2.0" in out.stdout


def test_generated_tests_pass(generated):
    package, site, _ = generated
    out = accel("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", site=site, cwd=package)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "5 passed" in out.stdout


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("accel: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("name", "hint"),
    [("9lives", ""), ("My-Plugin", "(e.g. 'my_plugin')"), ("class", ""), ("a b", "(e.g. 'a_b')")],
)
def test_refuses_a_name_that_is_not_an_identifier(name, hint, tmp_path, capsys):
    assert main(["new", "plugin", name, "--dir", str(tmp_path)]) == 2
    line = error_line(capsys)
    assert f"plugin name '{name}': use a lower-case Python identifier" in line and hint in line
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_name_a_plugin_already_has(tmp_path, capsys):
    assert main(["new", "plugin", "padding_free", "--dir", str(tmp_path)]) == 2
    assert "'padding_free' is already used by the accel-attention-packing" in error_line(capsys)


def test_never_overwrites_an_existing_folder(tmp_path, capsys):
    mine = tmp_path / NAME / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("keep me")
    assert main(["new", "plugin", NAME, "--dir", str(tmp_path)]) == 2
    assert "already exists and is not an empty folder" in error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == [NAME]
    assert [p.name for p in mine.parent.iterdir()] == ["notes.txt"]
    assert mine.read_text() == "keep me"


def test_fills_an_empty_folder(tmp_path, capsys):
    (tmp_path / NAME).mkdir()
    assert main(["new", "plugin", NAME, "--dir", str(tmp_path)]) == 0
    assert (tmp_path / NAME / "src" / f"accel_{NAME}" / "plugin.py").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [NAME]
