"""``accel configs`` and ``accel arguments``: the shipped sample configs and their flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accel.samples import description, resolve_config_file, sample_dir, samples


def run(args: Any) -> int:
    found = samples()
    width = max((len(n) for n in found), default=0)
    print(f"Sample acceleration configs ({sample_dir()}):")
    for name, path in found.items():
        print(f"  {name:<{width}}  {description(path)}")
    print(
        "\nUse one with `accel train --acceleration_config <name or file> ...`; "
        "`accel arguments <name>` prints the equivalent flags."
    )
    return 0


def config_to_flags(path: Path) -> tuple[list[str], list[str]]:
    """Return (flags, paths no flag can express) for an acceleration config file.

    The config is validated exactly as ``accel train`` validates it (the framework is built
    from it), so a misspelt key or a bad value is the same error here.
    """
    from accel.framework import AccelerationFramework
    from accel.registry import installed_flags

    framework = AccelerationFramework.from_sources(path)
    by_path: dict[str, list[Any]] = {}
    for flag, _ in installed_flags(framework.available).values():
        by_path.setdefault(flag.path, []).append(flag)
    flags, leftover = [], []
    for plugin in framework.plugins:
        for cfg_path, config in plugin.configs.items():
            spelled = [
                (flag, values)
                for flag in by_path.get(cfg_path, [])
                if (values := flag.to_values(config)) is not None
            ]
            if not spelled:
                leftover.append(cfg_path)
                continue
            flag, values = spelled[0]
            flags.append(" ".join([f"--{flag.name}", *values]))
    return flags, leftover


def run_arguments(args: Any) -> int:
    path = resolve_config_file(args.config)
    flags, leftover = config_to_flags(path)
    print(" ".join(flags))
    if leftover:
        print(
            f"# no flag expresses {', '.join('plugins.' + p for p in leftover)}; also pass "
            f"--acceleration_config {args.config}"
        )
    return 0
