"""The packages behind each base, checked with the install command when missing."""

from __future__ import annotations

#: the packages each base needs, as pip requirements
PACKAGES = {
    "bitsandbytes": ("bitsandbytes>=0.45",),
    "gptq": ("gptqmodel>=7.6", "optimum>=2.0"),
}


def require(kind: str, what: str) -> None:
    """The packages of ``kind`` are installed, else the ``pip install`` command (the plugins get
    the same check from their ``required_packages`` when they activate)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    from accel.api import PluginRequirementError

    missing = []
    for text in PACKAGES[kind]:
        req = Requirement(text)
        try:
            if not req.specifier.contains(metadata.version(req.name), prereleases=True):
                missing.append(text)
        except metadata.PackageNotFoundError:
            missing.append(text)
    if missing:
        quoted = " ".join(f"'{m}'" for m in missing)
        raise PluginRequirementError(f"{what} needs {', '.join(missing)}; pip install {quoted}")
