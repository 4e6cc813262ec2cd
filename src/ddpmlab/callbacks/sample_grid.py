"""Draws a fixed-seed grid of samples with the EMA weights every N steps, saves it as PNG and logs it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from ddpmlab.callbacks.periodic import EveryNSteps
from ddpmlab.callbacks.utils import dashboard_step, ema_denoiser, log_image, log_labelled_samples, sampling_perf
from ddpmlab.images import caption_grid, cond_rows, image_grid, save_grid, save_png, to_unit
from ddpmlab.lit.module import preview_keys
from ddpmlab.progress import SamplingProgress, is_terminal
from ddpmlab.samplers import GuidedDenoiser, generate
from ddpmlab.samplers.guidance import check_rescale


class SampleGrid(EveryNSteps):
    def __init__(
        self,
        every_n_steps: int = 500,
        every_n_epochs: int = 0,
        num_samples: int = 64,
        seed: int = 0,
        num_steps: int | None = None,
        dirname: str = "grids",
        at_train_end: bool = True,
        guidance: float = 0.0,
        guidance_rescale: float = 0.0,
    ):
        """Draw every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs`` epochs (0: never).
        ``num_steps`` respaces the run's sampler for the grids only (None: the sampler's own grid).
        A class-conditional model draws one row per class (num_samples // K samples each), with classifier-free
        guidance weight ``guidance`` (Ho & Salimans 2022, eq. 6; 0: the conditional model unguided), rescaled by
        ``guidance_rescale`` (phi, Lin et al. 2024, eq. 16). A model
        conditioned on an image (super-resolution, inpainting) draws one row per validation image, 8 rows of
        input | num_samples // 8 - 2 samples | original."""
        super().__init__(every_n_steps, num_steps, at_train_end)
        self.every_n_epochs, self.num_samples, self.seed = every_n_epochs, num_samples, seed
        self.dirname, self.guidance, self.guidance_rescale = dirname, guidance, check_rescale(guidance_rescale)

    def run(self, trainer, pl_module) -> None:
        self.draw(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0 and trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, pl_module) -> Path | None:
        self._last_step = step = trainer.global_step
        if trainer.fast_dev_run:  # a dry run draws nothing
            return None
        denoiser = ema_denoiser(trainer, pl_module)
        perf = sampling_perf(pl_module, denoiser)
        sampler = self.sampler(pl_module)
        num_classes = denoiser.num_classes
        if getattr(pl_module, "data_conditioned", False):
            return self.draw_conditioned(trainer, pl_module, denoiser, sampler, perf, step)
        cond, nrow = None, None
        if num_classes:  # one row per class
            nrow = max(1, self.num_samples // num_classes)
            cond = torch.arange(num_classes).repeat_interleave(nrow)
            denoiser = GuidedDenoiser(denoiser, self.guidance, self.guidance_rescale)
        n = self.num_samples if cond is None else len(cond)
        evals = sampler.num_evaluations(denoiser.diffusion)
        with SamplingProgress(evals, "grid", enabled=is_terminal(), leave=False) as bar:
            x0 = generate(denoiser, sampler, n, seed=self.seed, batch_size=n, labels=cond, perf=perf, progress=bar.wrap)
        images = to_unit(x0)  # [N,C,H,W] in [0,1]
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:07d}.png"
        grid = save_grid(images, path, nrow=nrow)
        log_image(trainer, "samples/grid", grid, dashboard_step(trainer))
        if cond is not None:
            log_labelled_samples(trainer, images, cond, dashboard_step(trainer))
        return path

    def draw_conditioned(self, trainer, pl_module, denoiser, sampler, perf, step: int) -> Path:
        """Rows of input | samples | original for the first validation images (the same ones at every step); a text
        model's rows are samples | a real item of the caption, the caption written under each row."""
        dataset = trainer.datamodule.val_set or trainer.datamodule.train_set
        rows = 8
        per = max(1, self.num_samples // rows - 1 - (pl_module.task is not None))  # [input |] samples | original
        cond, originals = pl_module.fixed_conditions(dataset, rows, self.seed)
        if self.guidance:
            denoiser = GuidedDenoiser(denoiser, self.guidance, self.guidance_rescale)
        n = len(cond) * per
        evals = sampler.num_evaluations(denoiser.diffusion)
        with SamplingProgress(evals, "grid", enabled=is_terminal(), leave=False) as bar:
            x0 = generate(denoiser, sampler, n, seed=self.seed, batch_size=n, cond=cond.repeat_interleave(per),
                          perf=perf, progress=bar.wrap)  # fmt: skip
        cells = cond_rows(cond.image, x0, originals, n=len(cond))
        if pl_module.text:  # the captions fixed_conditions drew, written under their rows
            captions = [dataset.captions[k][0] for k in preview_keys(dataset, len(cond))]
            grid = caption_grid(cells, captions, per_row=per + 1)
        else:
            grid = image_grid(cells, nrow=per + 1 + (cond.image is not None))
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:07d}.png"
        save_png(grid, path)
        log_image(trainer, "samples/grid", grid, dashboard_step(trainer))
        return path
