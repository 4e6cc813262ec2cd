"""EMA of the weights through Lightning's WeightAveraging (swap for validation, checkpointing, resume).

Lightning's EMAWeightAveraging updates one parameter at a time with a fixed decay; this adds only what it
lacks: a foreach update (one kernel per group of tensors, no host sync) and the optional warm-up
decay_n = min(decay, (1 + n) / (10 + n)) so that short runs do not average in their random start.
The average starts at step 0 (a delayed start validates an untrained copy: Lightning issue 21724).
"""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_multi_avg_fn(decay: float, warmup: bool):
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # The decay is a device tensor, computed without leaving the GPU (no host sync). The first update
        # (n = 0) copies the weights, as AveragedModel does: decay 0.
        n = num_averaged.to(averaged[0].dtype)
        d = torch.clamp((1 + n) / (10 + n), max=decay) if warmup else torch.full_like(n, decay)
        d = torch.where(n > 0, d, 0.0)
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))

    return update


class EMA(WeightAveraging):
    def __init__(self, decay: float = 0.9999, warmup: bool = False, update_every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in [0, 1)")
        self._multi_avg_fn = ema_multi_avg_fn(decay, warmup)
        super().__init__(use_buffers=True, multi_avg_fn=self._multi_avg_fn)
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # As WeightAveraging does, but without AveragedModel.update_parameters, which reads its device-side counter
        # n_averaged on the host twice per update: two syncs a step that stall the GPU's queue.
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update(self, pl_module) -> None:
        average = self._average_model
        pairs = zip(
            itertools.chain(average.module.parameters(), average.module.buffers()),
            itertools.chain(pl_module.parameters(), pl_module.buffers()),
            strict=True,
        )
        averaged, current, frozen_avg, frozen = [], [], [], []
        for a, c in pairs:  # frozen parameters (a latent model's first stage) are copied: d x + (1 - d) x rounds
            is_frozen = isinstance(c, torch.nn.Parameter) and not c.requires_grad
            (frozen_avg if is_frozen else averaged).append(a.detach())
            (frozen if is_frozen else current).append(c.detach())
        self._multi_avg_fn(averaged, current, average.n_averaged)
        if frozen:
            torch._foreach_copy_(frozen_avg, frozen)
        average.n_averaged += 1

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning copies the average into the module here; we keep the raw weights, so a checkpoint written at
        # the end (callbacks.Checkpoint) still resumes training from them. The average is in every checkpoint.
        pass

    def averaged_module(self):
        """The EMA copy of the LightningModule, or None before fit has set it up."""
        return None if self._average_model is None else self._average_model.module
