"""Reconstruction grids of a first stage (stage=autoencoder): validation images beside decode(encode(x))."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from ddpmlab.callbacks.utils import log_image
from ddpmlab.images import save_grid, to_unit


class ReconstructionGrid(pl.Callback):
    """Rows of 8: originals, then their reconstructions (deterministic: posterior mean / nearest codes), for the
    first ``num_images`` validation images; saved to <run dir>/reconstructions/step_*.png and logged."""

    def __init__(self, num_images: int = 32, dirname: str = "reconstructions"):
        self.num_images, self.dirname = num_images, dirname

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.datamodule is None or trainer.datamodule.val_set is None:
            return
        val = trainer.datamodule.val_set
        x = torch.stack([val[i][0] for i in range(min(self.num_images, len(val)))]).to(pl_module.device)
        x_hat = pl_module.reconstruct(x).clamp(-1, 1)
        rows = [t for lo in range(0, len(x), 8) for t in (x[lo : lo + 8], x_hat[lo : lo + 8])]
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:07d}.png"
        grid = save_grid(to_unit(torch.cat(rows).cpu()), path, nrow=8)
        log_image(trainer, "reconstructions/grid", grid, step)
