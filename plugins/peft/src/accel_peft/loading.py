"""Loading the frozen 4-bit base: bitsandbytes quantizes while loading, GPTQ checkpoints come
quantized. Each loader first reads ``config.json`` (cheap), so a model of the wrong kind is an
error before any weight loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accel.api import ConfigError

from .packages import require

#: bits and group sizes both of gptqmodel's training kernels run (torch on CPU, Triton on CUDA;
#: the torch kernel alone also runs 3, 5, 6 and 7 bits)
GPTQ_BITS = (2, 4, 8)
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


def quantization_config(name_or_path: str) -> dict[str, Any] | None:
    """The ``quantization_config`` of a model's config.json (``None``: not quantized)."""
    from transformers import AutoConfig

    local = Path(name_or_path).expanduser() / "config.json"
    if local.is_file():
        data = json.loads(local.read_text()).get("quantization_config")
    else:
        data = getattr(AutoConfig.from_pretrained(name_or_path), "quantization_config", None)
    if data is None:
        return None
    return data if isinstance(data, dict) else data.to_dict()


def quant_method(name_or_path: str) -> str | None:
    config = quantization_config(name_or_path)
    return None if config is None else str(config.get("quant_method", "unknown"))


def _device_map() -> dict[str, Any] | str:
    """This process's device: its CUDA device under a launcher, else the CPU."""
    import os

    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return "cpu"


#: why transformers' load-time FSDP2 (``fsdp_size``) cannot shard each kind of quantized base
_SHARDED_LOADING_WHY = {
    "--bnb_qlora": "transformers applies FSDP2 before the weights load, sharding each weight "
    "in its full-precision shape, and bitsandbytes then stores the packed 4-bit form, which "
    "those shards no longer describe (FSDP fails on the first forward)",
    "--auto_gptq": "transformers applies FSDP2 before the weights load, when gptqmodel's packed "
    "weights are still buffers, which FSDP replicates on every process instead of sharding",
}


def _no_sharded_loading(model_kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    kwargs = dict(model_kwargs)
    if kwargs.pop("distributed_config", None) is not None:
        raise ConfigError(
            f"{what} cannot be combined with fsdp_size (transformers' sharded loading): "
            f"{_SHARDED_LOADING_WHY[what]}. Drop fsdp_size: under torchrun the run is then DDP, "
            "and FSDP2 applied to the loaded model (fully_shard per layer, as accelerate's FSDP2 "
            "does on GPUs: `accelerate launch --config_file` with fsdp_version 2) shards the "
            "4-bit weights with their layers"
        )
    return kwargs


def resolve_dtype(name_or_path: str, dtype: Any) -> Any:
    """``torch_dtype`` as a torch dtype; ``auto`` is the checkpoint's own (fp32 if none)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    from transformers import AutoConfig

    stored = getattr(AutoConfig.from_pretrained(name_or_path), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def load_bnb_4bit(name_or_path: str, model_kwargs: dict[str, Any], quant_type: str) -> Any:
    """Load ``name_or_path`` with every linear layer but the output layer in bitsandbytes
    4-bit: double quantization on, compute dtype and storage dtype = ``torch_dtype`` (a single
    storage dtype lets FSDP shard the packed weights with the rest)."""
    method = quant_method(name_or_path)
    if method == "gptq":
        raise ConfigError(
            f"model '{name_or_path}' is a GPTQ checkpoint; --bnb_qlora quantizes a "
            "full-precision model: pass --auto_gptq triton_v2 instead"
        )
    if method is not None and method != "bitsandbytes":
        raise ConfigError(
            f"model '{name_or_path}' is already quantized (quant_method '{method}'); "
            "--bnb_qlora needs a full-precision model"
        )
    require("bitsandbytes", "--bnb_qlora")
    from transformers import AutoModelForCausalLM
    from transformers import BitsAndBytesConfig as HFBitsAndBytesConfig

    kwargs = _no_sharded_loading(model_kwargs, "--bnb_qlora")
    dtype = resolve_dtype(name_or_path, kwargs.get("dtype"))
    kwargs["dtype"] = dtype
    kwargs["quantization_config"] = HFBitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )
    kwargs["device_map"] = _device_map()
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def gptq_backend() -> str:
    """gptqmodel's backend for this device: Triton on CUDA, its torch kernel on CPU."""
    import torch

    return "triton" if torch.cuda.is_available() else "torch"


def check_gptq_config(name_or_path: str) -> dict[str, Any]:
    """The checkpoint's GPTQ settings; errors for a model that is not GPTQ or that gptqmodel's
    training kernels cannot run."""
    config = quantization_config(name_or_path)
    method = None if config is None else config.get("quant_method")
    if method != "gptq":
        what = "is not quantized" if config is None else f"is quantized with '{method}'"
        raise ConfigError(
            f"--auto_gptq needs a GPTQ checkpoint, but model '{name_or_path}' {what} (no "
            "quantization_config with quant_method 'gptq' in its config.json). Quantize it "
            "first: accel quantize <model_dir> <output_dir> --bits 4 --group_size 128 "
            "--calibration <data file>; or train it with --bnb_qlora nf4 instead"
        )
    check_bits(config.get("bits"), config.get("group_size"), f"model '{name_or_path}'")
    return config


def check_bits(bits: Any, group_size: Any, where: str) -> None:
    if bits not in GPTQ_BITS:
        raise ConfigError(
            f"{where}: GPTQ bits {bits!r} is not supported by gptqmodel's kernels; use one of "
            f"{', '.join(map(str, GPTQ_BITS))} (4 is the usual)"
        )
    if group_size not in GPTQ_GROUP_SIZES:
        raise ConfigError(
            f"{where}: GPTQ group_size {group_size!r} is not supported; use one of "
            f"{', '.join(map(str, GPTQ_GROUP_SIZES))} (-1 = one group per column; 128 is "
            "the usual)"
        )


def load_gptq(name_or_path: str, model_kwargs: dict[str, Any]) -> Any:
    """Load a GPTQ checkpoint through transformers' GPTQ integration (gptqmodel + optimum)
    with the device's backend."""
    config = check_gptq_config(name_or_path)
    require("gptq", "--auto_gptq")
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs = _no_sharded_loading(model_kwargs, "--auto_gptq")
    kwargs["dtype"] = resolve_dtype(name_or_path, kwargs.get("dtype"))
    kwargs["quantization_config"] = GPTQConfig(
        bits=config["bits"], group_size=config["group_size"], backend=gptq_backend()
    )
    kwargs["device_map"] = _device_map()
    import warnings

    with warnings.catch_warnings():
        # passing a GPTQConfig only to choose the backend is what transformers' warning means
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    packed_as_parameters(model)
    if gptq_backend() == "torch":
        eager_dequantize(model)
    return model


def eager_dequantize(model: Any) -> int:
    """Run gptqmodel's torch-kernel dequantization eagerly instead of through the
    ``torch.compile`` wrapper it installs on every layer: on CPU, inductor's C++ compile costs
    6-20 s on the first step and ~0.5-1 s per new layer shape in every process, while the
    compiled dequantization saves ~25% of a step share of a few percent (measured on the
    127M benchmark model: 20 vs 27 ms for a 768x2048 layer, 1 thread). Returns the layers
    changed."""
    changed = 0
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel") and "dequantize_weight" in vars(module):
            del module.dequantize_weight  # the instance's compiled wrapper; the method remains
            changed += 1
    return changed


#: the tensors of a gptqmodel GPTQ linear that hold the weight (``wf_unsqueeze_*``, a few
#: shift constants, stay buffers)
GPTQ_PACKED = ("qweight", "qzeros", "scales", "g_idx", "bias")


def packed_as_parameters(model: Any) -> int:
    """Re-register every GPTQ linear's packed weight tensors (int32 codes and zero points, fp16
    scales, group index, bias) as frozen parameters instead of buffers, so FSDP2's
    ``fully_shard`` shards them with the layer (it shards parameters and replicates buffers;
    its all-gather takes mixed dtypes as bytes). The state dict and the kernels' attribute
    access are unchanged. Returns the number of tensors moved."""
    from torch import nn

    from .adapters import is_quantized_linear

    moved = 0
    for module in model.modules():
        if not (is_quantized_linear(module) and type(module).__module__.startswith("gptqmodel")):
            continue
        for name in GPTQ_PACKED:
            tensor = module._buffers.get(name)
            if tensor is None or name in module._non_persistent_buffers_set:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            moved += 1
    return moved
