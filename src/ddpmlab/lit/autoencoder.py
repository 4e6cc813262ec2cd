"""AutoencoderModule: trains LDM's first stage (ddpmlab.networks.autoencoder). Wiring and logging only.

The loss is LDM's (Rombach et al. 2022, Appendix G; taming-transformers' LPIPSWithDiscriminator), per pixel:

    L = L_rec + w_p LPIPS + w_reg L_reg + lambda_adv L_G            L_rec: |x - x_hat| (l1) or (x - x_hat)^2 (l2)

- KL-reg: L_reg = KL(q(z|x) || N(0, I)) summed over the latent and divided by the number of pixels (LDM sums both
  terms over all elements; dividing both by the pixel count keeps its weight, 1e-6, meaningful);
- VQ-reg: L_reg = the quantiser's codebook + commitment loss (VQ-VAE eq. 3), weight 1;
- from step ``disc_start`` on, a patch discriminator with the hinge loss, L_G = -E[D(x_hat)], weighted by the
  adaptive lambda_adv = w_d ||grad_L L_rec|| / (||grad_L L_G|| + 1e-4) at the decoder's last layer L (VQGAN eq. 7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.images import to_unit
from ddpmlab.networks.autoencoder import Autoencoder, PatchDiscriminator
from ddpmlab.seeding import step_seed

RECONSTRUCTION = {"l1": F.l1_loss, "l2": F.mse_loss}


class AutoencoderModule(pl.LightningModule):
    def __init__(
        self,
        autoencoder: Autoencoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        reconstruction: str = "l1",
        reg_weight: float = 1e-6,
        perceptual: torch.nn.Module | None = None,
        perceptual_weight: float = 0.0,
        discriminator: PatchDiscriminator | None = None,
        disc_start: int = 0,
        disc_weight: float = 0.5,
        gradient_clip_val: float | None = None,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if reconstruction not in RECONSTRUCTION:
            raise ConfigError(
                f"first_stage.loss.reconstruction={reconstruction!r}: choose one of {list(RECONSTRUCTION)}"
            )
        self.automatic_optimization = False  # two optimizers (autoencoder, discriminator), as in LDM
        self.autoencoder, self.discriminator, self.perceptual = autoencoder, discriminator, perceptual
        self.optimizer_factory, self.reconstruction, self.reg_weight = optimizer, reconstruction, reg_weight
        self.perceptual_weight, self.disc_start, self.disc_weight = perceptual_weight, disc_start, disc_weight
        self.gradient_clip_val = gradient_clip_val
        self.config = config or {}
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    # ------------------------------------------------------------------ loss
    def losses(self, x: Tensor, x_hat: Tensor, reg: Tensor) -> dict[str, Tensor]:
        rec = RECONSTRUCTION[self.reconstruction](x_hat, x, reduction="none").flatten(1).mean(1)  # [B]
        if self.perceptual is not None and self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.perceptual(x_hat, x).flatten()
        if self.autoencoder.regularizer == "kl":
            reg = reg / x[0].numel()  # KL summed over the latent, per pixel (see the module docstring)
        rec, reg = rec.mean(), reg.mean()
        return {"rec_loss": rec, "reg_loss": reg, "loss": rec + self.reg_weight * reg}

    def adaptive_weight(self, rec_loss: Tensor, g_loss: Tensor) -> Tensor:
        """VQGAN eq. (7): balance the adversarial gradient against the reconstruction's at the last layer."""
        last = self.autoencoder.last_layer()
        g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.disc_weight

    def gan_on(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.disc_start

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, _ = batch
        # The posterior sample z ~ q(z|x) (and dropout) draw from torch's global generator: seeded per (seed, rank,
        # step) as the diffusion module seeds its noise, so a resumed run draws at step k what the uninterrupted
        # run drew there (a checkpoint holds no generator state).
        torch.manual_seed(step_seed(self.config.get("seed", 0), self.global_rank, self.global_step))
        opts = self.optimizers()
        opt_ae, opt_d = (opts if isinstance(opts, list) else [opts, None])[:2]
        gan_on = self.gan_on()  # before opt_ae.step(), which advances global_step
        x_hat, reg = self.autoencoder(x)
        terms = self.losses(x, x_hat, reg)
        loss = terms["loss"]
        if gan_on:
            g_loss = -self.discriminator(x_hat).mean()
            d_weight = self.adaptive_weight(terms["rec_loss"], g_loss)
            loss = loss + d_weight * g_loss
            self.log_dict({"train/g_loss": g_loss, "train/d_weight": d_weight})
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val:
            self.clip_gradients(opt_ae, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt_ae.step()
        if gan_on:  # hinge loss (Geometric GAN; taming's hinge_d_loss)
            logits_real, logits_fake = self.discriminator(x.detach()), self.discriminator(x_hat.detach())
            d_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.optimizer.step()  # the raw optimizer: global_step counts autoencoder steps only
            self.log("train/d_loss", d_loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/rec_loss": terms["rec_loss"], "train/reg_loss": terms["reg_loss"]})
        return loss

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)) with the posterior mean (KL) or the nearest codes (VQ): deterministic."""
        return self.autoencoder.decode(self.autoencoder.encode(x, sample=False))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, _ = batch
        x_hat_train, reg = self.autoencoder(x)
        terms = self.losses(x, x_hat_train, reg)
        x01, rec01 = to_unit(x), to_unit(self.reconstruct(x))
        self.val_psnr(rec01, x01)
        self.val_ssim(rec01, x01)
        mse = F.mse_loss(rec01, x01)  # on the [0, 1] scale, as PSNR
        self.log_dict(
            {
                "val/loss": terms["loss"],
                "val/rec_loss": terms["rec_loss"],
                "val/reg_loss": terms["reg_loss"],
                "val/mse": mse,
            },
            sync_dist=True,
        )
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        self.log("val/ssim", self.val_ssim)

    def configure_optimizers(self):
        opt_ae = self.optimizer_factory([p for p in self.autoencoder.parameters() if p.requires_grad])
        if self.discriminator is None:
            return opt_ae
        return [opt_ae, self.optimizer_factory(self.discriminator.parameters())]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ddpmlab_config"] = self.config  # primitives only: loads with weights_only=True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("ddpmlab_config") or {}).get("first_stage", {}).get("net")
        current = self.config.get("first_stage", {}).get("net")
        if saved and current and saved != current:
            raise CheckpointError(
                f"the checkpoint was trained with a different first_stage.net:\n  checkpoint: {saved}\n"
                f"  this run:   {current}\nuse the same first_stage settings as the run that wrote it, or start afresh"
            )
