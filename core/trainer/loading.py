"""Model and tokenizer loading, with the cheap checks of a local model folder done first.

transformers reports a wrong path as a hub error ("Repo id must be in the form ..."), a missing
config.json or an unknown ``model_type`` as a traceback, and a truncated weights file deep inside
safetensors. :func:`check_model_source` reads only small files (config.json, index files, the
safetensors headers) so these are clear errors before anything heavy loads; the loaders turn
what can still fail at load time into errors that name the source.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from .parsing import TrainConfig

# a hub id is 'name' or 'namespace/name' (huggingface_hub's validate_repo_id rule)
_REPO_ID = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def is_local(name: str) -> bool:
    """True when ``name`` is (meant as) a local path rather than a hub id."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", "./", "../", "~", "."))
        or not _REPO_ID.match(name)
    )


def check_model_source(name: str, key: str = "model_name_or_path") -> None:
    """Check a local model folder: it exists, config.json parses with a known ``model_type``,
    and the weights it names are all there and complete. Hub ids are left to the loader."""
    if not is_local(name):
        return
    folder = Path(name).expanduser()
    if not folder.exists():
        raise ConfigError(
            f"{key} '{name}' does not exist; pass a model folder (written by save_pretrained) "
            "or a hub id such as 'org/name'"
        )
    if not folder.is_dir():
        raise ConfigError(
            f"{key} '{name}' is a file; pass the model's folder (the one holding config.json)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key} '{name}' {_not_a_model(folder)}")
    model_type = _read_model_type(config_file)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        import transformers

        raise ConfigError(
            f"{config_file}: model_type '{model_type}' is not known to transformers "
            f"{transformers.__version__}.{did_you_mean(model_type, CONFIG_MAPPING_NAMES)} "
            "Fix config.json or upgrade transformers."
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{key} '{name}' is a '{model_type}' model, which has no causal language-model head "
            "in transformers (AutoModelForCausalLM); pass a decoder model such as llama, "
            "granite or mistral"
        )
    _check_weights(folder, key, name)


def _not_a_model(folder: Path) -> str:
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return "is an empty folder; pass a folder holding a saved model (config.json and weights)"
    if "adapter_config.json" in entries:
        return (
            "holds a PEFT adapter, not a model (no config.json); pass its base model "
            "(base_model_name_or_path in adapter_config.json)"
        )
    nested = sorted(p.parent.name for p in folder.glob("*/config.json"))
    hint = f" Did you mean '{folder / nested[-1]}'?" if nested else ""
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"has no config.json (it holds {shown}), so it is not a saved model.{hint}"


def _read_model_type(config_file: Path) -> str:
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{config_file}:{err.lineno}: not valid JSON ({err.msg}); fix or re-save the model"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {config_file}: {err}") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise ConfigError(f"{config_file} has no model_type; it is not a transformers model config")
    return str(data["model_type"])


def _check_weights(folder: Path, key: str, name: str) -> None:
    present = [f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        raise ConfigError(
            f"{key} '{name}' has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "the save was incomplete: save or download the model again"
        )
    files: list[Path] = []
    for entry in present:
        if entry.endswith(".index.json"):
            files += _shards(folder / entry)
        else:
            files.append(folder / entry)
    for file in files:
        if file.suffix == ".safetensors":
            _check_safetensors(file)
        elif file.suffix == ".bin":
            _check_torch_file(file)


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{index} is not a valid weights index ({err}); save the model again"
        ) from None
    shards = sorted({index.parent / str(f) for f in weight_map.values()})
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ConfigError(
            f"{index} lists weight files that are missing: {', '.join(missing)}; "
            "the save or download was incomplete: save or download the model again"
        )
    return shards


def _truncated(file: Path, size: int, expected: int) -> ConfigError:
    return ConfigError(
        f"weights file {file} is truncated ({size} of {expected} bytes): the save or download "
        "was interrupted; save or download the model again"
    )


def _check_safetensors(file: Path) -> None:
    """The header says how long the file must be: compare without reading the tensors."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _truncated(file, size, 8)
        (length,) = struct.unpack("<Q", head)
        if size < 8 + length:
            raise _truncated(file, size, 8 + length)
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(
                f"weights file {file} is damaged (its header is not valid); "
                "save or download the model again"
            ) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise _truncated(file, size, expected)


def _check_torch_file(file: Path) -> None:
    with file.open("rb") as fh:
        zipped = fh.read(2) == b"PK"
    if zipped and not zipfile.is_zipfile(file):
        raise ConfigError(
            f"weights file {file} is truncated or damaged (incomplete zip archive); "
            "save or download the model again"
        )


def check_tokenizer_source(config: TrainConfig) -> None:
    """A tokenizer is where the arguments say: its own path, or files next to the model."""
    name = config.model.tokenizer_name_or_path
    key = "tokenizer_name_or_path" if name else "model_name_or_path"
    name = name or config.model.model_name_or_path
    if not is_local(name):
        return
    folder = Path(name).expanduser()
    if not folder.exists():
        raise ConfigError(f"{key} '{name}' does not exist; pass a folder or a hub id 'org/name'")
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        fix = (
            "pass a folder holding a saved tokenizer"
            if key == "tokenizer_name_or_path"
            else "pass tokenizer_name_or_path, or save the tokenizer next to the model"
        )
        raise ConfigError(
            f"{key} '{name}' has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            f"...); {fix}"
        )


def _load_error(what: str, source: str, err: BaseException) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"could not load the {what} from '{source}': {first}")


def load_tokenizer(config: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    source = config.model.tokenizer_name_or_path or config.model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer", source, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _load_error("model config", name, err) from None


def model_kwargs(config: TrainConfig, torch: Any) -> dict[str, Any]:
    dtype = config.model.torch_dtype
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    from .distributed import distributed_config

    if (dist_config := distributed_config(config)) is not None:
        kwargs["distributed_config"] = dist_config
    return kwargs


def default_loader(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained``; a damaged weights file is named, not traced."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except SafetensorError as err:
        raise ConfigError(
            f"the weights of '{name_or_path}' are damaged ({err}); save or download the model again"
        ) from None
    except OSError as err:
        raise _load_error("model", name_or_path, err) from None
    except (ValueError, ImportError) as err:
        attention = kwargs.get("attn_implementation")
        if attention and ("attn" in str(err) or "ttention" in str(err)):
            what = f"model with attn_implementation '{attention}'"
            raise _load_error(what, name_or_path, err) from None
        raise
