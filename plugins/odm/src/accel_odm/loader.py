"""A DataLoader that forwards ``set_epoch`` to its batch sampler (the trainer calls it)."""

from __future__ import annotations

from torch.utils.data import DataLoader


class OdmDataLoader(DataLoader):
    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
