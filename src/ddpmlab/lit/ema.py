"""EMA of the weights through Lightning's WeightAveraging (swap for validation, checkpointing, resume).

Lightning's EMAWeightAveraging updates one parameter at a time with a fixed decay; this adds only what it
lacks: a foreach update (one kernel per group of tensors, no host sync) and the optional warm-up
decay_n = min(decay, (1 + n) / (10 + n)) so that short runs do not average in their random start.
The average starts at step 0 (a delayed start validates an untrained copy: Lightning issue 21724).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_multi_avg_fn(decay: float, warmup: bool):
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        d = decay
        if warmup:  # a device tensor: the decay is computed without leaving the GPU
            n = num_averaged.to(averaged[0].dtype)
            d = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))

    return update


class EMA(WeightAveraging):
    def __init__(self, decay: float = 0.9999, warmup: bool = False, update_every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in [0, 1)")
        super().__init__(use_buffers=True, multi_avg_fn=ema_multi_avg_fn(decay, warmup))
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def averaged_module(self):
        """The EMA copy of the LightningModule, or None before fit has set it up."""
        return None if self._average_model is None else self._average_model.module
