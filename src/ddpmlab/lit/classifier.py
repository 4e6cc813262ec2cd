"""ClassifierModule: trains the noisy classifier p_phi(y | x_t, t) of classifier guidance on x_t ~ q(x_t | x_0)
(Dhariwal & Nichol 2021, Sec. 4.1) with cross-entropy; wiring and logging only. Validation logs the accuracy at
fixed timesteps (``val/acc_t<t>``): near t = 0 it is a plain classifier, near T it must fall to chance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpmlab.diffusion.gaussian import GaussianDiffusion
from ddpmlab.lit.module import check_compatible
from ddpmlab.seeding import seed_step, validation_seed


class ClassifierModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        acc_fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.95),
        seed: int = 0,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.net, self.diffusion, self.optimizer_factory, self.seed = net, diffusion, optimizer, seed
        self.config = config or {}
        # The timesteps whose accuracy validation logs, as fractions of T.
        self.acc_timesteps = sorted({min(int(f * diffusion.T), diffusion.T - 1) for f in acc_fractions})
        self._noise: torch.Generator | None = None
        self.loss_in_progress_bar = True

    def on_train_start(self) -> None:
        self._noise = torch.Generator(self.device)

    def _noised(self, x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.diffusion.q_sample(x0, t, eps)  # DDPM eq. (4)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch
        seed_step(self._noise, self.seed, self.global_rank, self.global_step)  # a resumed run draws the same
        t = torch.randint(0, self.diffusion.T, (x0.shape[0],), device=x0.device, generator=self._noise)
        logits = self.net(self._noised(x0, t, self._noise), t)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=self.loss_in_progress_bar)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, y = batch
        g = torch.Generator(x0.device).manual_seed(validation_seed(self.seed, self.global_rank, batch_idx))
        t = torch.randint(0, self.diffusion.T, (x0.shape[0],), device=x0.device, generator=g)
        logits = self.net(self._noised(x0, t, g), t)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)
        for t_fixed in self.acc_timesteps:  # accuracy by t
            t = torch.full_like(y, t_fixed)
            correct = (self.net(self._noised(x0, t, g), t).argmax(-1) == y).float().mean()
            self.log(f"val/acc_t{t_fixed}", correct, sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer_factory(self.net.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ddpmlab_config"] = self.config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint.get("ddpmlab_config"), self.config)
