"""The "every N steps, on a respaced grid" part of the callbacks that sample during training (sample grids, the
denoising chain, FID): when to run, once per step at most, and the run's sampler respaced for them."""

from __future__ import annotations

import lightning.pytorch as pl

from ddpmlab.samplers import Sampler


class EveryNSteps(pl.Callback):
    """Calls :meth:`run` every ``every_n_steps`` optimizer steps (0: never) and at the end of training
    (``at_train_end``), never twice at one step. ``num_steps`` respaces the run's sampler for this callback only
    (None: the sampler's own grid)."""

    def __init__(self, every_n_steps: int, num_steps: int | None = None, at_train_end: bool = True):
        self.every_n_steps, self.num_steps, self.at_train_end = every_n_steps, num_steps, at_train_end
        self._last_step = -1

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        raise NotImplementedError

    def active(self, trainer: pl.Trainer) -> bool:
        """Whether to run at all (FID: not without Inception weights, not in a dry run)."""
        return True

    def sampler(self, pl_module: pl.LightningModule) -> Sampler:
        return pl_module.sampler if self.num_steps is None else pl_module.sampler.with_steps(self.num_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.active(trainer) and self.every_n_steps > 0 and step % self.every_n_steps == 0:
            if step != self._last_step:
                self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.active(trainer) and self.at_train_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)
