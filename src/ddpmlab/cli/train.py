"""``python train.py [overrides]``: compose the config, build the objects, fit."""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpmlab.cli.common import CONFIG_DIR, build_denoiser, friendly_errors
from ddpmlab.lit.module import DiffusionModule


def build_module(cfg: DictConfig) -> DiffusionModule:
    return DiffusionModule(
        denoiser=build_denoiser(cfg),
        objective=instantiate(cfg.objective),
        optimizer=instantiate(cfg.optimizer),
        lr_warmup_steps=cfg.lr_warmup_steps,
        sampler=instantiate(cfg.sampler),
        p_uncond=cfg.p_uncond,
        seed=cfg.seed,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model as ``cfg`` describes; return the final metrics. The CLI and the tests both call this."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.get("ema"):
        callbacks.append(instantiate(cfg.ema))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(module.config)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg, trainer))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        print(f"run directory: {trainer.default_root_dir}")
    return metrics


def resume_path(cfg: DictConfig, trainer: pl.Trainer) -> str | None:
    """``ckpt_path`` as given; else this run directory's own last.ckpt if there is one (a requeued or
    restarted job continues where it stopped)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    # Lightning itself falls back to "last" when OnExceptionCheckpoint is present, and says so loudly.
    warnings.filterwarnings("ignore", message=r".*ckpt_path=None.*was called without a model")
    warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available")
    last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
