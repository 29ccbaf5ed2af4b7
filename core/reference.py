"""Render the configuration reference (docs/configuration.md) from the installed plugins.

The reference is generated, not written by hand, so it cannot drift from the schemas:
``python -m accel.reference`` prints it and a test compares it with the committed file.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping

from .registry import PluginInfo, discover_plugins
from .schema import describe_type


def schema_table(schema: type) -> list[str]:
    hints = typing.get_type_hints(schema)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{f.default_factory()!r}`"
        else:
            default = "required"
        meaning = f.metadata.get("help", "")
        rows.append(f"| `{f.name}` | {describe_type(hints[f.name])} | {default} | {meaning} |")
    return rows


def plugin_section(info: PluginInfo) -> list[str]:
    cls = info.cls
    lines = [f"### `{info.name}` ({info.distribution})", ""]
    if cls.__doc__:
        lines += [" ".join(cls.__doc__.split()), ""]
    models = ", ".join(cls.model_types) if cls.model_types is not None else "any"
    lines += [f"- supported `model_type`: {models}"]
    if cls.requires:
        lines += [f"- requires: {', '.join(cls.requires)}"]
    for flag in cls.flags:
        lines += [f"- flag `{flag.usage()}` → `plugins.{flag.path}` — {flag.help}"]
    schemas = [cls.schema_for(p) for p in cls.config_paths]
    if any(callable(getattr(s, "enables_nothing", None)) for s in schemas):
        lines += ["- a section that switches nothing on (every option off) is an error"]
    lines.append("")
    for path in cls.config_paths:
        lines += [f"`plugins.{path}`:", ""]
        schema = cls.schema_for(path)
        lines += schema_table(schema) if schema is not None else ["(no options)"]
        lines.append("")
    return lines


def trainer_section() -> list[str]:
    from .trainer.arguments import (
        AccelerationArguments,
        DataArguments,
        ModelArguments,
        TuningArguments,
    )

    lines = [
        "## Trainer arguments",
        "",
        "Every `transformers.TrainingArguments` field is accepted too (`num_train_epochs`, "
        "`learning_rate`, `gradient_checkpointing`, `save_strategy`, ...), plus "
        "`save_model_dir`; `resume_from_checkpoint` unset resumes from the newest complete "
        "checkpoint in `output_dir`, `False` starts fresh, a path picks one. A run config "
        "(JSON/YAML file or `accel.train(...)`) may also hold `plugins:`, the plugin options "
        "below in fms-acceleration's layout.",
        "",
    ]
    for cls in (ModelArguments, DataArguments, TuningArguments, AccelerationArguments):
        lines += [f"### {cls.__name__}", "", *schema_table(cls), ""]
    return lines


def render(available: Mapping[str, PluginInfo] | None = None) -> str:
    available = discover_plugins() if available is None else available
    lines = [*trainer_section(), "## Plugin options", ""]
    for name in sorted(available):
        lines += plugin_section(available[name])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")


#: where the hook table sits in docs/plugin-authoring.md
HOOK_TABLE_START = "<!-- hook-table:start (generated: python scripts/update_docs.py) -->\n"
HOOK_TABLE_END = "<!-- hook-table:end -->\n"


def hook_table() -> str:
    """The plugin guide's table of hooks, from :data:`accel.hookspecs.SPECS` (signature, the
    first paragraph of the spec's docstring, how results combine)."""
    import re

    from .hookspecs import SPECS, Combine

    rows = ["| hook | when; what to return | combination |", "|---|---|---|"]
    for spec in SPECS.values():
        when = " ".join(spec.doc.split("\n\n")[0].split())
        when = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", when).replace("``", "`")
        if spec.combine is Combine.SINGLE:
            how = "single owner" + (f" (one for all '{spec.group}' hooks)" if spec.group else "")
        elif spec.combine is Combine.CHAINED:
            how = f"chained (passes on {', '.join(f'`{t}`' for t in spec.threads)})"
        else:
            how = "fan-out" + (", lists joined" if spec.joins else "")
        rows.append(f"| `{spec.name}({', '.join(spec.params)})` | {when} | {how} |")
    return "\n".join(rows) + "\n"
