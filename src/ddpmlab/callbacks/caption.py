"""How often a text model on the digit pairs draws what its caption says, during training: ``val/caption_acc`` (the
seen pairs), ``val/caption_acc_held_out`` (the pairs never trained on) and ``val/caption_swap`` (the swap test), by
the protocol of :mod:`ddpmlab.metrics.caption` with a few samples per pair on a short sampler grid, drawn with the
EMA weights every ``every_n_steps`` steps and at the end.

The judge (an RBF-SVM fit on the training digits) is fit once per process. The samples are drawn on global rank 0
alone (a few hundred small images) and its numbers broadcast to every rank, so that ``callback_metrics`` agree
across ranks under DDP; the other ranks wait in the broadcast. Data without digit pairs, or a model without text,
switches the callback off with one warning: training goes on.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ddpmlab.callbacks.dashboard import log_scalars
from ddpmlab.callbacks.periodic import EveryNSteps
from ddpmlab.callbacks.utils import ema_denoiser, sampling_perf
from ddpmlab.conditioning import text_cond
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.caption import caption_accuracy, digit_svm
from ddpmlab.samplers import GuidedDenoiser, generate
from ddpmlab.samplers.guidance import check_rescale


class CaptionAccuracy(EveryNSteps):
    def __init__(
        self,
        every_n_steps: int = 500,
        per_pair: int = 2,
        num_steps: int | None = 20,
        guidance: float = 0.0,
        guidance_rescale: float = 0.0,
        seed: int = 0,
        batch_size: int = 256,
        at_train_end: bool = True,
    ):
        """``per_pair`` samples of each of the 100 ordered pairs (the same noise at every evaluation, from
        ``seed``), on the run's sampler respaced to ``num_steps`` (None: its own grid), with classifier-free
        guidance weight ``guidance`` (0: the conditional model alone) rescaled by ``guidance_rescale`` (phi, Lin et al.
        2024, eq. 16), ``batch_size`` images per forward pass."""
        if not (isinstance(per_pair, int) and per_pair >= 1) or batch_size < 1:
            raise ConfigError(
                f"callbacks.caption.per_pair ({per_pair}) and callbacks.caption.batch_size ({batch_size}) must be "
                "integers >= 1"
            )
        if not float(guidance) >= 0:
            raise ConfigError(f"callbacks.caption.guidance={guidance} must be >= 0 (0: the conditional model)")
        super().__init__(every_n_steps, num_steps, at_train_end)
        self.per_pair, self.guidance, self.seed, self.batch_size = per_pair, float(guidance), seed, batch_size
        self.guidance_rescale = check_rescale(guidance_rescale)
        self.enabled = True
        self.seconds = 0.0  # wall time spent here, to report the overhead

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        dataset = getattr(trainer.datamodule, "train_set", None)
        reason = None
        if not getattr(pl_module, "text", False):
            reason = "the model is not conditioned on text"
        elif not hasattr(dataset, "held_out") or len(getattr(dataset, "captions", ())) != 100:
            reason = f"the data ({getattr(trainer.datamodule, 'name', '?')}) is not data=digit_pairs"
        if reason is not None:  # the same on every rank: the config is
            self.enabled = False
            rank_zero_warn(f"caption accuracy switched off, training goes on: {reason} (~callbacks.caption)")

    def active(self, trainer: pl.Trainer) -> bool:
        return self.enabled and not trainer.fast_dev_run  # a dry run measures nothing

    def run(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        values = self.evaluate(trainer, pl_module) if trainer.is_global_zero else None
        values = trainer.strategy.broadcast(values, src=0)
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        log_scalars(trainer, values)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The numbers of one evaluation (on this rank alone)."""
        start = time.perf_counter()
        dataset = trainer.datamodule.train_set  # the captions and held-out keys (the same in every split)
        judge = digit_svm(float(getattr(trainer.datamodule, "val_fraction", 0.1)))
        raw = ema_denoiser(trainer, pl_module)
        perf = sampling_perf(pl_module, raw)
        denoiser = GuidedDenoiser(raw, self.guidance, self.guidance_rescale) if self.guidance else raw
        sampler = self.sampler(pl_module)

        def sample(prompts: list[str], seed: int) -> torch.Tensor:
            cond = text_cond(raw, prompts)
            return generate(denoiser, sampler, len(prompts), seed=seed, batch_size=self.batch_size, cond=cond,
                            perf=perf)  # fmt: skip

        metrics = caption_accuracy(sample, dataset.captions, dataset.held_out, judge, self.per_pair, self.seed).metrics
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return {
            "val/caption_acc": metrics["seen"]["accuracy"],
            "val/caption_acc_held_out": metrics["held_out"]["accuracy"],
            "val/caption_swap": metrics["swap"]["all"],
            "val/caption_seconds": seconds,
        }

    def __repr__(self) -> str:
        return (
            f"CaptionAccuracy(every_n_steps={self.every_n_steps}, per_pair={self.per_pair}, "
            f"num_steps={self.num_steps}, guidance={self.guidance})"
        )
