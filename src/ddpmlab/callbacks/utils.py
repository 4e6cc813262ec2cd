"""Helpers the callbacks share: the EMA denoiser, the sampling levers, logging an image to any logger."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from ddpmlab.lit.ema import EMA


def ema_denoiser(trainer, pl_module):
    """The EMA copy's denoiser when an EMA callback is active, else the module's own."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA) and cb.averaged_module() is not None:
            return cb.averaged_module().denoiser
    return pl_module.denoiser


def sampling_perf(pl_module, denoiser=None):
    """The ``perf.sampling`` config the run was given (``ddpmlab.perf.apply_perf`` keeps it), or None. When the
    callback samples with the training network itself (no EMA), it is not compiled for sampling: training would
    then run through the sampling graphs (its own ``perf.compile`` decides)."""
    perf = getattr(pl_module, "sampling_perf", None)
    if perf is not None and denoiser is pl_module.denoiser:
        perf = {**perf, "compile": False}
    return perf


def dashboard_step(trainer) -> int:
    """The step a callback logs at: the one Lightning gives ``self.log`` values of the batch just trained
    (callbacks run after the optimizer step has incremented ``global_step``)."""
    return max(0, trainer.global_step - 1)


def log_image(trainer, key: str, image: torch.Tensor, step: int) -> None:
    """Send one [C,H,W] image in [0, 1] to every logger that takes images (W&B, TensorBoard)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step)


def log_labelled_samples(trainer, images: torch.Tensor, labels: torch.Tensor, step: int) -> None:
    """A class-conditional model's samples as a W&B Table (label, image): filterable by class in the UI."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    import wandb

    rows = [[int(y), wandb.Image(x.permute(1, 2, 0).numpy())] for x, y in zip(images.cpu(), labels.cpu(), strict=True)]
    for logger in loggers:
        logger.log_table(key="samples/table", columns=["label", "image"], data=rows, step=step)
