"""Several training datasets in one run: the ``--data_config`` file and static mixing.

The file follows fms-hf-tuning's data config layout::

    dataprocessor:
      type: default            # default: static mixing by the weights; or a plugin's mixer
      seed: 42                 # the mixing order is a pure function of the seed
      sampling_stopping_strategy: all_exhausted   # or first_exhausted (the epoch length)
      <type>: {...}            # a plugin mixer's options, under its type's name
    datasets:
      - name: math
        data_paths: [math.jsonl]            # files or folders (JSON, JSONL, parquet, arrow)
        sampling: 0.7                       # optional weight (all datasets or none)
        split: {train: 0.9, validation: 0.1}  # optional held-out part, per dataset
        data_formatter_template: "Q: {{q}} A: {{a}}"   # optional per-dataset formatting:
        response_template: " A:"            #   dataset_text_field, data_formatter_template,
                                            #   response_template, or pretokenized: true

A dataset that sets none of the formatting keys uses the trainer-level ones
(``dataset_text_field``, ``data_formatter_template``, ``response_template``).

Static mixing (``type: default``) has an exact epoch: with normalized weights ``w_i`` and
dataset sizes ``n_i`` (rows after the split), the epoch holds ``N`` examples, where
``N = max_i ceil(n_i / w_i)`` over datasets with ``w_i > 0`` (``all_exhausted``: every
dataset is seen whole at least once) or ``N = min_i ceil(n_i / w_i)`` (``first_exhausted``:
no dataset repeats). Dataset ``i`` contributes ``round(w_i * N)`` examples (largest
remainder, so the counts sum to ``N``), read from a shuffled pass over it; a dataset that
runs out is re-shuffled and restarted (each pass is a new permutation). The order of the
datasets within the epoch is shuffled too. Everything depends only on ``seed``. Without
weights the datasets are concatenated (every example once per epoch). Every epoch of the
trainer goes over the same mixture, shuffled anew by the trainer's sampler.

A ``type`` other than ``default`` names the data mixer of a plugin (the plugin class's
``data_mixer``): the datasets are laid one after the other and the plugin draws the batches
(it owns the training loader); ``dataprocessor.<type>`` holds its options.

Bad configs are errors naming the dataset and the key, raised before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from .arguments import DataArguments
    from .parsing import TrainConfig

PROCESSOR_KEYS = ("type", "seed", "sampling_seed", "sampling_stopping_strategy")
DATASET_KEYS = (
    "name",
    "data_paths",
    "sampling",
    "split",
    "dataset_text_field",
    "data_formatter_template",
    "response_template",
    "pretokenized",
)
FORMAT_KEYS = ("dataset_text_field", "data_formatter_template", "response_template")
#: the core's own mixing; any other ``type`` is a plugin's ``data_mixer``
STATIC = "default"
STRATEGIES = ("all_exhausted", "first_exhausted")
#: fms-hf-tuning keys this trainer does not implement, with what to use instead
UNSUPPORTED = {
    "data_handlers": "use dataset_text_field / data_formatter_template / response_template "
    "per dataset, or pretokenized data",
    "builder": "name files with a .json, .jsonl, .parquet or .arrow suffix",
    "rename_columns": "rename the columns in the files",
    "retain_columns": "unused columns are dropped when the dataset is tokenized",
    "streaming": "datasets are loaded in memory; remove the key",
    "chat_template": "render the conversations with data_formatter_template",
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    data_paths: tuple[str, ...]
    sampling: float | None = None
    validation: float = 0.0  # fraction held out for evaluation
    train_fraction: float = 1.0
    formatting: Mapping[str, Any] = field(default_factory=dict)
    pretokenized: bool = False

    def data_args(self, base: DataArguments) -> DataArguments:
        """The formatting of this dataset: its own keys, else the trainer-level ones."""
        if not self.formatting and not self.pretokenized:
            return base
        own = {k: self.formatting.get(k) for k in FORMAT_KEYS}
        return replace(base, **own)


@dataclass(frozen=True)
class DataConfig:
    path: str
    type: str
    seed: int
    strategy: str
    datasets: tuple[DatasetSpec, ...]
    #: ``dataprocessor.<type>``: the options of a plugin's mixer
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    @property
    def has_validation(self) -> bool:
        return any(d.validation > 0 for d in self.datasets)

    def weights(self) -> list[float] | None:
        """Normalized sampling weights, or None when no dataset sets one (concatenation)."""
        raw = [d.sampling for d in self.datasets]
        if all(w is None for w in raw):
            return None
        total = sum(raw)  # type: ignore[arg-type]
        return [w / total for w in raw]  # type: ignore[operator]


@dataclass
class DataMix:
    """How the training dataset is made of the datasets of a data config.

    Attached to the training dataset as ``accel_mix`` (see :func:`attach`). ``sizes`` are the
    rows of each dataset (in the order of ``names``) in the training dataset, which holds
    them one after the other (a plugin's mixer, which draws the batches itself) or holds the
    statically mixed epoch, whose composition is ``per_epoch``. ``options`` are the mixer's
    (``dataprocessor.<type>``).
    """

    type: str
    names: list[str]
    sizes: list[int]
    weights: list[float] | None
    seed: int
    options: Mapping[str, Any]
    per_epoch: list[int]
    eval_names: list[str] = field(default_factory=list)

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for size in self.sizes:
            out.append(out[-1] + size)
        return out


ATTRIBUTE = "accel_mix"


def attach(dataset: Any, mix: DataMix) -> Any:
    setattr(dataset, ATTRIBUTE, mix)
    return dataset


def mix_of(dataset: Any) -> DataMix | None:
    """The :class:`DataMix` of a training dataset built from a data config, else None."""
    return getattr(dataset, ATTRIBUTE, None)


# -- reading and checking the file -------------------------------------------------------


def mixer_types(available: Mapping[str, Any] | None = None) -> list[str]:
    """``default`` and the ``data_mixer`` of every installed plugin (discovered when
    ``available`` is not given)."""
    if available is None:
        from ..registry import discover_plugins

        available = discover_plugins()
    mixers = {info.cls.data_mixer for info in available.values() if info.cls.data_mixer}
    return [STATIC, *sorted(mixers)]


def read_data_config(path: str, types: list[str] | None = None) -> DataConfig:
    """Parse and check ``path`` (YAML or JSON) without reading the data files. ``types``: the
    valid ``dataprocessor.type`` values (default: :func:`mixer_types`)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data_config '{path}' does not exist (pass a YAML or JSON file)")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"data_config '{path}' is not valid YAML: {err}") from None
    where = f"data_config '{path}'"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with 'dataprocessor' and 'datasets'")
    _unknown(raw, ("dataprocessor", "datasets"), where)
    proc = raw.get("dataprocessor") or {}
    if not isinstance(proc, dict):
        raise ConfigError(f"{where}: dataprocessor must be a mapping (type, seed, ...)")
    types = mixer_types() if types is None else types
    kind = proc.get("type", STATIC)
    if kind not in types:
        raise ConfigError(
            f"{where}: dataprocessor.type '{kind}' is not one of {', '.join(types)}."
            f"{did_you_mean(str(kind), types)}"
        )
    mixers = [t for t in types if t != STATIC]
    for other in mixers:
        if other != kind and proc.get(other) is not None:
            raise ConfigError(
                f"{where}: dataprocessor.{other} is set but dataprocessor.type is '{kind}'; "
                f"set type: {other} to mix with it, or remove the {other} section"
            )
    _unknown(proc, (*PROCESSOR_KEYS, *mixers), f"{where}: dataprocessor")
    seed = proc.get("seed", proc.get("sampling_seed", 42))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: dataprocessor.seed must be an integer, got {seed!r}")
    strategy = proc.get("sampling_stopping_strategy", "all_exhausted")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"{where}: dataprocessor.sampling_stopping_strategy '{strategy}' is not one of "
            f"{', '.join(STRATEGIES)}"
        )
    options = (proc.get(kind) or {}) if kind != STATIC else {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: dataprocessor.{kind} must be a mapping of {kind} options")
    items = raw.get("datasets")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: datasets must be a non-empty list of datasets")
    specs = [_dataset(item, i, where) for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise ConfigError(
                f"{where}: dataset name '{spec.name}' is used twice (datasets {seen[spec.name]} "
                f"and {i}); give each dataset its own name"
            )
        seen[spec.name] = i
    weights = [s.sampling for s in specs]
    if any(w is not None for w in weights):
        missing = [s.name for s in specs if s.sampling is None]
        if missing:
            raise ConfigError(
                f"{where}: dataset '{missing[0]}' has no sampling weight but others do; give "
                "every dataset a sampling weight, or none (concatenation)"
            )
        if sum(weights) <= 0:  # type: ignore[arg-type]
            raise ConfigError(
                f"{where}: every sampling weight is 0; give at least one dataset a weight > 0"
            )
    if kind != STATIC and len(specs) < 2:
        raise ConfigError(f"{where}: dataprocessor.type {kind} mixes datasets; list at least two")
    return DataConfig(str(path), kind, seed, strategy, tuple(specs), options)


def _unknown(mapping: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key in known:
            continue
        if key in UNSUPPORTED:
            raise ConfigError(f"{where}: key '{key}' is not supported here; {UNSUPPORTED[key]}")
        raise ConfigError(
            f"{where}: unknown key '{key}'.{did_you_mean(str(key), list(known))} "
            f"Valid keys: {', '.join(known)}"
        )


def _dataset(item: Any, index: int, where: str) -> DatasetSpec:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: datasets[{index}] must be a mapping (name, data_paths, ...)")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: datasets[{index}] needs a name (a non-empty string)")
    here = f"{where}: dataset '{name}'"
    _unknown(item, DATASET_KEYS, here)
    paths = item.get("data_paths")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise ConfigError(f"{here}: data_paths must be a non-empty list of files or folders")
    sampling = item.get("sampling")
    if sampling is not None:
        if isinstance(sampling, bool) or not isinstance(sampling, (int, float)):
            raise ConfigError(f"{here}: sampling must be a number >= 0, got {sampling!r}")
        if sampling < 0 or not math.isfinite(sampling):
            raise ConfigError(f"{here}: sampling is {sampling}; weights must be >= 0")
        sampling = float(sampling)
    train, validation = _split(item.get("split"), here)
    formatting = {k: item[k] for k in FORMAT_KEYS if item.get(k) is not None}
    for key, value in formatting.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{here}: {key} must be a non-empty string")
    pretokenized = item.get("pretokenized", False)
    if not isinstance(pretokenized, bool):
        raise ConfigError(f"{here}: pretokenized must be true or false")
    if pretokenized and formatting:
        raise ConfigError(
            f"{here}: pretokenized is true, so {', '.join(formatting)} cannot apply; remove one"
        )
    if "data_formatter_template" in formatting and "dataset_text_field" in formatting:
        raise ConfigError(f"{here}: set dataset_text_field or data_formatter_template, not both")
    if "data_formatter_template" in formatting:
        from .data import check_template

        try:
            check_template(formatting["data_formatter_template"])
        except ConfigError as err:
            raise ConfigError(f"{here}: {err}") from None
    return DatasetSpec(
        name, tuple(paths), sampling, validation, train, formatting, bool(pretokenized)
    )


def _split(value: Any, here: str) -> tuple[float, float]:
    if value is None:
        return 1.0, 0.0
    if not isinstance(value, dict) or set(value) - {"train", "validation"}:
        raise ConfigError(f"{here}: split must be a mapping {{train: 0.9, validation: 0.1}}")
    train = value.get("train", 1.0 - float(value.get("validation", 0.0)))
    validation = value.get("validation", 0.0)
    for key, v in (("train", train), ("validation", validation)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError(f"{here}: split.{key} must be a fraction in [0, 1], got {v!r}")
    if train + validation > 1 + 1e-9 or train <= 0:
        raise ConfigError(
            f"{here}: split.train ({train}) must be > 0 and split.train + split.validation "
            f"({train + validation}) at most 1"
        )
    return float(train), float(validation)


def check_data_config(config: TrainConfig) -> DataConfig | None:
    """Every check of the data config that needs no model: the file, then each dataset's files
    (syntax, columns, null values) with its own formatting."""
    data = config.data
    path = getattr(data, "data_config", None)
    if not path:
        return None
    if data.training_data_path:
        raise ConfigError(
            "training_data_path and data_config are both given; use data_config for several "
            "datasets (it lists the files) or training_data_path for one, not both"
        )
    cfg = read_data_config(path)
    from .data import check_data_file

    for spec in cfg.datasets:
        args = spec.data_args(data)
        for p in spec.data_paths:
            key = f"data_config: dataset '{spec.name}' data_paths"
            check_data_file(_resolve(p, cfg.path), key, args)
            if spec.pretokenized:
                _check_pretokenized(_resolve(p, cfg.path), key)
    return cfg


def _resolve(path: str, config_path: str) -> str:
    """A relative data path is taken relative to the data config file when it exists there."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    beside = Path(config_path).parent / p
    return str(beside) if beside.exists() else str(p)


def _check_pretokenized(path: str, key: str) -> None:
    from .data import data_files, json_records

    kind, files = data_files(path, key)
    if kind != "json":
        return
    for _, row in json_records(files[0]):
        if "input_ids" not in row:
            raise ConfigError(
                f"{key} '{path}': pretokenized is true but the rows have no input_ids column "
                f"(columns: {', '.join(row)})"
            )
        return


# -- building the datasets ---------------------------------------------------------------


def build_datasets(cfg: DataConfig, tokenizer: Any, data_args: DataArguments) -> tuple[Any, Any]:
    """Load, tokenize and split every dataset; return ``(train, eval)``: train is the static
    mix (``type: default``) or the datasets one after the other (a plugin's mixer), with its
    :class:`DataMix` attached; eval is ``{name: dataset}`` for datasets with a validation
    split, else None."""
    import datasets

    from .data import load_data_file, tokenize_dataset

    trains, evals, names = [], {}, []
    for index, spec in enumerate(cfg.datasets):
        args = spec.data_args(data_args)
        key = f"data_config: dataset '{spec.name}' data_paths"
        parts = []
        for p in spec.data_paths:
            path = _resolve(p, cfg.path)
            raw = load_data_file(path, key)
            parts.append(tokenize_dataset(raw, tokenizer, args, f"dataset '{spec.name}' ({path})"))
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if len(ds) == 0:
            raise ConfigError(f"data_config: dataset '{spec.name}' has no rows after formatting")
        train, held = _split_rows(ds, spec, cfg.seed, index)
        if held is not None:
            evals[spec.name] = held
        trains.append(train)
        names.append(spec.name)
    sizes = [len(t) for t in trains]
    weights = cfg.weights()
    whole = datasets.concatenate_datasets(trains)
    if cfg.type != STATIC:
        per_epoch = list(sizes)
        train_ds = whole
    else:
        order, per_epoch = static_mix(sizes, weights, cfg.seed, cfg.strategy)
        train_ds = whole.select(order) if weights is not None else whole
    mix = DataMix(
        cfg.type, names, sizes, weights, cfg.seed, dict(cfg.options), per_epoch, list(evals)
    )
    return attach(train_ds, mix), (evals or None)


def _split_rows(ds: Any, spec: DatasetSpec, seed: int, index: int) -> tuple[Any, Any]:
    if spec.validation <= 0 and spec.train_fraction >= 1:
        return ds, None
    import numpy as np

    n = len(ds)
    perm = np.random.default_rng([seed, index, 1]).permutation(n)
    n_eval = int(math.floor(spec.validation * n))
    n_train = min(n - n_eval, int(math.floor(spec.train_fraction * n)))
    if n_train < 1:
        raise ConfigError(
            f"data_config: dataset '{spec.name}' has no training rows after split "
            f"({n} rows, split.train {spec.train_fraction})"
        )
    if spec.validation > 0 and n_eval < 1:
        raise ConfigError(
            f"data_config: dataset '{spec.name}' has no validation rows after split "
            f"({n} rows, split.validation {spec.validation}); raise the fraction"
        )
    train = ds.select(np.sort(perm[n_eval : n_eval + n_train]))
    held = ds.select(np.sort(perm[:n_eval])) if n_eval else None
    return train, held


def epoch_counts(sizes: list[int], weights: list[float], strategy: str) -> list[int]:
    """Examples of each dataset in one statically mixed epoch (see the module docstring)."""
    live = [(n, w) for n, w in zip(sizes, weights) if w > 0]
    spans = [math.ceil(n / w - 1e-9) for n, w in live]
    total = max(spans) if strategy == "all_exhausted" else min(spans)
    exact = [w * total for w in weights]
    counts = [math.floor(x) for x in exact]
    rest = total - sum(counts)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:rest]:
        counts[i] += 1
    return counts


def static_mix(
    sizes: list[int], weights: list[float] | None, seed: int, strategy: str = "all_exhausted"
) -> tuple[list[int], list[int]]:
    """``(order, per_epoch)``: indices into the datasets laid one after the other, and the
    examples of each dataset in the epoch. Deterministic for ``seed``."""
    import numpy as np

    if weights is None:
        return list(range(sum(sizes))), list(sizes)
    counts = epoch_counts(sizes, weights, strategy)
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    streams = []
    for i, (n, c) in enumerate(zip(sizes, counts)):
        rows = [np.random.default_rng([seed, i, 2, k]).permutation(n) for k in range(-(-c // n))]
        streams.append(np.concatenate(rows)[:c] + offsets[i] if c else np.zeros(0, np.int64))
    which = np.repeat(np.arange(len(sizes)), counts)
    which = which[np.random.default_rng([seed, 3]).permutation(which.size)]
    order = np.empty(which.size, dtype=np.int64)
    for i, stream in enumerate(streams):
        order[which == i] = stream
    return order.tolist(), counts


def examples_per_dataset(mix: DataMix, steps: int, per_step: int) -> dict[str, Any]:
    """For the summary of a static mix: the composition of every whole epoch trained plus
    the last partial epoch in proportion (``per_step``: examples per optimizer step over all
    processes). A plugin's mixer counts its own (the ``trained_examples`` hook)."""
    epoch = sum(mix.per_epoch)
    steps_per_epoch = max(1, math.ceil(epoch / per_step))
    full, rest = divmod(steps, steps_per_epoch)
    part = min(rest * per_step, epoch) / epoch
    return {n: full * c + int(round(c * part)) for n, c in zip(mix.names, mix.per_epoch)}


def check_mixer(config: TrainConfig, framework: Any) -> None:
    """A ``type`` other than ``default`` needs the active plugin that declares it as its
    ``data_mixer``, and an active mixer needs a data config of its type; checked once the
    plugins are resolved, before any model loads."""
    path = getattr(config.data, "data_config", None)
    kind = read_data_config(path, mixer_types(framework.available)).type if path else None
    mixer = framework.data_mixer()
    if kind not in (None, STATIC) and (mixer is None or mixer.data_mixer != kind):
        owner = next(i for i in framework.available.values() if i.cls.data_mixer == kind)
        raise ConfigError(
            f"data_config '{path}': dataprocessor.type is {kind}, which needs the {owner.name} "
            f"plugin: pass {owner.cls.usage_text()}, or set type: default for static mixing"
        )
    if mixer is not None and kind != mixer.data_mixer:
        where = f"data_config '{path}' has dataprocessor.type {kind}" if path else "no data_config"
        raise ConfigError(
            f"the {mixer.name} plugin mixes the datasets of a data config, but there is {where}; "
            f"pass --data_config with dataprocessor.type: {mixer.data_mixer} and two or more "
            "datasets"
        )


def build_from_config(config: TrainConfig, tokenizer: Any, framework: Any) -> tuple[Any, Any]:
    """The training and eval datasets of a run with a data config (see :func:`build_datasets`);
    the plugins' ``prepare_dataset`` runs on the training dataset, which keeps its mix."""
    cfg = read_data_config(config.data.data_config)  # type: ignore[arg-type]
    train_ds, eval_ds = build_datasets(cfg, tokenizer, config.data)
    mix = mix_of(train_ds)
    prepared = framework.prepare_dataset(train_ds, tokenizer, config.training)
    if mix_of(prepared) is None:
        if len(prepared) != len(train_ds):
            raise ConfigError(
                "a plugin's prepare_dataset changed the number of training rows "
                f"({len(train_ds)} -> {len(prepared)}), so the rows no longer map to the "
                "datasets of the data config"
            )
        attach(prepared, mix)  # type: ignore[arg-type]
    path = config.data.validation_data_path
    if path:
        from .data import load_data_file, tokenize_dataset

        extra = tokenize_dataset(
            load_data_file(path, "validation_data_path"), tokenizer, config.data, path
        )
        if eval_ds is None:
            eval_ds = extra
        elif "validation" in eval_ds:
            raise ConfigError(
                "validation_data_path would be evaluated as 'validation', but a dataset of the "
                "data config has that name; rename the dataset"
            )
        else:
            eval_ds = {**eval_ds, "validation": extra}
    return prepared, eval_ds
