"""Config checks run by the entry points before anything is built, read or trained.

Each failed check is a ConfigError that names the key, the value it got and what would work, so that a bad value
costs a second, not a traceback some steps into training. Sections the user replaced with their own objects (a
network of their own, another optimizer) are checked only where they have the keys these checks know."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddpmlab.diffusion.parameterization import PREDICTIONS, ZERO_SNR_NEEDS_V
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.sampler import check_sampler_config, zero_snr_refusal


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def need_int(cfg: DictConfig, key: str, minimum: int, fix: str = "", allow: tuple = ()) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value in allow or (_is_int(value) and value >= minimum):
        return
    also = "".join(f" or {a}" for a in allow if a is not None) + (" or null" if None in allow else "")
    raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}{also}{'; ' + fix if fix else ''}")


def need_number(
    cfg: DictConfig,
    key: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
    fix: str = "",
) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if (
        _is_num(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    ):
        return
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    what = "is outside" if _is_num(value) else "must be a number in"
    raise ConfigError(f"{key}={value!r} {what} {interval}{'; ' + fix if fix else ''}")


def has(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False) is not None


def require(cfg: DictConfig, key: str, example: str) -> None:
    """A mandatory value (``???`` in the config) that is missing: a one-line error with the way to give it."""
    if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key, default=None) in (None, ""):
        raise ConfigError(f"{key} is required: {example}")


def check_schedule(cfg: DictConfig) -> int | None:
    """The schedule section; returns T where it is known."""
    if has(cfg, "schedule.num_timesteps"):
        need_int(cfg, "schedule.num_timesteps", 2, "a diffusion needs at least 2 steps (DDPM: 1000)")
    start, end = OmegaConf.select(cfg, "schedule.beta_start"), OmegaConf.select(cfg, "schedule.beta_end")
    for key, value in (("beta_start", start), ("beta_end", end)):
        if value is not None:
            need_number(cfg, f"schedule.{key}", 0.0, 1.0, low_open=True, fix="betas are variances of a step")
    if start is not None and end is not None and not start < end:
        raise ConfigError(
            f"schedule.beta_start={start} must be below schedule.beta_end={end} (the noise added per "
            f"step grows with t; DDPM: 1e-4 to 0.02); swap them"
        )
    zero_snr = OmegaConf.select(cfg, "schedule.zero_terminal_snr", default=None)
    if zero_snr is not None and not isinstance(zero_snr, bool):
        raise ConfigError(f"schedule.zero_terminal_snr={zero_snr!r} must be true or false")
    return OmegaConf.select(cfg, "schedule.num_timesteps")


def check_zero_terminal_snr(cfg: DictConfig) -> None:
    """A zero-terminal-SNR schedule (Lin et al. 2024) with what it needs: a prediction that defines x0 at
    alpha_bar_T = 0 (v or x0) and a sampler that is defined there (``zero_snr_refusal``)."""
    if not OmegaConf.select(cfg, "schedule.zero_terminal_snr", default=False):
        return
    if cfg.get("prediction") == "eps":
        raise ConfigError(ZERO_SNR_NEEDS_V)
    spacing = OmegaConf.select(cfg, "sampler.spacing", default=None)
    why = zero_snr_refusal(OmegaConf.select(cfg, "sampler.algorithm", default=None), spacing, spacing != "leading")
    if why:
        raise ConfigError(why)


def check_sampler(cfg: DictConfig, T: int | None) -> None:
    """The keys of the sampler section that are set (a ``???`` key comes from the checkpoint later), by the
    sampler's own check; a sampler of the user's own ``_target_`` is theirs to check."""
    section = cfg.get("sampler")
    if not isinstance(section, DictConfig) or not str(section.get("_target_", "ddpmlab.")).startswith("ddpmlab."):
        return
    values = OmegaConf.to_container(section, resolve=True)
    check_sampler_config({k: values[k] for k in section if not OmegaConf.is_missing(section, k)}, T)


def check_model(cfg: DictConfig) -> None:
    mult = OmegaConf.select(cfg, "model.channel_mult")
    if mult is not None and (not OmegaConf.is_list(mult) or not mult or not all(_is_int(m) and m > 0 for m in mult)):
        raise ConfigError(
            f"model.channel_mult={OmegaConf.to_container(mult) if OmegaConf.is_list(mult) else mult!r} "
            f"must be a non-empty list of positive integers, one per resolution (e.g. [1,2,2,2])"
        )
    for key in ("base_channels", "num_heads", "num_groups"):
        if has(cfg, f"model.{key}"):
            need_int(cfg, f"model.{key}", 1)
    if has(cfg, "model.num_res_blocks"):
        need_int(cfg, "model.num_res_blocks", 1)
    if has(cfg, "model.dropout"):
        need_number(cfg, "model.dropout", 0.0, 1.0)


def check_train_config(cfg: DictConfig) -> None:
    """Every value of a training config that can be checked without reading data."""
    if cfg.get("prediction") not in PREDICTIONS:
        raise ConfigError(
            f"prediction={cfg.get('prediction')!r} is not a parameterization; choose one of {', '.join(PREDICTIONS)}"
        )
    need_int(cfg, "seed", 0)
    for key in ("lr_warmup_steps", "lr_schedule"):  # top-level keys of older configs: ignored where they stand
        if key in cfg:
            raise ConfigError(f"{key} is optimizer.{key} now: move it under optimizer (optimizer.{key}=...)")
    if has(cfg, "optimizer.lr_warmup_steps"):
        need_int(cfg, "optimizer.lr_warmup_steps", 0)
    need_number(cfg, "p_uncond", 0.0, 1.0, fix="the share of labels dropped for classifier-free guidance")
    T = check_schedule(cfg)
    check_zero_terminal_snr(cfg)
    check_model(cfg)
    check_sampler(cfg, T)
    if has(cfg, "optimizer.lr"):
        need_number(cfg, "optimizer.lr", 0.0, low_open=True, fix="e.g. optimizer.lr=2e-4")
    if has(cfg, "optimizer.weight_decay"):
        need_number(cfg, "optimizer.weight_decay", 0.0)
    betas = OmegaConf.select(cfg, "optimizer.betas")
    good = OmegaConf.is_list(betas) and len(betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in betas)
    if betas is not None and not good:
        raise ConfigError(f"optimizer.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9,0.999]")
    if has(cfg, "ema.decay"):
        need_number(cfg, "ema.decay", 0.0, 1.0, fix="e.g. 0.9999 (DDPM)")
    need_int(cfg, "trainer.max_steps", 1, "how many optimizer steps to train", allow=(-1,))
    if OmegaConf.select(cfg, "trainer.max_steps") == -1:
        need_int(cfg, "trainer.max_epochs", 1, "with trainer.max_steps=-1 the epochs bound the run")
    for key in ("trainer.log_every_n_steps", "trainer.accumulate_grad_batches"):
        if has(cfg, key):
            need_int(cfg, key, 1)
    interval = OmegaConf.select(cfg, "trainer.val_check_interval")
    steps_or_share = (_is_int(interval) and interval >= 1) or (_is_num(interval) and 0 < interval <= 1)
    if interval is not None and not steps_or_share:
        raise ConfigError(
            f"trainer.val_check_interval={interval!r} must be a number of steps >= 1 or a share of an epoch in (0, 1]"
        )
    if has(cfg, "trainer.gradient_clip_val"):
        need_number(cfg, "trainer.gradient_clip_val", 0.0, fix="or null for no clipping")
    for key in ("callbacks.checkpoint.every_n_train_steps", "callbacks.sample_grid.every_n_steps"):
        if has(cfg, key):
            need_int(cfg, key, 0, "0 turns it off")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"ckpt_path={ckpt!r} must be a path to a .ckpt file, or last")


# 20x the 50,000 samples FID is computed on. samples.npz holds them all and np.load reads it whole: a million
# samples is 3 GB at 32x32 RGB (C*H*W bytes each), 197 GB at 256x256.
MAX_NUM_SAMPLES = 1_000_000


def check_sample_config(cfg: DictConfig) -> None:
    require(cfg, "ckpt_path", "python sample.py ckpt_path=<run dir>/checkpoints/last.ckpt")
    need_int(cfg, "num_samples", 1)
    if cfg.num_samples > MAX_NUM_SAMPLES:
        raise ConfigError(
            f"num_samples={cfg.num_samples} is more than {MAX_NUM_SAMPLES:,}: samples.npz holds them all, C*H*W bytes "
            f"each ({cfg.num_samples * 3072 / 1e9:,.0f} GB at 32x32 RGB), and is read whole; FID uses 50,000. Draw a "
            f"larger set as several runs with different seeds"
        )
    need_int(cfg, "batch_size", 1)
    need_int(cfg, "seed", 0)
    check_guidance_rescale(cfg, "guidance_rescale")
    check_sampler(cfg, None)  # the checkpoint's T is checked once it is loaded (check_sampler_steps)


def check_guidance_rescale(cfg: DictConfig, key: str) -> None:
    if has(cfg, key):
        need_number(cfg, key, 0.0, 1.0, high_open=False, fix="phi of Lin et al. 2024 eq. 16; 0: plain guidance")


def check_evaluate_config(cfg: DictConfig) -> None:
    require(cfg, "ckpt_path", "python evaluate.py ckpt_path=<run dir>/checkpoints/last.ckpt")
    need_int(cfg, "batch_size", 1)
    need_int(cfg, "seed", 0)
    for section in ("guided", "sr", "caption"):
        check_guidance_rescale(cfg, f"{section}.guidance_rescale")


def check_sampler_steps(cfg: DictConfig, T: int) -> None:
    """A sampler config against the T of the checkpoint it will run on."""
    check_sampler(cfg, T)
