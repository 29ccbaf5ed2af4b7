"""``accel.train``: one fine-tuning run, from arguments to a saved model and a summary.

The stages, in order: build the acceleration framework (so config errors surface before
anything heavy loads), tokenizer, architecture check, model loading (a plugin may own it),
PEFT config, plugin augmentation, adapters, patch rules, data, collator, trainer, train,
atomic save, plugin export, summary.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..discovery import discover_for_run
from ..errors import Problems
from ..framework import AccelerationFramework
from .checkpoints import resolve_resume
from .loading import default_loader, load_model_config, load_tokenizer, model_kwargs
from .parsing import TrainConfig, parse_argv, parse_mapping
from .saving import check_save_dir, recover_interrupted_save, save_final_model

logger = logging.getLogger("accel")


@dataclass
class TrainResult:
    """What a run produced; ``summary`` is what the trainer printed at the end."""

    metrics: dict[str, Any]
    summary: dict[str, Any]
    model_dir: str | None
    framework: AccelerationFramework
    log_history: list[dict[str, Any]] = field(default_factory=list)


def train(config: Mapping[str, Any] | TrainConfig | None = None, **kwargs: Any) -> TrainResult:
    """Fine-tune a model. Pass fms-hf-tuning's argument names as keyword arguments
    (``accel.train(model_name_or_path=..., fast_kernels=[True, True, True])``) or a mapping."""
    from ..threads import configure

    configure()  # CPU thread defaults; only the count can change once torch is imported
    _quiet_bars()
    available = discover_for_run()  # a broken or switched-off plugin is named and skipped
    if not isinstance(config, TrainConfig):
        config = parse_mapping({**(config or {}), **kwargs}, available)
    return run(config, available)


def main_from_argv(argv: Sequence[str]) -> TrainResult:
    _quiet_bars()
    available = discover_for_run()  # a broken or switched-off plugin is named and skipped
    return run(parse_argv(argv, available), available)


def _quiet_bars() -> None:
    from .progress import quiet_library_bars

    quiet_library_bars()


def build_framework(config: TrainConfig, available: Mapping[str, Any]) -> AccelerationFramework:
    return AccelerationFramework.from_sources(
        config.acceleration.acceleration_config,
        plugins=config.plugins,
        flags=config.flags,
        available=available,
        command_line=config.command_line,
    )


def run(config: TrainConfig, available: Mapping[str, Any]) -> TrainResult:
    """One training run, phase by phase (each phase is a function below)."""
    framework = check_config(config, available)
    args = config.training
    _configure_logging(args)
    import transformers

    transformers.set_seed(args.seed)
    tokenizer = load_tokenizer(config)
    resume = check_model_and_outputs(config, framework)
    model = build_model(config, framework, tokenizer)
    trainer, train_ds = build_trainer(config, framework, model, tokenizer)
    output, runtime = train_loop(trainer, framework, resume)
    model_dir = save_and_export(trainer, framework)
    summary = summarize(trainer, output, runtime, train_ds, model_dir)
    if trainer.is_world_process_zero():
        print(format_summary(summary), flush=True)
    return TrainResult(
        dict(output.metrics), summary, model_dir, framework, trainer.state.log_history
    )


def check_config(config: TrainConfig, available: Mapping[str, Any]) -> AccelerationFramework:
    """Values, paths, data files, model folder, launch, plugins and their flags: nothing heavy
    loads, and every problem found is reported together. Returns the run's framework."""
    from . import distributed
    from .datamix import check_mixer
    from .preflight import check_before_loading

    problems = Problems()
    check_before_loading(config, problems)
    problems.check(distributed.check_launch, config)
    framework = problems.check(build_framework, config, available)
    if framework is not None:
        problems.check(check_mixer, config, framework)
    problems.raise_any()  # so framework is set
    return framework  # type: ignore[return-value]


def check_model_and_outputs(config: TrainConfig, framework: AccelerationFramework) -> str | None:
    """With the model's config.json read: the plugins' checks of the model and the run, the
    save folder (a killed save's folder made one model again), and the checkpoint to resume
    from (damaged, model-only and foreign ones refused before the model loads)."""
    args = config.training
    model_config = load_model_config(config.model.model_name_or_path)
    framework.check_model(model_config, config.model.model_name_or_path)
    framework.check_run(config, model_config)
    check_save_dir(args.save_model_dir)
    recover_interrupted_save(args.save_model_dir)
    return resolve_resume(
        args.resume_from_checkpoint,
        args.output_dir,
        model_config=model_config,
        tuning=config.tuning,
        warn=args.process_index == 0,
    )


def build_model(config: TrainConfig, framework: AccelerationFramework, tokenizer: Any) -> Any:
    """Load the model (a plugin's loader or the default), let plugins change it, apply the
    adapters, then the plugins' patches (one transaction)."""
    import torch

    from .tuning import build_peft_config

    args = config.training
    model = framework.load_model(
        config.model.model_name_or_path, default=default_loader, **model_kwargs(config, torch)
    )
    if args.gradient_checkpointing:
        model.config.use_cache = False
    peft_config = build_peft_config(model, tokenizer, config.tuning)
    model, peft_config = framework.augment_model(model, args, peft_config)
    if peft_config is not None:
        import peft

        model = peft.get_peft_model(model, peft_config)
    framework.apply_patches(model)
    return model


def build_trainer(
    config: TrainConfig, framework: AccelerationFramework, model: Any, tokenizer: Any
) -> tuple[Any, Any]:
    """The datasets, the collator and the trainer with its callbacks; returns the trainer
    and the training dataset."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from . import distributed
    from .callbacks import JsonlLogCallback, PluginSaveCallback
    from .ddp import set_find_unused
    from .progress import install as install_progress_bar
    from .trainer import AccelTrainer

    args = config.training
    train_ds, eval_ds = _datasets(config, tokenizer, framework)
    default_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    collator = framework.data_collator(tokenizer, args, default_collator)
    args.remove_unused_columns = False
    set_find_unused(args, model)  # off unless a trainable module can be skipped (MoE experts)
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # pinning needs an accelerator; avoids a warning
    trainer = AccelTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        framework=framework,
        callbacks=[PluginSaveCallback(framework, model)],
    )
    for callback in framework.callbacks(model, trainer.accelerator):
        trainer.add_callback(callback)
    # after the plugins' callbacks, so the JSONL log holds the metrics they add in on_log
    trainer.add_callback(JsonlLogCallback(args.output_dir, trainer))
    distributed.check_engaged(trainer, config)
    trainer.add_callback(distributed.make_engaged_check_callback(trainer))
    install_progress_bar(trainer)  # one bar with loss and tokens/s (ACCEL_PROGRESS=verbose: all)
    return trainer, train_ds


def train_loop(
    trainer: Any, framework: AccelerationFramework, resume: str | None
) -> tuple[Any, float]:
    """The start-of-training block, then the training loop; returns its output and seconds."""
    if trainer.is_world_process_zero():
        print(framework.report(), flush=True)
        if resume:
            print(f"accel: resuming from {resume}", flush=True)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    return output, time.perf_counter() - start


def save_and_export(trainer: Any, framework: AccelerationFramework) -> str | None:
    """The final model into ``save_model_dir`` (when set), then the plugins' exports of it."""
    args = trainer.args
    if not args.save_model_dir:
        return None
    model_dir = save_final_model(trainer, args.save_model_dir)
    if trainer.is_world_process_zero():
        framework.export(trainer.model, model_dir)  # after a save only; its absolute path
    return model_dir


def summarize(
    trainer: Any, output: Any, runtime: float, train_ds: Any, model_dir: str | None
) -> dict[str, Any]:
    """The training summary's values, in the order it prints them."""
    from . import distributed

    args = trainer.args
    tokens, real_tokens = trainer.global_token_counts()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "runtime_s": round(runtime, 2),
        "train_steps": trainer.state.global_step,
        "processes": args.world_size,
        "distributed": distributed.describe(trainer),
        **(
            {"ddp_find_unused_parameters": args.ddp_find_unused_parameters}
            if args.world_size > 1
            else {}
        ),
        "train_tokens": tokens,
        "train_tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else math.nan,
        "dataset_tokens_per_s": round(real_tokens / runtime, 1) if runtime > 0 else math.nan,
        # with no loss logged (logging_steps > max_steps, logging_first_step off) the run's
        # mean loss is all there is: say so rather than print None
        **({"first_loss": losses[0]} if losses else {"first_loss": "(not logged)"}),
        "final_loss": losses[-1] if losses else output.training_loss,
        **_mix_summary(train_ds, trainer),
        "model_saved_to": model_dir or "(not saved: set save_model_dir)",
        "logs": _logs_path(args.output_dir),
        "cpu_threads": _threads(),
    }


def _threads() -> str:
    from ..threads import describe

    return describe()


def _logs_path(output_dir: str) -> str:
    path = Path(output_dir).resolve() / "training_logs.jsonl"
    return str(path) if path.is_file() else "(none written: no step was logged)"


def format_summary(summary: Mapping[str, Any]) -> str:
    width = max(len(k) for k in summary)
    lines = ["", "=" * 60, "accel training summary", "-" * 60]
    lines += [f"{k:<{width}} : {_shown(v)}" for k, v in summary.items()]
    lines.append("=" * 60)
    return "\n".join(lines)


def _shown(value: Any) -> Any:
    """Floats to 4 significant digits (whole numbers from 1000 up): 4.142, not 4.141703287."""
    if not isinstance(value, float) or not math.isfinite(value):
        return value
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _configure_logging(args: Any) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO if args.process_index == 0 else logging.WARNING)


def _mix_summary(train_ds: Any, trainer: Any) -> dict[str, Any]:
    from .datamix import examples_per_dataset, mix_of

    mix = mix_of(train_ds)
    if mix is None:
        return {}
    trained = trainer.framework.trained_examples()
    if trained is not None:
        return {"examples_per_dataset": dict(trained)}
    a = trainer.args
    per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
    return {"examples_per_dataset": examples_per_dataset(mix, trainer.state.global_step, per_step)}


def _datasets(
    config: TrainConfig, tokenizer: Any, framework: AccelerationFramework
) -> tuple[Any, Any]:
    from .data import load_data_file, tokenize_dataset

    args = config.training
    if config.data.data_config:
        from .datamix import build_from_config

        with args.main_process_first(desc="preparing datasets"):
            return build_from_config(config, tokenizer, framework)
    with args.main_process_first(desc="preparing datasets"):
        train_raw = load_data_file(config.data.training_data_path)
        train_ds = tokenize_dataset(
            train_raw, tokenizer, config.data, config.data.training_data_path
        )
        train_ds = framework.prepare_dataset(train_ds, tokenizer, args)
        eval_ds = None
        if config.data.validation_data_path:
            eval_raw = load_data_file(config.data.validation_data_path, "validation_data_path")
            eval_ds = tokenize_dataset(
                eval_raw, tokenizer, config.data, config.data.validation_data_path
            )
    return train_ds, eval_ds
