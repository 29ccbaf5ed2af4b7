"""A DataLoader that forwards ``set_epoch`` to its batch sampler.

transformers' Trainer calls ``set_epoch`` on the loader at each epoch when it exists; a
plain DataLoader does not have it, and the multipack plan would then repeat one order.
"""

from __future__ import annotations

from torch.utils.data import DataLoader


class EpochDataLoader(DataLoader):
    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)
