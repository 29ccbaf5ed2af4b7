"""Installed plugin packages that are broken cannot stop accel: they are reported, skipped,
an error only for a run that uses them, and ``ACCEL_DISABLE_PLUGINS`` switches them off.

The packages are built and installed for real (pip, no network) into a folder put on
``PYTHONPATH``, so discovery reads their dist-info entry points as it would in a venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1"

[project.entry-points."accel.plugins"]
{entry} = "{module}:Plugin"

[tool.setuptools]
py-modules = ["{module}"]
"""

PACKAGES = {
    # fails to import at all
    "accel-crashes": ("crashes", "accel_crashes", "raise ImportError('needs libfoo 9')\n"),
    # the class fails accel's hook check when it is defined (an unknown hook name)
    "accel-badhook": (
        "badhook",
        "accel_badhook",
        """
        from accel import AccelerationPlugin, hook

        class Plugin(AccelerationPlugin):
            name = "badhook"
            config_paths = ("training.badhook",)

            @hook
            def agument_model(self, model, train_args, peft_config):
                return model, peft_config
        """,
    ),
    # loads, but is not an accel plugin class: its config path is still known
    "accel-notaplugin": (
        "notaplugin",
        "accel_notaplugin",
        """
        class Plugin:
            name = "notaplugin"
            config_paths = ("training.notaplugin",)
        """,
    ),
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    site = root / "site"
    for dist, (entry, module, source) in PACKAGES.items():
        pkg = root / dist
        pkg.mkdir()
        (pkg / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, entry=entry, module=module))
        (pkg / f"{module}.py").write_text(textwrap.dedent(source))
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
            + ["--no-index", "--target", str(site), str(pkg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return site


def accel(site: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "ACCEL_DISABLE_PLUGINS"}
    full["PYTHONPATH"] = str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")
    full.update(ACCEL_CACHE=str(tmp_path / "cache"), **env)
    return subprocess.run(
        [sys.executable, "-m", "accel.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
    )


def test_listed_as_broken(broken_site, tmp_path):
    out = accel(broken_site, tmp_path, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    broken = {row["package"]: row for row in listing["broken"]}
    assert set(broken) == set(PACKAGES)
    assert broken["accel-crashes"]["error"] == "ImportError: needs libfoo 9"
    assert "agument_model" in broken["accel-badhook"]["error"]
    assert "does not name a subclass" in broken["accel-notaplugin"]["error"]
    installed = {row["name"] for row in listing["installed"]}
    assert not installed & {"crashes", "badhook", "notaplugin"}
    text = accel(broken_site, tmp_path, "plugins")
    assert text.returncode == 0 and "Broken (skipped" in text.stdout
    assert "ACCEL_DISABLE_PLUGINS=crashes" in text.stdout


def test_demo_trains_beside_broken_plugins(broken_site, tmp_path):
    out = accel(
        broken_site,
        tmp_path,
        *("train", "--demo", "--max_steps", "2", "--eval_strategy", "no"),
        *("--output_dir", str(tmp_path / "out")),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train_steps          : 2" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if line.startswith("accel: warning:")]
    assert len(warnings) == 3, out.stderr
    assert any("accel-crashes" in w and "needs libfoo 9" in w for w in warnings)


def test_error_only_when_the_run_uses_it(broken_site, tmp_path):
    config = tmp_path / "accel.yaml"
    config.write_text("plugins:\n  training:\n    notaplugin: {}\n")
    out = accel(
        broken_site,
        tmp_path,
        *("train", "--demo", "--max_steps", "1", "--acceleration_config", str(config)),
        *("--output_dir", str(tmp_path / "out")),
    )
    assert out.returncode == 2, out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("accel: error:")]
    assert len(error) == 1, out.stderr
    assert "config path 'plugins.training.notaplugin' needs the plugin 'notaplugin'" in error[0]
    assert "accel-notaplugin" in error[0] and "does not name a subclass" in error[0]
    assert "Traceback" not in out.stderr


def test_switched_off(broken_site, tmp_path):
    off = "crashes,accel-badhook,notaplugin"
    out = accel(broken_site, tmp_path, "plugins", "--json", ACCEL_DISABLE_PLUGINS=off)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert listing["broken"] == []
    assert sorted(listing["disabled"]) == [
        "badhook (accel-badhook)",
        "crashes (accel-crashes)",
        "notaplugin (accel-notaplugin)",
    ]
    # a first-party plugin switched off is an error only for a run that asks for it
    out = accel(
        broken_site,
        tmp_path,
        *("train", "--demo", "--max_steps", "1", "--fast_kernels", "True", "True", "True"),
        ACCEL_DISABLE_PLUGINS="fused_ops",
    )
    assert out.returncode == 2
    assert "ACCEL_DISABLE_PLUGINS switches off" in out.stderr, out.stderr[-2000:]
