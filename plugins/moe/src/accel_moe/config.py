"""The scattermoe config (``training.moe.scattermoe``, fms-acceleration's key, ``--fast_moe``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScatterMoEConfig:
    ep_degree: int | bool = field(
        default=1,
        metadata={
            "help": "N = expert-parallel degree (experts split over N processes, tokens exchanged "
            "with all-to-all; N must divide the process count and the number of experts); "
            "true = experts sharded by the outer sharding (fsdp_size); false or 1 = experts "
            "replicated on every process. The ScatterMoE experts kernel is on in every case"
        },
    )
    lora_experts: bool = field(
        default=False,
        metadata={
            "help": "with LoRA (peft_method lora): also train LoRA factors on the expert weights "
            "(PEFT target_parameters; saved in the adapter, loads with vanilla PEFT)"
        },
    )
    lora_router: bool = field(
        default=False,
        metadata={"help": "with LoRA: also train LoRA factors on the router weight"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.ep_degree, bool) and self.ep_degree < 1:
            raise ValueError(
                f"ep_degree must be a positive integer, true or false (got {self.ep_degree})"
            )

    @property
    def ep_size(self) -> int:
        """The expert-parallel degree: 1 for true/false."""
        return 1 if isinstance(self.ep_degree, bool) else self.ep_degree

    @property
    def replicate_experts(self) -> bool:
        """``false``: every process keeps every expert (no sharding of them)."""
        return self.ep_degree is False
