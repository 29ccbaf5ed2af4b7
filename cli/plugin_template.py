"""The files of the plugin package that ``accel new plugin NAME`` writes.

Each file is a :class:`string.Template` (``$name``, ``$package`` ...), kept here as Python
strings so that a regular install of accel ships them without package data. The package is
complete: it installs, registers its plugin in the ``accel.plugins`` entry-point group, and
its tests build a tiny real model with :mod:`accel.testing` and train it with the flag.
"""

from __future__ import annotations

from string import Template

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "accel plugin: --$name SCALE multiplies the input embeddings by SCALE"
readme = "README.md"
requires-python = ">=3.10"
# accel-core is installed first (it is not on PyPI): see README.md
dependencies = ["accel-core$core_versions"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."accel.plugins"]
$name = "$package.plugin:$cls"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

INIT = '''\
"""$distribution: an accel plugin (the class is registered in pyproject.toml)."""

from .plugin import $config_cls, $cls

__all__ = ["$config_cls", "$cls"]
'''

PLUGIN = '''\
"""The $name plugin: ``--$name SCALE`` multiplies the model's input embeddings by SCALE.

A starting point: keep the shape (a config dataclass, a flag, hooks marked with ``@hook``)
and replace the patch rule with your own. accel's docs/plugin-authoring.md lists every hook
(``augment_model``, ``prepare_dataset``, ``callbacks``, ``export`` ...) and what the
framework checks. Import from the core through ``accel.api`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accel.api import AccelerationPlugin, Flag, PatchRule, hook


@dataclass
class $config_cls:
    """Options under ``plugins: training: $name:`` (the flag sets ``scale``)."""

    scale: float = 1.0

    def __post_init__(self) -> None:  # a ValueError is one error line naming the path
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")


class $cls(AccelerationPlugin):
    name = "$name"
    config_paths = ("training.$name",)
    config_schema = $config_cls
    flags = (
        Flag(
            "$name",
            "training.$name",
            "multiply the input embeddings by SCALE",
            fields=("scale",),
        ),
    )
    model_types = None  # any architecture with input embeddings
    core_versions = "$core_versions"

    @hook
    def patch_rules(self, model: Any) -> list[PatchRule]:
        embeddings = model.get_input_embeddings()
        scale = self.config().scale

        def scaled(module: Any, forward: Any) -> Any:
            def scaled_forward(*args: Any, **kwargs: Any) -> Any:
                return forward(*args, **kwargs) * scale

            return scaled_forward

        return [
            PatchRule("scale_embeddings", "$name", match=lambda m: m is embeddings, wrap=scaled)
        ]

    @hook
    def report_lines(self) -> list[str]:
        return [f"input embeddings x {self.config().scale}"]
'''

TEST = '''\
"""$distribution on real tiny models (built locally by accel.testing, nothing downloaded)."""

from __future__ import annotations

import json

import accel
import pytest
import torch
from accel import AccelerationFramework, ConfigError
from accel.registry import discover_plugins
from accel.testing import cipher_run_args, make_examples, save_tiny_model, tiny_model

from $package import $config_cls, $cls


def test_installed_plugin_is_discovered():
    assert discover_plugins()["$name"].cls is $cls


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_flag_scales_the_input_embeddings(model_type):
    model = tiny_model(model_type)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model.get_input_embeddings()(ids)
    framework = AccelerationFramework.from_sources(flags={"$name": ["2.5"]})
    framework.apply_patches(model)
    assert framework.patches.counts == {"$name.scale_embeddings": 1}
    torch.testing.assert_close(model.get_input_embeddings()(ids), 2.5 * before)
    framework.revert_patches()
    torch.testing.assert_close(model.get_input_embeddings()(ids), before)


def test_a_bad_scale_is_one_error_naming_the_path():
    with pytest.raises(ConfigError, match="plugins.training.$name: scale must be positive"):
        AccelerationFramework.from_sources(flags={"$name": ["0"]})


def test_training_run_with_the_flag(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\\n" for row in make_examples(32, seed=0)))
    args = cipher_run_args(
        save_tiny_model(tmp_path / "model"), data, output_dir=str(tmp_path / "out"), max_steps=2
    )
    result = accel.train(args, $name=[3.0])
    plugin = result.framework.get("$name")
    assert isinstance(plugin, $cls)
    assert plugin.config() == $config_cls(scale=3.0)
    assert result.framework.patches.counts == {"$name.scale_embeddings": 1}
    assert result.summary["train_steps"] == 2
'''

README = """\
# $distribution

An accel plugin: `--$name SCALE` multiplies the model's input
embeddings by SCALE. It is a starting point: replace the patch rule in
`src/$package/plugin.py` with what your plugin does, and the tests with tests of that.

## Install

accel-core is not on PyPI, so install it first (from an accel checkout, or from a folder of
its wheels), then this package; pip then finds `accel-core` installed and only adds the rest:

```bash
pip install /path/to/accel           # or: pip install --find-links WHEELS accel-core
pip install -e "./$name[test]"       # editable: edits take effect without reinstalling
accel plugins                        # lists $name [$distribution 0.1.0]
```

## Use

```bash
accel train --model_name_or_path ... --$name 2.0
```

From Python: `result = accel.train({...}, $name=[2.0])`; `result.framework.get("$name")` is
the plugin instance. In an acceleration config: `plugins: {training: {$name: {scale: 2.0}}}`.

## Test

```bash
python -m pytest tests
```
"""

FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    "src/$package/__init__.py": INIT,
    "src/$package/plugin.py": PLUGIN,
    "tests/test_plugin.py": TEST,
}


def render(name: str, core_versions: str) -> dict[str, str]:
    """``{relative path: text}`` of the package for plugin ``name`` (a valid identifier)."""
    camel = "".join(part.capitalize() for part in name.split("_") if part)
    values = {
        "name": name,
        "package": f"accel_{name}",
        "distribution": f"accel-{name.replace('_', '-')}",
        "cls": f"{camel}Plugin",
        "config_cls": f"{camel}Config",
        "core_versions": core_versions,
    }
    return {
        Template(path).substitute(values): Template(text).substitute(values)
        for path, text in FILES.items()
    }
