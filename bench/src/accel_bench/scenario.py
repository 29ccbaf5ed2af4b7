"""Scenario files of ``accel bench``: experiments, their entity space, and the is_valid rules.

A scenario is YAML. One experiment::

    experiment: finetune_lora_benchmark     # a family of the reference (see FAMILIES)
    name: lora-cpu                          # optional; names the table and the plot
    defaults: {model_name: small-llama, model_max_length: 256, number_gpus: 1}
    entities:                               # a list of entity mappings ...
      - {batch_size: 8}
      - {batch_size: 8, fast_kernels: [true, true, true]}
    space:                                  # ... and/or parameter -> values, crossed
      batch_size: [4, 8]
      r: [4, 16]

or several under ``scenarios: [...]``. ``defaults`` apply to every entity; ``entities`` and
the crossed ``space`` are both run (the space crossed with ``defaults``). The first entity of
a scenario is its baseline (``baseline: <index>`` chooses another) for speedup and memory
ratios.

Parameter names are the reference's (ado's SFTTrainer experiments); defaults are the
reference's too, except where a CPU machine needs otherwise (noted in :data:`PARAMETERS`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel.errors import ConfigError, did_you_mean

#: family -> (peft method, fixed parameters, plugin flags the family needs)
FAMILIES: dict[str, dict[str, Any]] = {
    "finetune_full_benchmark": {"peft_method": "none"},
    "finetune_lora_benchmark": {"peft_method": "lora"},
    "finetune_gptq-lora_benchmark": {
        "peft_method": "lora",
        # the reference: auto_gptq triton_v2, fast_kernels True True True,
        # fused_lora auto_gptq True, torch_dtype float16 (fixed)
        "fixed": {
            "auto_gptq": ["triton_v2"],
            "fast_kernels": [True, True, True],
            "fused_lora": ["auto_gptq", True],
            "torch_dtype": "float16",
        },
    },
    "finetune_pt_benchmark": {"peft_method": "pt"},
    "finetune_full_stability": {"peft_method": "none", "stability": True},
}
#: the reference spells the GPTQ family "gtpq" in its heading; both names are accepted
ALIASES = {"finetune_gtpq-lora_benchmark": "finetune_gptq-lora_benchmark"}
for _family in list(FAMILIES):
    ALIASES[f"{_family}-v1.0.0"] = _family
ALIASES["finetune_gtpq-lora_benchmark-v1.0.0"] = "finetune_gptq-lora_benchmark"

REQUIRED = ("model_name", "model_max_length", "number_gpus", "batch_size")
AUTO_STOP_METHODS = ("WARMUP_60S_STABLE_120S_OR_10_STEPS", None)

#: parameter -> default (None: unset). The reference's names and defaults.
PARAMETERS: dict[str, Any] = {
    "model_name": None,
    "model_max_length": None,
    "number_gpus": None,  # processes (torchrun for >1); on CPU, processes on the CPU
    "batch_size": None,  # effective, split evenly over max(1, number_gpus) processes
    "gpu_model": None,  # default: this machine's device (CUDA name, or "cpu")
    "number_nodes": 1,
    "dataset_id": "news-tokens-16384plus-entries-4096",
    "gradient_checkpointing": True,
    "gradient_checkpointing_use_reentrant": False,
    "gradient_accumulation_steps": 4,
    "torch_dtype": "bfloat16",
    "max_steps": -1,
    "num_train_epochs": 1.0,
    "stop_after_seconds": -1.0,
    "auto_stop_method": None,
    "distributed_backend": None,  # FSDP when number_gpus > 1
    "fast_moe": 0,
    "fast_kernels": None,
    "fused_lora": None,
    "padding_free": None,
    "multipack": None,
    "bnb_qlora": None,  # accel's QLoRA (plugin accel-peft), e.g. nf4
    "auto_gptq": None,
    "odm": None,  # online data mixing (plugin accel-odm): a reward name; needs a news-mix id
    "optim": "adamw_torch",
    "bf16": False,
    "r": 4,
    "lora_alpha": 16,
    "target_modules": None,  # default: the model's attention projections (q_proj, v_proj)
    "num_virtual_tokens": 8,  # prompt tuning
    "learning_rate": 1e-5,
    "seed": 42,
    "dataset_seed": 0,
    "repeats": 5,  # finetune_full_stability: how many times the entity runs
    "memory_limit_mb": None,  # bench option: cap the run's memory growth (forces OOM on CPU)
}


def plugin_flags() -> tuple[str, ...]:
    """The flags of acceleration plugins (passed through to the trainer as its own
    arguments): what the installed plugins declare, plus the catalog's first-party flags (a
    run that uses one of a plugin that is not installed is skipped with its install command)."""
    from accel.registry import all_flag_names, discover_plugins

    return tuple(all_flag_names(discover_plugins()))


BACKENDS = ("DDP", "FSDP")


@dataclass
class Entity:
    """One point of the space: the parameters the scenario gave and the defaults filled in."""

    experiment: str
    given: dict[str, Any]
    values: dict[str, Any]
    scenario: str
    index: int
    entity_id: str = ""
    is_baseline: bool = False

    def label(self, varying: Sequence[str]) -> str:
        parts = [f"{k}={_short(self.given.get(k, self.values.get(k)))}" for k in varying]
        return ", ".join(parts) or self.entity_id


@dataclass
class Scenario:
    name: str
    experiment: str
    entities: list[Entity] = field(default_factory=list)

    def varying(self) -> list[str]:
        """Parameters whose value differs between the scenario's entities (table columns)."""
        keys: list[str] = []
        for e in self.entities:
            keys += [k for k in e.given if k not in keys]
        return [k for k in keys if len({_key(e.values.get(k)) for e in self.entities}) > 1]


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def canonical_experiment(name: Any) -> str:
    name = str(name)
    name = ALIASES.get(name, name)
    if name not in FAMILIES:
        raise ConfigError(
            f"experiment {name!r} is not known.{did_you_mean(name, FAMILIES)} "
            f"Experiments: {', '.join(FAMILIES)}"
        )
    return name


def entity_id(experiment: str, given: Mapping[str, Any]) -> str:
    """Stable id of an entity: its experiment and the parameters it set (not the defaults,
    which may depend on the machine), so results from two machines can be compared."""
    text = _key({"experiment": experiment, **given})
    short = experiment.removeprefix("finetune_").removesuffix("_benchmark").replace("_", "-")
    return f"{short}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _check_values(where: str, given: Mapping[str, Any]) -> None:
    for key in given:
        if key not in PARAMETERS and key not in plugin_flags():
            raise ConfigError(
                f"{where}: unknown parameter {key!r}.{did_you_mean(key, PARAMETERS)} "
                "See docs/bench.md for the parameters."
            )
    ints = (
        "model_max_length",
        "number_gpus",
        "batch_size",
        "number_nodes",
        "gradient_accumulation_steps",
        "max_steps",
        "r",
        "lora_alpha",
        "fast_moe",
        "seed",
        "dataset_seed",
        "repeats",
        "num_virtual_tokens",
    )
    for key in ints:
        value = given.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    for key in ("num_train_epochs", "stop_after_seconds", "learning_rate", "memory_limit_mb"):
        value = given.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    for key in ("gradient_checkpointing", "gradient_checkpointing_use_reentrant", "bf16"):
        value = given.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if given.get("auto_stop_method") not in AUTO_STOP_METHODS:
        raise ConfigError(
            f"{where}: auto_stop_method {given['auto_stop_method']!r} is not one of "
            "WARMUP_60S_STABLE_120S_OR_10_STEPS, null"
        )
    backend = given.get("distributed_backend")
    if backend is not None and str(backend).upper() not in BACKENDS:
        raise ConfigError(f"{where}: distributed_backend {backend!r} is not one of DDP, FSDP, null")
    if given.get("torch_dtype") not in (None, "bfloat16", "float32", "float16"):
        raise ConfigError(
            f"{where}: torch_dtype {given['torch_dtype']!r} is not one of bfloat16, float32, float16"
        )
    if given.get("dataset_id") is not None:
        from .datasets import parse_dataset_id

        parse_dataset_id(given["dataset_id"])
    odm = given.get("odm")
    if odm is not None and odm not in odm_rewards():
        raise ConfigError(
            f"{where}: odm {odm!r} is not one of {', '.join(odm_rewards())}, null (off)"
        )
    if odm is not None:
        from .datasets import is_mixture

        dataset = given.get("dataset_id") or PARAMETERS["dataset_id"]
        if not is_mixture(dataset):
            raise ConfigError(
                f"{where}: odm {odm} mixes several datasets, but dataset_id {dataset!r} is one; "
                "use a mixture id news-mix-<K>-entries-<M>"
            )
    if given.get("model_name") is not None:
        from .models import check_model_name

        check_model_name(str(given["model_name"]))


def default_gpu_model() -> str:
    """This machine's device, as the reference's ``gpu_model`` names it (spaces as dashes):
    the first CUDA device's name, else ``cpu``. Read without importing torch."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()
            )
            if out:
                return out[0].strip().replace(" ", "-")
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


def fill_defaults(experiment: str, given: Mapping[str, Any], gpu_model: str) -> dict[str, Any]:
    values = {**dict.fromkeys(plugin_flags()), **PARAMETERS, **given}
    values.update(FAMILIES[experiment].get("fixed", {}))
    if "gpu_model" not in given:
        values["gpu_model"] = gpu_model
    if FAMILIES[experiment].get("stability") and "max_steps" not in given:
        values["max_steps"] = 5  # the reference: "runs 5 optimization steps"
    if values["distributed_backend"] is None and (values["number_gpus"] or 0) > 1:
        values["distributed_backend"] = "FSDP"
    if values["distributed_backend"] is not None:
        values["distributed_backend"] = str(values["distributed_backend"]).upper()
    return values


def invalid_reasons(values: Mapping[str, Any], experts: int | None) -> list[str]:
    """The reference's is_valid rules (ado-sfttrainer-experiments.md, "is_valid logic"); an
    entity breaking any is invalid and never runs. ``experts``: the model's
    ``num_local_experts`` (None for a dense model)."""
    reasons = []
    gpus, batch, nodes = values["number_gpus"], values["batch_size"], values["number_nodes"]
    if gpus and batch % gpus != 0:  # 1
        reasons.append(f"batch_size {batch} cannot be evenly divided by number_gpus {gpus}")
    if nodes and gpus % nodes != 0:  # 2
        reasons.append(f"number_gpus {gpus} cannot be evenly divided by number_nodes {nodes}")
    if not nodes or nodes <= 0:  # 3
        reasons.append(f"number_nodes must be greater than 0 (got {nodes})")
    if batch <= 0:  # 4
        reasons.append(f"batch_size must be greater than 0 (got {batch})")
    if gpus > 0 and not (isinstance(values.get("gpu_model"), str) and values["gpu_model"]):  # 5
        reasons.append("number_gpus is greater than 0 but gpu_model is not a non-empty string")
    fast_moe = values.get("fast_moe") or 0
    if fast_moe and gpus % fast_moe != 0:  # 6
        reasons.append(f"fast_moe {fast_moe} does not divide number_gpus {gpus}")
    if fast_moe and (not experts or experts % fast_moe != 0):  # 7
        reasons.append(
            f"fast_moe {fast_moe} does not divide the model's num_local_experts ({experts})"
        )
    return reasons


def _entities_of(raw: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{where}: defaults must be a mapping of parameter -> value")
    listed = raw.get("entities") or []
    space = raw.get("space") or {}
    if not isinstance(listed, list) or not all(isinstance(e, Mapping) for e in listed):
        raise ConfigError(f"{where}: entities must be a list of parameter mappings")
    if not isinstance(space, Mapping) or not all(isinstance(v, list) and v for v in space.values()):
        raise ConfigError(f"{where}: space must map each parameter to a non-empty list of values")
    out = [{**defaults, **e} for e in listed]
    keys = list(space)
    if keys:
        for combo in itertools.product(*(space[k] for k in keys)):
            out.append({**defaults, **dict(zip(keys, combo))})
    if not out:
        if defaults:
            out.append(dict(defaults))
        else:
            raise ConfigError(f"{where}: no entities: give `entities:` and/or `space:`")
    return out


SCENARIO_KEYS = ("experiment", "name", "defaults", "entities", "space", "baseline")


def parse_scenarios(
    raw: Any, source: str = "scenario", gpu_model: str | None = None
) -> list[Scenario]:
    """Scenarios from a parsed YAML document (checked completely before anything runs)."""
    if isinstance(raw, Mapping) and "scenarios" in raw:
        items = raw["scenarios"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{source}: scenarios must be a non-empty list")
    else:
        items = [raw]
    gpu_model = gpu_model if gpu_model is not None else default_gpu_model()
    scenarios, seen_names = [], set()
    for number, item in enumerate(items, 1):
        where = f"{source}: scenario {number}"
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"{where}: must be a mapping with `experiment:` and `entities:`/`space:`"
            )
        unknown = [k for k in item if k not in SCENARIO_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}.{did_you_mean(unknown[0], SCENARIO_KEYS)}"
            )
        if "experiment" not in item:
            raise ConfigError(f"{where}: missing `experiment:` (one of {', '.join(FAMILIES)})")
        experiment = canonical_experiment(item["experiment"])
        name = str(item.get("name") or f"{experiment}-{number}")
        if name in seen_names:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        seen_names.add(name)
        scenario = Scenario(name, experiment)
        for index, given in enumerate(_entities_of(item, where)):
            ewhere = f"{where} ({name}), entity {index + 1}"
            missing = [k for k in REQUIRED if given.get(k) is None]
            if missing:
                raise ConfigError(f"{ewhere}: missing required parameter(s) {', '.join(missing)}")
            _check_values(ewhere, given)
            given = dict(given)
            values = fill_defaults(experiment, given, gpu_model)
            entity = Entity(experiment, given, values, name, index)
            entity.entity_id = entity_id(experiment, given)
            scenario.entities.append(entity)
        baseline = item.get("baseline", 0)
        if not isinstance(baseline, int) or not 0 <= baseline < len(scenario.entities):
            raise ConfigError(
                f"{where}: baseline must be an entity index 0..{len(scenario.entities) - 1}"
            )
        scenario.entities[baseline].is_baseline = True
        ids = [e.entity_id for e in scenario.entities]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ConfigError(f"{where}: the same entity is listed twice ({sorted(dupes)[0]})")
        scenarios.append(scenario)
    return scenarios


def load_scenarios(path: str | Path, gpu_model: str | None = None) -> list[Scenario]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scenario file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"scenario file {path}: not valid YAML{line}") from None
    if raw is None:
        raise ConfigError(f"scenario file {path} is empty")
    return parse_scenarios(raw, str(path), gpu_model)


def odm_rewards() -> list[str]:
    """The odm plugin's rewards that read the training forward, from its records (the
    validation rewards are left out: their evaluations would count in train_runtime)."""
    try:
        from accel_odm import records
    except ImportError:
        raise ConfigError("odm needs the odm plugin: pip install accel-odm") from None
    return [*records.names("forward"), *records.ALIASES]
