"""The Trainer's own checkpoint methods (save, load, the resumed schedule), mixed into
:class:`accel.trainer.trainer.AccelTrainer`. Which checkpoint a run resumes from, and
whether it can be trusted, is :mod:`accel.trainer.checkpoints`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoints import TRAINER_STATE

logger = logging.getLogger("accel")


def schedule_mismatch_message(
    saved_max_steps: int, max_steps: int, step: int, lrs: Iterable[float]
) -> str:
    """The warning for a resume whose total step count changed (see CheckpointMixin)."""
    lr = ", ".join(dict.fromkeys(f"{x:.3g}" for x in lrs))  # one per distinct group rate
    return (
        f"the checkpoint was trained towards max_steps {saved_max_steps}, this run goes "
        f"to {max_steps}: the learning-rate schedule is rebuilt for {max_steps} steps and "
        f"continues from step {step} at lr {lr} (the restored optimizer held the old "
        "schedule's rate)"
    )


class CheckpointMixin:
    """Trainer methods around checkpoints; mixed into AccelTrainer before ``Trainer``.

    - After the optimizer and scheduler are restored, a changed total step count (a larger or
      smaller ``max_steps`` than the checkpoint's run) rebuilds the schedule: transformers
      restores ``scheduler.pt`` into a scheduler built for the new total, but the optimizer
      keeps the old schedule's rate for one step, so a run resumed after its linear schedule
      reached 0 would train at learning rate 0. The rate is set from the new schedule at the
      restored step, with a warning.
    - Weight files of a checkpoint get the user's umask (safetensors writes them 0600).
    - A model sharded at load time (``fsdp_size``, expert parallelism), which transformers
      refuses to checkpoint, is checkpointed and resumed as sharded DCP state
      (:mod:`accel.trainer.sharded_checkpoint`); ``save_only_model`` keeps transformers' own
      gathered save.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from .sharded_checkpoint import is_sharded_at_load

        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        model = kwargs.get("model", args[0] if args else None)
        self._dcp_checkpoints = bool(
            train_args is not None and is_sharded_at_load(model) and not train_args.save_only_model
        )
        if not self._dcp_checkpoints:
            super().__init__(*args, **kwargs)
            return
        # transformers refuses save_strategy != "no" for such a model unless save_only_model is
        # set; the checkpoints below hold the whole training state, so the refusal is skipped.
        train_args.save_only_model = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            train_args.save_only_model = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Inside a checkpoint of a model sharded at load time, a full model is not gathered:
        its shards go into the DCP state (see ``_save_optimizer_and_scheduler``); the config
        and tokenizer are written for the export. A PEFT adapter is saved as usual."""
        from .sharded_checkpoint import is_peft

        inside = self._dcp_checkpoints and getattr(self, "_saving_checkpoint", False)
        if not inside or is_peft(self.model):  # type: ignore[attr-defined]
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        if self.args.should_save:  # type: ignore[attr-defined]
            import torch

            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self.model.config.save_pretrained(output_dir)  # type: ignore[attr-defined]
            if self.processing_class is not None:  # type: ignore[attr-defined]
                self.processing_class.save_pretrained(output_dir)  # type: ignore[attr-defined]
            torch.save(self.args, Path(output_dir) / "training_args.bin")  # type: ignore[attr-defined]

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._dcp_checkpoints:
            return super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        import torch

        from .sharded_checkpoint import layout_of, save_state

        args = self.args  # type: ignore[attr-defined]
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # type: ignore[attr-defined]
        save_state(self.model, optimizer, output_dir, layout_of(self.model, args.world_size))  # type: ignore[attr-defined]
        if args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / "scheduler.pt")  # type: ignore[attr-defined]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        from .sharded_checkpoint import MARKER, has_layout, load_model_state

        if not self._dcp_checkpoints:
            if (Path(resume_from_checkpoint) / MARKER).is_file():
                raise ConfigError(
                    f"{resume_from_checkpoint} holds the sharded state of a model sharded at "
                    "load time (fsdp_size, --fast_moe N): resume it with such a run, or turn it "
                    "into a plain model with `accel moe export`"
                )
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        if not has_layout(resume_from_checkpoint):
            raise ConfigError(
                f"{resume_from_checkpoint} was not written by a run sharded at load time, whose "
                "model this run shards: resume it with the kind of run that wrote it"
            )
        load_model_state(self.model, resume_from_checkpoint)  # type: ignore[attr-defined]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._dcp_checkpoints and checkpoint is not None:
            import torch

            from .sharded_checkpoint import load_optimizer_state

            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # type: ignore[attr-defined]
            load_optimizer_state(self.model, optimizer, checkpoint)  # type: ignore[attr-defined]
            scheduler = torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True)
            self.lr_scheduler.load_state_dict(scheduler)  # type: ignore[attr-defined]
        else:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is None:
            return
        try:
            saved = json.loads((Path(checkpoint) / TRAINER_STATE).read_text()).get("max_steps")
        except (OSError, ValueError):
            return
        state, scheduler = self.state, self.lr_scheduler  # type: ignore[attr-defined]
        if not isinstance(saved, int) or saved == state.max_steps or scheduler is None:
            return
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is None:  # not a LambdaLR: nothing to recompute, say so
            if self.is_world_process_zero():  # type: ignore[attr-defined]
                logger.warning(
                    "the checkpoint was trained towards max_steps %s, this run goes to "
                    "%s; the restored %s scheduler is kept as it is",
                    saved,
                    state.max_steps,
                    type(scheduler).__name__,
                )
            return
        step = scheduler.last_epoch
        lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, lambdas)]
        groups = scheduler.optimizer.param_groups
        if all(abs(g["lr"] - lr) <= 1e-12 for g, lr in zip(groups, lrs)):
            return  # e.g. a constant schedule: the total step count does not matter
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
        if self.is_world_process_zero():  # type: ignore[attr-defined]
            logger.warning(schedule_mismatch_message(saved, state.max_steps, step, lrs))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._saving_checkpoint = True  # save_model: inside a checkpoint (see there)
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._saving_checkpoint = False
        if self.args.should_save:  # type: ignore[attr-defined]
            from .saving import apply_umask

            run_dir = self._get_output_dir(trial=trial)  # type: ignore[attr-defined]
            folder = Path(run_dir) / f"checkpoint-{self.state.global_step}"  # type: ignore[attr-defined]
            if folder.is_dir():
                apply_umask(p for p in folder.rglob("*.safetensors"))
