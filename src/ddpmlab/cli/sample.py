"""``python sample.py ckpt_path=... num_samples=N seed=S``: samples.npz (uint8 N x H x W x C) and grid.png."""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from ddpmlab.cli.common import CONFIG_DIR, denoiser_from_checkpoint, friendly_errors, load_checkpoint, pick_device
from ddpmlab.data.datasets import to_uint8
from ddpmlab.errors import ConfigError
from ddpmlab.samplers import Sampler


@torch.no_grad()
def generate(denoiser, sampler: Sampler, num_samples: int, batch_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """``num_samples`` images in [-1, 1], [N,C,H,W], in batches; all noise comes from one seeded generator,
    so the same seed and batch size give the same samples."""
    net = denoiser.net
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        x_T = torch.randn((n, net.in_channels, net.image_size, net.image_size), generator=generator, device=device)
        out.append(sampler(denoiser, denoiser.diffusion, x_T, generator=generator).cpu())
    return torch.cat(out)


def sample(cfg: DictConfig, output_dir: str | Path) -> Path:
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise ConfigError(f"num_samples ({cfg.num_samples}) and batch_size ({cfg.batch_size}) must be >= 1")
    device = pick_device(cfg.device)
    denoiser, _ = denoiser_from_checkpoint(load_checkpoint(cfg.ckpt_path), ema=cfg.ema)
    denoiser.to(device)
    sampler = instantiate(cfg.sampler)
    start = time.perf_counter()
    images = generate(denoiser, sampler, cfg.num_samples, cfg.batch_size, cfg.seed, device)
    seconds = time.perf_counter() - start
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples.npz", images=to_uint8(images).permute(0, 2, 3, 1).numpy())
    shown = images[:100]
    save_image(make_grid((shown + 1) / 2, nrow=math.ceil(math.sqrt(shown.shape[0])), padding=1, pad_value=1.0), out / "grid.png")
    print(f"{cfg.num_samples} samples with {sampler} in {seconds:.1f}s ({cfg.num_samples / seconds:.1f} img/s) on {device}")
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = sample(cfg, HydraConfig.get().runtime.output_dir)
    print(out)


if __name__ == "__main__":
    main()
