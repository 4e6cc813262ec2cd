"""Draws a fixed-seed grid of samples with the EMA weights every N steps, saves it as PNG and logs it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ddpmlab.callbacks.utils import ema_denoiser, log_image, sample_images


class SampleGrid(pl.Callback):
    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        seed: int = 0,
        num_steps: int | None = None,
        dirname: str = "grids",
        at_train_end: bool = True,
    ):
        """``num_steps`` respaces the run's sampler for the grids only (None: the sampler's own grid)."""
        self.every_n_steps, self.num_samples, self.seed, self.num_steps = every_n_steps, num_samples, seed, num_steps
        self.dirname, self.at_train_end = dirname, at_train_end
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, pl_module) -> Path:
        self._last_step = step = trainer.global_step
        denoiser = ema_denoiser(trainer, pl_module)
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        sampler = pl_module.sampler if self.num_steps is None else pl_module.sampler.with_steps(self.num_steps)
        images = sample_images(denoiser, sampler, self.num_samples, generator)  # [N,C,H,W] in [0,1]
        grid = make_grid(images, nrow=int(self.num_samples**0.5), padding=1, pad_value=1.0)
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        log_image(trainer, "samples/grid", grid, step)
        return path
