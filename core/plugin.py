"""The plugin contract: what a plugin declares as data and which hooks it may implement.

A plugin is a subclass of :class:`AccelerationPlugin` published in the ``accel.plugins``
entry-point group. The framework instantiates it with its validated configs (one per
activation path present in the user's config) and calls the hooks it overrides, in the
resolved plugin order. Hooks a plugin does not override are never called.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .flags import Flag

if TYPE_CHECKING:
    from .patching import PatchRule

#: Hooks that at most one active plugin may implement.
SINGLE_OWNER_HOOKS = ("load_model", "data_collator", "train_sampler", "train_dataloader")
#: Hooks that thread a value through every plugin, in order.
CHAINED_HOOKS = ("augment_model", "prepare_dataset")
#: Hooks whose results (or side effects) are joined across every plugin.
FANOUT_HOOKS = ("patch_rules", "callbacks", "on_save", "export", "report_lines")
HOOKS = SINGLE_OWNER_HOOKS + CHAINED_HOOKS + FANOUT_HOOKS


class AccelerationPlugin:
    """Base class of every accel plugin.

    Declare the class attributes below; override only the hooks you need. ``self.configs``
    maps each activation path the user set to its validated config object.
    """

    #: unique plugin name (``accel plugins`` lists it; other plugins refer to it)
    name: ClassVar[str] = ""
    #: config paths under ``plugins:`` that activate the plugin, e.g. ``training.odm.odm``
    config_paths: ClassVar[tuple[str, ...]] = ()
    #: a dataclass for every path, or one mapping ``path -> dataclass``; ``None`` = no keys
    config_schema: ClassVar[type | Mapping[str, type] | None] = None
    #: command-line flags that fill the config
    flags: ClassVar[tuple[Flag, ...]] = ()
    #: plugins that must be active too (they run before this one)
    requires: ClassVar[tuple[str, ...]] = ()
    #: plugins that cannot be active at the same time
    conflicts: ClassVar[tuple[str, ...]] = ()
    #: ordering constraints: run after / before these plugins when they are active
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    #: ``config.model_type`` values supported; ``None`` means any architecture
    model_types: ClassVar[tuple[str, ...] | None] = None
    #: requirement strings checked at activation, e.g. ``"bitsandbytes>=0.45"``
    required_packages: ClassVar[tuple[str, ...]] = ()
    #: the core versions this plugin works with (a PEP 440 specifier)
    core_versions: ClassVar[str] = ">=0.1,<0.2"

    def __init__(self, configs: Mapping[str, Any]):
        self.configs = dict(configs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Catch misspelt hook names when the plugin class is defined, not at run time."""
        super().__init_subclass__(**kwargs)
        base_names = set(dir(AccelerationPlugin))
        for attr in vars(cls):
            if attr.startswith("_") or attr in base_names or not callable(vars(cls)[attr]):
                continue
            close = difflib.get_close_matches(attr, HOOKS, n=1, cutoff=0.85)
            if close:
                raise TypeError(
                    f"plugin {cls.__qualname__} defines '{attr}', which is not a hook; "
                    f"did you mean '{close[0]}'? Hooks: {', '.join(HOOKS)}"
                )

    def config(self, path: str | None = None) -> Any:
        """The validated config at ``path`` (default: the only / first active path)."""
        if path is None:
            return next(iter(self.configs.values()))
        return self.configs.get(path)

    @classmethod
    def implements(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(AccelerationPlugin, hook)

    @classmethod
    def schema_for(cls, path: str) -> type | None:
        schema = cls.config_schema
        if isinstance(schema, Mapping):
            return schema.get(path)
        return schema

    # ----------------------------------------------------------------- hooks
    def load_model(self, model_name_or_path: str, **kwargs: Any) -> Any:
        """Load the model instead of ``AutoModelForCausalLM.from_pretrained`` (one owner)."""
        raise NotImplementedError

    def augment_model(self, model: Any, train_args: Any, peft_config: Any) -> tuple[Any, Any]:
        """Change the model after loading; return ``(model, peft_config)``.

        Return ``peft_config=None`` when the plugin applied the adapters itself.
        """
        raise NotImplementedError

    def patch_rules(self, model: Any) -> Sequence[PatchRule]:
        """Declarative model patches applied after adapters are in place."""
        raise NotImplementedError

    def prepare_dataset(self, dataset: Any, tokenizer: Any, train_args: Any) -> Any:
        """Transform the tokenized training dataset; return the new dataset."""
        raise NotImplementedError

    def data_collator(self, tokenizer: Any, train_args: Any, default: Any) -> Any:
        """Return the collator to use instead of ``default`` (one owner)."""
        raise NotImplementedError

    def train_sampler(self, dataset: Any, train_args: Any) -> Any:
        """Return the per-example sampler of the training loader (one owner)."""
        raise NotImplementedError

    def train_dataloader(self, dataset: Any, collator: Any, train_args: Any) -> Any:
        """Return the whole training ``DataLoader``, already sharded per rank (one owner)."""
        raise NotImplementedError

    def callbacks(self, model: Any, accelerator: Any) -> Sequence[Any]:
        """``transformers.TrainerCallback`` objects to add to the trainer."""
        raise NotImplementedError

    def on_save(self, checkpoint_dir: str, model: Any) -> None:
        """Called after each checkpoint is written (e.g. to convert or add files)."""
        raise NotImplementedError

    def export(self, model: Any, output_dir: str) -> None:
        """Called after the final model is saved (e.g. to convert to HF format)."""
        raise NotImplementedError

    def report_lines(self) -> Sequence[str]:
        """Extra lines for the start-of-training block (e.g. which attention path was chosen)."""
        raise NotImplementedError
