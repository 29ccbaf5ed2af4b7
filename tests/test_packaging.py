"""Installs as the README describes them: a wheel folder built from the checkout that pip
installs the core and its plugins from by extra, ``accel install --find-links``, and the core
importable from the folder that holds a clone named ``accel``."""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from accel.registry import CATALOG

ROOT = Path(__file__).resolve().parents[1]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-wheels.sh"), str(folder)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return folder


def test_the_wheel_folder_holds_the_core_and_every_plugin(wheels):
    names = {_normalized(p.name.split("-")[0]) for p in wheels.glob("*.whl")}
    assert names == {"accel-core", *(_normalized(e.distribution) for e in CATALOG)}
    assert not any((ROOT / d / "build").exists() for d in (".", "bench")), "build/ left behind"


def test_each_extra_is_named_as_accel_install_names_its_plugin(wheels):
    """``accel-core[fused_ops,peft]``: each extra installs its plugin's distribution, which
    is in the folder."""
    (core,) = wheels.glob("accel_core-*.whl")
    with zipfile.ZipFile(core) as whl:
        meta_name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(whl.read(meta_name))
    extras = set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    for entry in CATALOG:
        assert entry.extra == entry.package  # `accel install fused_ops` and `[fused_ops]`
        extra = _normalized(entry.extra)
        assert extra in extras
        assert f'{entry.distribution}; extra == "{extra}"' in requires
    # the core's own modules are in its wheel (the folders map to packages by package-dir)
    with zipfile.ZipFile(core) as whl:
        files = set(whl.namelist())
    for module in ("accel/__init__.py", "accel/cli/main.py", "accel/trainer/run.py"):
        assert module in files


def test_accel_install_from_a_wheel_folder(wheels, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "accel.cli", "install", "odm", "--dry-run", "--force"]
        + ["--find-links", str(wheels)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"--find-links {wheels} accel-odm" in out.stdout, out.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "accel.cli", "install", "odm", "--find-links", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("accel: error: --find-links") and "build-wheels.sh" in (
        missing.stderr
    )


def test_import_from_the_folder_holding_a_clone_named_accel(tmp_path):
    """Python started beside a clone named ``accel`` (git's default) imports the installed
    core, not the clone's folder as an empty namespace package."""
    (tmp_path / "accel").symlink_to(ROOT, target_is_directory=True)
    out = subprocess.run(
        [sys.executable, "-c", "from accel import AccelerationPlugin; import accel.cli.main"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
