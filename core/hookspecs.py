"""The hook contract: every hook's name, how results combine, its parameters, what it returns.

:data:`SPECS` is built from :class:`HookSpecs`, whose methods are the specifications (their
signatures and docstrings; the bodies are never run). It drives the framework's one
dispatcher and the checks made when a plugin class is defined (pluggy's hookspec/hookimpl
verification is the model):

- a plugin method is a hook implementation only when decorated with :func:`hook`; a method
  named like a hook without it is refused (so a hook is never silently skipped), and any
  other undecorated name is an ordinary helper;
- ``@hook`` on a name that is not a hook is refused, with the closest hook name;
- the implementation's parameters must be a subset of the spec's (hooks are called by
  keyword, so their order is free): a parameter the spec does not pass is refused, required
  or not, since it would never receive a value; ``**kwargs`` receives every spec parameter
  not named; ``*args`` and positional-only parameters are refused;
- trainer events (``on_train_begin``, ``on_step_end``, ... every ``on_*`` name except the
  ``on_save`` hook) are refused: a plugin receives them through a
  ``transformers.TrainerCallback`` it returns from :meth:`HookSpecs.callbacks`.

Combining results (in the resolved plugin order):

- single owner: at most one active plugin implements it (checked at activation); the
  owner's result is used, or the core's default when there is no owner or it returns None;
- chained: the value(s) named in ``threads`` go through every implementing plugin, each
  receiving what the previous one returned;
- fan-out: every implementing plugin runs; hooks that return lists have them joined.
"""

from __future__ import annotations

import difflib
import enum
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset, IterableDataset
    from peft import PeftConfig, PeftModel
    from torch.utils.data import DataLoader, Sampler
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        TrainerCallback,
        TrainingArguments,
    )

    from .patching import PatchRule
    from .plugin import BaseLayer
    from .trainer.parsing import TrainConfig

    Model = PreTrainedModel | PeftModel
    Collator = Callable[[list[dict[str, Any]]], dict[str, Any]]

F = TypeVar("F", bound=Callable[..., Any])

#: the attribute :func:`hook` sets on an implementation
MARKER = "__accel_hook__"

#: ``transformers.TrainerCallback``'s event methods (a test keeps this equal to the installed
#: transformers; kept static so ``accel --help`` does not import transformers)
TRAINER_CALLBACK_EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)


class Combine(enum.Enum):
    """How the results of a hook's implementations combine."""

    SINGLE = "single owner"
    CHAINED = "chained"
    FANOUT = "fan-out"


@dataclass(frozen=True)
class HookSpec:
    name: str
    combine: Combine
    #: the keyword arguments every call passes, in spec order
    params: tuple[str, ...]
    #: chained: the parameters threaded through the plugins (the hook returns them, in order)
    threads: tuple[str, ...] = ()
    #: fan-out: each plugin returns a list and the lists are joined (else results are unused)
    joins: bool = False
    #: single owner: hooks of one group may have only one owner among them all
    group: str = ""
    doc: str = ""


def hook(function: F) -> F:
    """Mark a plugin method as the implementation of the hook of the same name."""
    setattr(function, MARKER, True)
    return function


def _spec(
    combine: Combine, *, threads: tuple[str, ...] = (), joins: bool = False, group: str = ""
) -> Callable[[F], F]:
    def mark(function: F) -> F:
        function.__accel_spec__ = (combine, threads, joins, group)  # type: ignore[attr-defined]
        return function

    return mark


class HookSpecs:
    """The specification of every hook (signatures and docstrings; bodies never run)."""

    @_spec(Combine.FANOUT)
    def check_run(
        self,
        run_config: TrainConfig,
        model_config: PretrainedConfig,
        base_layer: BaseLayer | None,
    ) -> None:
        """Refuse a run this plugin cannot serve, before anything heavy loads.

        Called once the plugins are resolved and the model's ``config.json`` is read, before
        the model loads. ``run_config`` is the parsed run (``model``, ``data``, ``tuning``,
        ``training``: the ``TrainingArguments``); ``model_config`` the model's config;
        ``base_layer`` names the layers an active plugin loads the base with (see
        :attr:`accel.api.AccelerationPlugin.base_layer`), ``None`` for the plain base. Raise
        :class:`accel.api.ConfigError` naming the flag or key and the fix. Keep what later
        hooks need on the plugin; leave ``run_config`` as it is.
        """

    @_spec(Combine.SINGLE)
    def load_model(self, model_name_or_path: str, model_kwargs: dict[str, Any]) -> PreTrainedModel:
        """Load the model instead of ``AutoModelForCausalLM.from_pretrained``.

        ``model_kwargs`` are the ``from_pretrained`` keyword arguments the core would pass
        (``dtype``, and ``attn_implementation`` when set); pass them on. Return the loaded
        causal LM. The core's checkpoint loading and adapters still apply to it.
        """

    @_spec(Combine.CHAINED, threads=("model", "peft_config"))
    def augment_model(
        self, model: PreTrainedModel, train_args: TrainingArguments, peft_config: PeftConfig | None
    ) -> tuple[PreTrainedModel, PeftConfig | None]:
        """Change the model after loading, before the adapters are applied; return
        ``(model, peft_config)``.

        ``peft_config`` is the LoRA config the core will apply (``None`` for full
        fine-tuning). Return ``(model, peft_config)``; return ``peft_config=None`` when the
        plugin applied the adapters itself. The next plugin receives what this one returns.
        """

    @_spec(Combine.FANOUT, joins=True)
    def patch_rules(self, model: Model) -> Sequence[PatchRule]:
        """Return the :class:`accel.PatchRule` objects to apply to ``model``, once its
        adapters are in place (every plugin's rules apply as one transaction).

        ``model`` has its adapters in place (a ``PeftModel`` under LoRA). Check here what can
        be checked (raise :class:`accel.PatchError`): nothing is patched until every active
        plugin's rules are collected, then all are applied as one transaction.
        """

    @_spec(Combine.CHAINED, threads=("dataset",))
    def prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        train_args: TrainingArguments,
    ) -> Dataset | IterableDataset:
        """Transform the tokenized training dataset (``input_ids``, ``labels`` columns).

        Return the new dataset (never ``None``); the next plugin receives it.
        """

    @_spec(Combine.SINGLE)
    def data_collator(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train_args: TrainingArguments,
        default: Collator,
    ) -> Collator:
        """Return the collator of the training batches instead of ``default``.

        ``default`` is the core's ``DataCollatorForSeq2Seq`` (padding, labels padded with
        -100); return it, wrap it, or return your own callable.
        """

    @_spec(Combine.SINGLE, group="training loader")
    def train_sampler(self, dataset: Dataset, train_args: TrainingArguments) -> Sampler[int] | None:
        """Return the per-example sampler of the training loader (the trainer shards it).

        Return ``None`` to keep the trainer's own sampler.
        """

    @_spec(Combine.SINGLE, group="training loader")
    def train_dataloader(
        self,
        dataset: Dataset | IterableDataset,
        collator: Collator,
        train_args: TrainingArguments,
    ) -> DataLoader | None:
        """Return the whole training ``DataLoader``, already sharded for this rank.

        ``collator`` is the one chosen by :meth:`data_collator`. The trainer uses the loader
        as it is (no further sharding). Return ``None`` to keep the trainer's loader.
        """

    @_spec(Combine.FANOUT, joins=True)
    def callbacks(self, model: Model, accelerator: Accelerator) -> Sequence[TrainerCallback]:
        """Return ``transformers.TrainerCallback`` objects to add to the trainer, before
        training: trainer events reach a plugin this way.

        This is how a plugin receives trainer events (``on_step_end``, ``on_log``, ...).
        """

    @_spec(Combine.FANOUT)
    def on_save(self, checkpoint_dir: str, model: Model) -> None:
        """Called on every process after the trainer wrote ``checkpoint_dir``.

        Add or convert files there. (Not ``TrainerCallback.on_save``: no args/state/control.)
        """

    @_spec(Combine.FANOUT)
    def export(self, model: Model, output_dir: str) -> None:
        """Called on the main process after the final model is saved to ``output_dir``."""

    @_spec(Combine.SINGLE)
    def trained_examples(self) -> Mapping[str, int] | None:
        """Examples of each dataset of the data config trained so far, for the summary.

        For the data mixer (the plugin declaring
        :attr:`accel.api.AccelerationPlugin.data_mixer`), which draws the batches itself.
        Return ``None`` to keep the core's count, computed from the static mix.
        """

    @_spec(Combine.FANOUT, joins=True)
    def report_lines(self) -> Sequence[str]:
        """Return extra lines for this plugin in the start-of-training block."""


def _build() -> dict[str, HookSpec]:
    specs = {}
    for name, function in vars(HookSpecs).items():
        marks = getattr(function, "__accel_spec__", None)
        if marks is None:
            continue
        combine, threads, joins, group = marks
        params = tuple(inspect.signature(function).parameters)[1:]
        assert set(threads) <= set(params), name
        specs[name] = HookSpec(
            name, combine, params, threads, joins, group, inspect.getdoc(function) or ""
        )
    return specs


#: every hook, in the order of a run
SPECS: dict[str, HookSpec] = _build()


def signature_text(name: str, *, self_first: bool = False) -> str:
    params = ("self", *SPECS[name].params) if self_first else SPECS[name].params
    return f"{name}({', '.join(params)})"


def _event_error(owner: str, name: str) -> TypeError:
    kind = (
        "a transformers.TrainerCallback event"
        if name in TRAINER_CALLBACK_EVENTS
        else "named like a trainer event"
    )
    return TypeError(
        f"plugin {owner} defines '{name}', {kind}, which a plugin never receives; return a "
        "transformers.TrainerCallback that implements it from the 'callbacks' hook "
        "(@hook def callbacks(self, model, accelerator): return [MyCallback()])"
    )


def check_attribute(owner: str, name: str, value: Any) -> tuple[bool, frozenset[str] | None]:
    """Check one attribute defined on a plugin class.

    Returns ``(is_hook, keywords)``: ``keywords`` are the spec parameters the implementation
    takes (``None``: all of them, it has ``**kwargs``). Raises ``TypeError`` with the reason
    when the attribute breaks the contract (see the module docstring).
    """
    function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    if not getattr(function, MARKER, False):
        if name in SPECS:
            raise TypeError(
                f"plugin {owner} defines '{name}' without @hook; decorate it "
                f"(from accel import hook; @hook def {signature_text(name, self_first=True)}) "
                "or give the helper another name"
            )
        if name.startswith("on_") and callable(function):
            raise _event_error(owner, name)
        return False, None
    return True, check_implementation(owner, name, value)


def check_implementation(owner: str, name: str, function: Any) -> frozenset[str] | None:
    """Check one ``@hook`` implementation against its spec; return the keywords it takes."""
    spec = SPECS.get(name)
    if spec is None:
        if name.startswith("on_"):
            raise _event_error(owner, name)
        close = difflib.get_close_matches(name, list(SPECS), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise TypeError(
            f"plugin {owner}: '{name}' is marked @hook but is not a hook.{hint} "
            f"Hooks: {', '.join(SPECS)}"
        )
    where = f"plugin {owner}: hook '{name}'"
    if not inspect.isfunction(function):
        raise TypeError(
            f"{where} must be a plain method: def {signature_text(name, self_first=True)}"
        )
    params = list(inspect.signature(function).parameters.values())
    if not params or params[0].kind not in (
        params[0].POSITIONAL_ONLY,
        params[0].POSITIONAL_OR_KEYWORD,
    ):
        raise TypeError(
            f"{where} must take self first: def {signature_text(name, self_first=True)}"
        )
    names: set[str] = set()
    takes_all = False
    for p in params[1:]:
        if p.kind is p.VAR_KEYWORD:
            takes_all = True
        elif p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            raise TypeError(
                f"{where}: parameter '{p.name}' can never receive a value; hooks are called by "
                f"keyword: {signature_text(name)}"
            )
        elif p.name not in spec.params:
            close = difflib.get_close_matches(p.name, spec.params, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TypeError(
                f"{where}: parameter '{p.name}'{hint} is not an argument of the hook; the spec "
                f"is {signature_text(name)}, and an implementation takes any of those names"
            )
        else:
            names.add(p.name)
    return None if takes_all else frozenset(names)
