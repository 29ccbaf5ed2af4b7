"""The odm plugin: online mixing of the datasets of a ``type: odm`` data config.

Through the contract's hooks only:

- ``train_dataloader``: the loader whose batch sampler draws each example's dataset from the
  EXP3 bandit (:mod:`.sampler`);
- ``patch_rules``: the model's own ``loss_function`` is wrapped (an ``apply`` rule on that
  model instance): it computes the loss as before and, from the same logits, each example's
  loss or prediction entropy (per packed segment under padding-free), credited to the dataset
  the example came from (the rewards that read ``forward``, :mod:`.records`). No second
  forward; nothing global is patched;
- ``callbacks``: a ``TrainerCallback`` that updates the bandit every ``update_interval``
  steps (forward rewards: summed over all ranks, so every rank holds the same weights)
  or after each evaluation (validation rewards: ``eval_<dataset>_loss`` of every dataset's
  validation split), writes ``odm.jsonl`` and restores the state on resume;
- ``on_save``: the sampler and bandit state go into every checkpoint (``odm_state.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from accel.api import AccelerationPlugin, ConfigError, Flag, PatchRule, hook

from . import records

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from .sampler import OdmBatchSampler

PATH = "training.odm.odm"
STATE_FILE = "odm_state.json"
LOG_FILE = "odm.jsonl"


@dataclass
class OdmConfig:
    reward_type: str = field(
        default="train_loss",
        metadata={"help": records.help_text()},
    )
    gamma: float = field(
        default=0.1, metadata={"help": "exploration: every probability stays >= gamma / K"}
    )
    eta: float = field(default=0.1, metadata={"help": "EXP3 step size"})
    update_interval: int = field(
        default=1,
        metadata={"help": "update the weights every N optimizer steps (all but validation_loss)"},
    )
    sampling_interval: int = field(
        default=1, metadata={"help": "draw a dataset every N examples (they come from it)"}
    )

    def __post_init__(self) -> None:
        self.reward_type = records.lookup(self.reward_type).name
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        for name in ("update_interval", "sampling_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def merge_options(plugin: OdmConfig, from_data_config: dict[str, Any], where: str) -> OdmConfig:
    """The data config's ``dataprocessor.odm`` keys over the plugin's; a key set to different
    values in both places is an error."""
    known = {f.name: f.default for f in fields(OdmConfig)}
    for key, value in from_data_config.items():
        if key not in known:
            raise ConfigError(
                f"{where}: dataprocessor.odm: unknown key '{key}'; valid keys: {', '.join(known)}"
            )
        mine = getattr(plugin, key)
        if mine != known[key] and mine != value:
            raise ConfigError(
                f"odm option '{key}' is {mine!r} in the plugin config but {value!r} in "
                f"{where} dataprocessor.odm; set it in one place"
            )
    try:
        return replace(plugin, **from_data_config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: dataprocessor.odm: {err}") from None


class OdmPlugin(AccelerationPlugin):
    """Online data mixing over the datasets of a data config (EXP3)."""

    name = "odm"
    config_paths = (PATH,)
    data_mixer = "odm"
    config_schema = OdmConfig
    flags = (
        Flag(
            "odm",
            PATH,
            f"reward_type: {', '.join(records.names())}",
            fields=("reward_type",),
        ),
    )

    def __init__(self, configs: dict[str, Any]) -> None:
        super().__init__(configs)
        self.options: OdmConfig = self.config()
        self.sampler: OdmBatchSampler | None = None
        self.names: list[str] = []
        # per dataset since the last update: [sum of example losses, examples], kept on the
        # logits' device so a training forward never waits for a copy to the host
        self.totals: Any = None
        self.eval_losses: dict[str, float] = {}
        self.accelerator: Any = None
        self.output_dir: str | None = None
        self.is_main = True
        self.history: list[tuple[int, list[float]]] = []  # (step, weights) of every update
        self.signal: records.Signal = records.Signal()
        self._log: Any = None  # odm.jsonl, open in append mode while training

    # -- hooks ---------------------------------------------------------------------------

    @hook
    def patch_rules(self, model: Any) -> Sequence[PatchRule]:
        from accel.api import set_attribute

        base = model.get_base_model() if hasattr(model, "get_base_model") else model

        def install(module: Any) -> Any:
            from transformers.loss.loss_utils import ForCausalLMLoss

            inner = module.loss_function
            default = inner is ForCausalLMLoss

            def loss_function(
                logits: Any = None, labels: Any = None, vocab_size: Any = None, **kwargs: Any
            ) -> Any:
                if not self._records(module, labels):
                    return inner(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
                cu = kwargs.get("cu_seq_lens_q")
                if default and self._one_pass(logits, vocab_size, kwargs):
                    from .rewards import causal_lm_loss_and_sums

                    packed = cu is not None and labels.shape[0] == 1
                    loss, sums, tokens = causal_lm_loss_and_sums(
                        logits,
                        labels,
                        kwargs.get("num_items_in_batch"),
                        cu if packed else None,
                        entropy=self.reward.needs_entropy,
                    )
                    self.credit(sums, tokens)
                    return loss
                loss = inner(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
                self.record(logits, labels, vocab_size, cu)
                return loss

            return set_attribute(module, "_loss_function", loss_function)

        return [PatchRule("train_loss_reward", "odm", match=lambda m: m is base, apply=install)]

    @hook
    def train_dataloader(self, dataset: Any, collator: Any, train_args: Any) -> DataLoader:
        from accel.api import mix_of

        from .bandit import Exp3
        from .loader import OdmDataLoader
        from .sampler import OdmBatchSampler

        mix = mix_of(dataset)
        if mix is None or mix.type != "odm":
            raise ConfigError(
                "odm mixes the datasets of a data config: pass --data_config with "
                "dataprocessor.type: odm and two or more datasets"
            )
        self.options = merge_options(self.options, dict(mix.options), "data_config")
        opts = self.options
        if train_args.dataloader_num_workers:
            raise ConfigError(
                "odm draws every batch after the previous step's weight update, so batches "
                "cannot be prepared ahead: set dataloader_num_workers 0"
            )
        if self.reward.reads == "validation":
            missing = [n for n in mix.names if n not in mix.eval_names]
            if missing or train_args.eval_strategy == "no":
                raise ConfigError(
                    f"reward_type {opts.reward_type} needs a validation split of every dataset "
                    f"(split: {{train: 0.9, validation: 0.1}}; missing for "
                    f"{', '.join(missing) or 'none'}) and eval_strategy steps with eval_steps"
                )
        self.names = list(mix.names)
        self.totals = _zeros(len(self.names))
        self.signal = self.reward.signal(len(self.names))
        bandit = Exp3(len(self.names), opts.gamma, opts.eta, mix.weights)
        self.sampler = OdmBatchSampler(
            mix.sizes,
            bandit,
            batch_size=train_args.per_device_train_batch_size,
            num_replicas=train_args.world_size,
            rank=train_args.process_index,
            seed=mix.seed,
            sampling_interval=opts.sampling_interval,
            track=self.reward.reads == "forward",
        )
        self.ignore_data_skip = bool(train_args.ignore_data_skip)
        self.output_dir = train_args.output_dir
        self.is_main = train_args.process_index == 0
        return OdmDataLoader(dataset, batch_sampler=self.sampler, collate_fn=collator)

    @hook
    def callbacks(self, accelerator: Any) -> Sequence[TrainerCallback]:
        self.accelerator = accelerator
        return [OdmCallback(self)]

    @hook
    def on_save(self, checkpoint_dir: str) -> None:
        if self.sampler is None or not self.is_main:
            return
        state = {
            "names": self.names,
            "options": {f.name: getattr(self.options, f.name) for f in fields(OdmConfig)},
            "sampler": self.sampler.state_dict(),
            "totals": self.totals.tolist(),
            "signal": self.signal.state_dict(),
            "eval_losses": self.eval_losses,
        }
        target = Path(checkpoint_dir) / STATE_FILE
        tmp = target.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, target)

    @hook
    def trained_examples(self) -> dict[str, int] | None:
        """The examples drawn from each dataset so far (the summary's examples_per_dataset)."""
        if self.sampler is None:
            return None
        return dict(zip(self.names, self.sampler.counts))

    @hook
    def report_lines(self) -> Sequence[str]:
        o = self.options
        return [
            f"EXP3 reward {o.reward_type}, gamma {o.gamma}, eta {o.eta}, update every "
            f"{o.update_interval} step(s), dataset drawn every {o.sampling_interval} example(s)"
        ]

    # -- rewards -------------------------------------------------------------------------

    @property
    def reward(self) -> records.Reward:
        return records.lookup(self.options.reward_type)

    def _records(self, module: Any, labels: Any) -> bool:
        import torch

        return (
            self.sampler is not None
            and getattr(self.sampler, "track", False)
            and labels is not None
            and module.training
            and torch.is_grad_enabled()
        )

    def record(self, logits: Any, labels: Any, vocab_size: Any, cu_seq_lens: Any) -> None:
        """Credit each example's reward (its mean token loss, or entropy statistics) from
        this training forward to its dataset."""
        from .rewards import per_example_sums

        kind = self.options.reward_type
        if logits is None or (vocab_size is not None and logits.shape[-1] != vocab_size):
            raise ConfigError(
                f"odm reward_type {kind} reads the logits of the training forward, but "
                "they are not built here (the fused linear cross-entropy of fused_ops "
                "fast_loss); set fast_loss: cross_entropy, or reward_type validation_loss"
            )
        packed = cu_seq_lens is not None and labels.shape[0] == 1
        sums, tokens = per_example_sums(
            logits, labels, cu_seq_lens if packed else None, entropy=self.reward.needs_entropy
        )
        self.credit(sums, tokens)

    def _one_pass(self, logits: Any, vocab_size: Any, kwargs: dict[str, Any]) -> bool:
        """The loss and the reward can come from one pass: transformers' default causal-LM
        loss with real logits and no custom label handling."""
        return (
            self.reward.reads == "forward"
            and logits is not None
            and logits.shape[-1] == vocab_size
            and kwargs.get("shift_labels") is None
            and kwargs.get("ignore_index", -100) == -100
        )

    def credit(self, sums: Any, tokens: Any) -> None:
        """Add each example's reward to its dataset's totals (on the logits' device)."""
        if not self.sampler.pending:  # type: ignore[union-attr]
            raise RuntimeError("odm: a training forward ran without a batch from the odm loader")
        sources = self.sampler.pending.popleft()  # type: ignore[union-attr]
        if len(sources) != tokens.numel():
            raise RuntimeError(
                f"odm: the batch holds {tokens.numel()} examples but the loader drew "
                f"{len(sources)}; another plugin changed the batches"
            )
        import torch

        if self.totals.device != sums.device:
            self.totals = self.totals.to(sums.device)
        index = torch.tensor(sources, device=sums.device)
        has = (tokens > 0).double()
        means = sums.double() / tokens.double().clamp(min=1)  # per example, over its tokens
        reward = self.reward.per_example(means)  # type: ignore[misc]
        self.totals[0].index_add_(0, index, reward * has)
        self.totals[1].index_add_(0, index, has)

    def update(self, step: int, measured: list[float | None], observed: list[float]) -> None:
        """One bandit update from the measured values per dataset (through the reward's
        signal), logged as one ``odm.jsonl`` line."""
        assert self.sampler is not None
        bandit = self.sampler.bandit
        rewards = self.signal(measured)
        estimates = bandit.update(rewards)
        weights = bandit.weights()
        self.history.append((step, weights))
        if self.is_main and self.output_dir:
            line = {
                "step": step,
                "datasets": self.names,
                "weights": weights,
                "probabilities": [
                    (1 - bandit.gamma) * w + bandit.gamma / bandit.k for w in weights
                ],
                "measured": measured,
                "rewards": rewards,
                "estimates": estimates,
                "observed": observed,
                "counts": list(self.sampler.counts),
            }
            if self._log is None:
                path = Path(self.output_dir) / LOG_FILE
                path.parent.mkdir(parents=True, exist_ok=True)
                self._log = path.open("a")
            self._log.write(json.dumps(line) + "\n")
            self._log.flush()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def update_from_train(self, step: int) -> None:
        import torch

        totals = self.totals
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), "sum")
        sums, counts = totals.cpu().tolist()
        rewards = [s / c if c > 0 else None for s, c in zip(sums, counts)]
        self.totals = torch.zeros_like(self.totals)
        self.update(step, rewards, counts)

    def update_from_eval(self, step: int, metrics: dict[str, float]) -> None:
        for name in self.names:
            value = metrics.get(f"eval_{name}_loss")
            if value is not None:
                self.eval_losses[name] = float(value)
        if all(n in self.eval_losses for n in self.names):
            rewards = [self.eval_losses[n] for n in self.names]
            self.eval_losses = {}
            self.update(step, rewards, [1.0] * len(rewards))

    def restore(self, args: Any, step: int) -> None:
        """Load the state saved at ``step`` (this run resumes from that checkpoint)."""
        candidates = []
        if args.resume_from_checkpoint and str(args.resume_from_checkpoint).lower() not in (
            "true",
            "false",
        ):
            candidates.append(Path(args.resume_from_checkpoint) / STATE_FILE)
        candidates.append(Path(args.output_dir) / f"checkpoint-{step}" / STATE_FILE)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ConfigError(
                f"resuming at step {step}, but {candidates[-1]} does not exist: the checkpoint "
                "was written without odm, so the mixing state cannot be restored; start fresh "
                "(resume_from_checkpoint False) or resume a run that used odm"
            )
        state = json.loads(found.read_text())
        if state["names"] != self.names:
            raise ConfigError(
                f"{found}: saved datasets {state['names']} differ from this run's {self.names}"
            )
        assert self.sampler is not None
        try:
            self.sampler.load_state_dict(state["sampler"], skip=not self.ignore_data_skip)
        except ValueError as err:
            raise ConfigError(f"{found}: {err}") from None
        self.totals = _zeros(len(self.names)) + _tensor(state["totals"])
        if "signal" in state:
            try:
                self.signal.load_state_dict(state["signal"])
            except (ValueError, KeyError) as err:
                raise ConfigError(f"{found}: {err}") from None
        self.eval_losses = dict(state["eval_losses"])
        if self.is_main and self.output_dir:
            self.close_log()
            _truncate_log(Path(self.output_dir) / LOG_FILE, step)


def _truncate_log(path: Path, step: int) -> None:
    """Drop the lines of updates after ``step`` (redone by the resumed run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class OdmCallback(TrainerCallback):
    """Bandit updates at the trainer's events, and the restore on resume."""

    def __init__(self, plugin: OdmPlugin) -> None:
        self.plugin = plugin

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0 and self.plugin.sampler is not None:
            self.plugin.restore(args, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.plugin.close_log()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        p = self.plugin
        if p.sampler is None or p.reward.reads != "forward":
            return
        if state.global_step % p.options.update_interval == 0:
            p.update_from_train(state.global_step)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any
    ) -> None:
        p = self.plugin
        if p.sampler is not None and p.reward.reads == "validation" and metrics:
            p.update_from_eval(state.global_step, metrics)


def _zeros(k: int) -> Any:
    import torch

    return torch.zeros(2, k, dtype=torch.float64)


def _tensor(values: Any) -> Any:
    import torch

    return torch.tensor(values, dtype=torch.float64)
