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

from ddpmlab.api import CONFIG_DIR, denoiser_from_checkpoint, load_checkpoint, pick_device
from ddpmlab.cli.common import friendly_errors
from ddpmlab.cli.conditioning import conditioning, inpaint, wants_inpainting
from ddpmlab.data.datasets import to_uint8
from ddpmlab.images import save_grid
from ddpmlab.perf import sampling_cpu_threads
from ddpmlab.progress import SamplingProgress
from ddpmlab.errors import ConfigError
from ddpmlab.samplers import Sampler


@torch.no_grad()
def generate(
    denoiser, sampler: Sampler, num_samples: int, batch_size: int, seed: int, device: torch.device,
    labels: torch.Tensor | None = None, progress: bool = True,
) -> torch.Tensor:
    """``num_samples`` images in [-1, 1], [N,C,H,W], in batches; all noise comes from one seeded generator,
    so the same seed and batch size give the same samples. ``labels`` [N]: the class of each (conditional models)."""
    net = denoiser.net
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    evals = sampler.num_evals(denoiser.diffusion) * math.ceil(num_samples / batch_size)
    with SamplingProgress(evals, f"sampling {num_samples}", enabled=progress) as bar:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            x_T = torch.randn((n, net.in_channels, net.image_size, net.image_size), generator=generator, device=device)
            cond = None if labels is None else labels[start : start + n].to(device)
            x0 = sampler(denoiser, denoiser.diffusion, x_T, generator=generator, cond=cond, progress=bar.wrap)
            out.append(x0.cpu())
    return torch.cat(out)


@torch.no_grad()
def save_chain(denoiser, sampler: Sampler, num_samples: int, num_frames: int, seed: int, device: torch.device, path: Path) -> Path:
    """The x_T -> x_0 progression of ``num_samples`` samples (their own seeded draw) as one PNG strip: rows =
    samples, columns = ``num_frames`` states evenly spaced over the sampler's steps, x_T first and x_0 last."""
    net = denoiser.net
    generator = torch.Generator(device).manual_seed(seed)
    x_T = torch.randn((num_samples, net.in_channels, net.image_size, net.image_size), generator=generator, device=device)
    frames = sampler.chain(denoiser, denoiser.diffusion, x_T, num_frames, generator=generator).cpu()  # [n,F,C,H,W]
    save_grid((frames.flatten(0, 1).clamp(-1, 1) + 1) / 2, path, nrow=frames.shape[1])
    return path


def sample(cfg: DictConfig, output_dir: str | Path) -> Path:
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise ConfigError(f"num_samples ({cfg.num_samples}) and batch_size ({cfg.batch_size}) must be >= 1")
    device = pick_device(cfg.device)
    denoiser, ckpt_cfg = denoiser_from_checkpoint(load_checkpoint(cfg.ckpt_path), ema=cfg.use_ema)
    denoiser.to(device)
    sampling_cpu_threads(denoiser, device, cfg.batch_size)  # small networks sample faster on one CPU thread
    if wants_inpainting(cfg):
        return inpaint(cfg, denoiser, ckpt_cfg, device, Path(output_dir))
    labels, denoiser = conditioning(cfg, denoiser, cfg.num_samples)  # guided for a class-conditional model
    sampler = instantiate(cfg.sampler)
    start = time.perf_counter()
    images = generate(denoiser, sampler, cfg.num_samples, cfg.batch_size, cfg.seed, device, labels)
    seconds = time.perf_counter() - start
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {} if labels is None else {"labels": labels.numpy()}
    np.savez_compressed(out / "samples.npz", images=to_uint8(images).permute(0, 2, 3, 1).numpy(), **extra)
    shown = images[:100]
    save_grid((shown + 1) / 2, out / "grid.png", nrow=None if labels is None else int(labels.unique().numel()))  # a column per class
    print(f"{cfg.num_samples} samples with {sampler} in {seconds:.1f}s ({cfg.num_samples / seconds:.1f} img/s) on {device}")
    if cfg.get("save_chain"):
        save_chain(denoiser, sampler, cfg.chain_samples, cfg.chain_frames, cfg.seed, device, out / "chain.png")
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = sample(cfg, HydraConfig.get().runtime.output_dir)
    print(out)


if __name__ == "__main__":
    main()
