"""What a diffusion dashboard shows besides the loss and the sample grid (W&B; scalars reach CSV and
TensorBoard too, images TensorBoard and PNG files in the run directory):

- ``DenoisingChain``: x_T -> x_0 for a few fixed seeds, snapshots evenly spaced over the sampler's steps;
- ``ForwardStrip``: x_0 -> x_T for a few fixed training images (DDPM eq. (4)), once per run;
- ``LossByTimestep``: the training loss by timestep quartile (q1: t near 0, little noise; q4: near T);
- ``Throughput``: images per second between two logging steps;
- ``LastStep``: the last step's training metrics, when it is not a logging step (short runs).

Scalars and images are logged at the step Lightning gives the same batch's ``self.log`` values.

None of them adds a host sync to a training step: losses are summed on the device and read once per
logging interval, and throughput is wall time over that interval (Lightning's ThroughputMonitor calls
``torch.cuda.synchronize()`` after every batch).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from ddpmlab.callbacks.periodic import EveryNSteps
from ddpmlab.callbacks.utils import dashboard_step, ema_denoiser, log_image, sampling_perf
from ddpmlab.images import image_grid, save_png, to_unit
from ddpmlab.progress import SamplingProgress, is_terminal
from ddpmlab.samplers import generate_chain


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Send scalars to every logger (W&B, CSV, TensorBoard) from global rank 0, at ``step`` (default: now)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=dashboard_step(trainer) if step is None else step)


def save_and_log(trainer: pl.Trainer, key: str, dirname: str, grid: Tensor) -> Path:
    path = Path(trainer.default_root_dir) / dirname / f"step_{trainer.global_step:07d}.png"
    save_png(grid, path)
    log_image(trainer, key, grid, dashboard_step(trainer))
    return path


class DenoisingChain(EveryNSteps):
    """Rows: ``num_images`` samples from fixed seeds; columns: ``num_frames`` snapshots evenly spaced over the
    reverse process, the first x_T and the last x_0. Drawn with the EMA weights every ``every_n_steps`` and at
    the end."""

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_images: int = 8,
        num_frames: int = 10,
        seed: int = 0,
        num_steps: int | None = 100,
        at_train_end: bool = True,
    ):
        super().__init__(every_n_steps, num_steps, at_train_end)
        self.num_images, self.num_frames, self.seed = num_images, num_frames, seed

    def run(self, trainer, pl_module) -> None:
        self.draw(trainer, pl_module)

    def chain(self, denoiser, sampler, perf=None, cond=None) -> Tensor:
        """[num_images * F, C, H, W] in [0, 1], row-major: each row one image's x_T ... x_0 (conditioned on
        ``cond``, one per image: a model conditioned on an image gets the first validation images')."""
        evals = sampler.num_evaluations(denoiser.diffusion)
        with SamplingProgress(evals, "chain", enabled=is_terminal(), leave=False) as bar:
            frames = generate_chain(
                denoiser, sampler, self.num_images, self.num_frames, seed=self.seed, cond=cond, perf=perf,
                progress=bar.wrap,
            )  # fmt: skip
        return to_unit(frames.flatten(0, 1))

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, pl_module) -> Path | None:
        self._last_step = trainer.global_step
        if trainer.fast_dev_run:  # a dry run draws nothing
            return None
        denoiser = ema_denoiser(trainer, pl_module)
        cond = None
        if getattr(pl_module, "data_conditioned", False):
            dataset = trainer.datamodule.val_set or trainer.datamodule.train_set
            cond = pl_module.fixed_conditions(dataset, self.num_images, self.seed)[0]
            self.num_images = len(cond)
        chain = self.chain(denoiser, self.sampler(pl_module), sampling_perf(pl_module, denoiser), cond)
        grid = image_grid(chain, nrow=chain.shape[0] // self.num_images)  # upscaled as the sample grids
        return save_and_log(trainer, "samples/denoising_chain", "chains", grid)


class ForwardStrip(pl.Callback):
    """Rows: the first ``num_images`` training images; columns: x_t = q_sample(x_0, t, eps) (DDPM eq. (4)) at
    ``num_frames`` timesteps from 0 to T-1 with fixed eps. Depends on the schedule only: drawn once per run."""

    def __init__(self, num_images: int = 8, num_frames: int = 10, seed: int = 0):
        self.num_images, self.num_frames, self.seed = num_images, num_frames, seed

    @torch.no_grad()
    def strip(self, x0: Tensor, diffusion) -> Tensor:
        """[num_images * (frames + 1), C, H, W] in [0, 1]: each image, then its noised versions."""
        T = diffusion.T
        ts = torch.linspace(0, T - 1, self.num_frames).round().long().to(x0.device)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.seed)).to(x0.device)
        frames = [x0] + [diffusion.q_sample(x0, t.expand(x0.shape[0]), eps) for t in ts]
        strip = torch.stack(frames, dim=1).flatten(0, 1)
        return to_unit(strip).cpu()

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        ds = getattr(trainer.datamodule, "train_set", None)
        if ds is None or len(ds) == 0 or trainer.fast_dev_run:
            return
        x0 = torch.stack([ds[i][0] for i in range(min(self.num_images, len(ds)))]).to(pl_module.device)
        strip = self.strip(x0, pl_module.diffusion)
        grid = image_grid(strip, nrow=strip.shape[0] // x0.shape[0])
        save_and_log(trainer, "data/forward_process", "forward", grid)


class LossByTimestep(pl.Callback):
    """``train/loss_q1`` .. ``train/loss_q{num_bins}``: the per-sample training loss averaged by timestep bin
    over each logging interval (all ranks), from the ``loss_per_sample`` and ``t`` the module's training_step
    returns. Summed on the device every step; read once per interval."""

    def __init__(self, num_bins: int = 4, every_n_steps: int | None = None):
        self.num_bins, self.every_n_steps = num_bins, every_n_steps
        self._sums: Tensor | None = None  # [2, num_bins]: loss sums, counts
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or "loss_per_sample" not in outputs:
            return
        loss, t = outputs["loss_per_sample"].detach().float(), outputs["t"]
        if self._sums is None:
            self._sums = torch.zeros(2, self.num_bins, device=loss.device)
        bins = (t * self.num_bins).div(pl_module.diffusion.T, rounding_mode="floor").clamp_(max=self.num_bins - 1)
        self._sums[0].index_add_(0, bins, loss)
        self._sums[1].index_add_(0, bins, torch.ones_like(loss))
        every = self.every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0 and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            sums = trainer.strategy.reduce(self._sums, reduce_op="sum")
            means = (sums[0] / sums[1]).tolist()  # the one host sync, once per interval
            counts = sums[1].tolist()
            log_scalars(
                trainer,
                {f"train/loss_q{i + 1}": m for i, (m, c) in enumerate(zip(means, counts, strict=True)) if c > 0},
            )
            self._sums.zero_()


class Throughput(pl.Callback):
    """``train/img_per_sec`` (all ranks together) and ``train/steps_per_sec``, from the wall time between two
    logging steps. The CPU runs ahead of the GPU by a bounded queue, so over an interval of tens of steps the
    rate is right without synchronizing; time spent in validation is left out."""

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps
        self._t0: float | None = None
        self._step0 = 0
        self._images = 0

    def _restart(self, trainer) -> None:
        self._t0, self._step0, self._images = time.perf_counter(), trainer.global_step, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._restart(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._restart(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += x0.shape[0] * trainer.world_size
        every = self.every_n_steps or trainer.log_every_n_steps
        steps = trainer.global_step - self._step0
        if self._t0 is None or steps <= 0 or trainer.global_step % every:
            return
        seconds = time.perf_counter() - self._t0
        log_scalars(trainer, {"train/img_per_sec": self._images / seconds, "train/steps_per_sec": steps / seconds})
        self._restart(trainer)


class LastStep(pl.Callback):
    """Logs the training metrics of the last step when it is not a logging step, so a short run (fewer steps
    than ``log_every_n_steps``) still leaves its loss in metrics.csv and the dashboards."""

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run or trainer.global_step == 0 or trainer.global_step % trainer.log_every_n_steps == 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if metrics:
            log_scalars(trainer, metrics)
