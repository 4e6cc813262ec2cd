"""What ``sample.py`` adds for class-conditional checkpoints (labels, classifier-free guidance) and for
inpainting (RePaint): the inputs read from files or the dataset, and the side-by-side picture."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ddpmlab.data.datasets import to_model_range, to_uint8
from ddpmlab.diffusion.timesteps import make_timesteps
from ddpmlab.errors import ConfigError
from ddpmlab.images import save_grid
from ddpmlab.samplers.guidance import GuidedDenoiser, cycle_labels
from ddpmlab.samplers.masks import make_mask
from ddpmlab.samplers.repaint import repaint_sample, repaint_schedule


def conditioning(cfg: DictConfig, denoiser, n: int):
    """(labels [n] or None, the denoiser to sample with): a class-conditional checkpoint draws ``cfg.labels``
    cycled over the n samples (null: every class in turn) with guidance weight ``cfg.guidance``."""
    labels, w = cfg.get("labels"), float(cfg.get("guidance") or 0.0)
    num_classes = getattr(denoiser.net, "num_classes", None)
    if not num_classes:
        if labels is not None or w != 0:
            raise ConfigError(
                "labels= and guidance= need a class-conditional checkpoint (trained with model.num_classes, e.g. "
                "experiment=cond_digits); this one is unconditional: drop them"
            )
        return None, denoiser
    return cycle_labels(labels, num_classes, n), GuidedDenoiser(denoiser, w)


def wants_inpainting(cfg: DictConfig) -> bool:
    spec = cfg.get("inpaint") or {}
    return spec.get("image") is not None or spec.get("index") is not None


def load_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """An image file as [1,C,size,size] in [-1, 1] (antialiased resize; grey or RGB as the model)."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"inpaint.image: no file at {p}")
    try:
        img = decode_image(read_file(str(p)), mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"inpaint.image: cannot read {p} as an image ({str(e).splitlines()[0][:200]}); give a PNG or JPEG") from e
    return to_model_range(resize(img, [size, size], antialias=True))[None]


def dataset_image(data_cfg: DictConfig, index: int, split: str = "val") -> tuple[torch.Tensor, int]:
    """Image ``index`` of the checkpoint's dataset split ('val' or 'train') as [1,C,H,W] in [-1, 1], and its label."""
    datamodule = instantiate(data_cfg)
    datamodule.setup("fit")
    ds = {"val": datamodule.val_set, "train": datamodule.train_set}.get(split)
    if ds is None or not 0 <= index < len(ds):
        raise ConfigError(f"inpaint.index={index} is not an image of the {data_cfg.name} '{split}' split "
                          f"({0 if ds is None else len(ds)} images); use inpaint.split=val|train and an index below that")
    x0, label = ds[index]
    return x0[None], int(label)


def inpaint(cfg: DictConfig, denoiser, ckpt_cfg: DictConfig, device: torch.device, out: Path) -> Path:
    """RePaint ``num_samples`` completions of one image; writes samples.npz (completions, original, keep, labels)
    and inpaint.png: rows of [masked input | completions | original]."""
    spec, net = cfg.inpaint, denoiser.net
    latent = hasattr(denoiser, "first_stage")  # latent diffusion: RePaint on z = s E(x), the mask at latent size
    channels, size = (ckpt_cfg.data.channels, ckpt_cfg.data.image_size) if latent else (net.in_channels, net.image_size)
    if spec.get("image") is not None:
        x0 = load_image(spec.image, channels, size)
    else:
        x0, _ = dataset_image(ckpt_cfg.data, int(spec.index), spec.get("split", "val"))
    generator = torch.Generator(device).manual_seed(cfg.seed)
    keep = make_mask(str(spec.mask), size, torch.Generator().manual_seed(cfg.seed))  # [H,W], 1 = known
    known, known_keep = x0.to(device), keep
    if latent:  # a latent is known only where every pixel of its f x f block is
        known = denoiser.encode(known, generator=generator)
        known_keep = -torch.nn.functional.max_pool2d(-keep[None, None].float(), size // net.image_size)[0, 0]
    labels = None  # a class-conditional model completes unconditionally (null label) unless labels are given
    if cfg.get("labels") is not None:
        labels, denoiser = conditioning(cfg, denoiser, cfg.num_samples)
    elif float(cfg.get("guidance") or 0.0) != 0:
        raise ConfigError("inpainting with guidance= needs labels=[...], the class(es) to complete towards")
    ts = make_timesteps(denoiser.diffusion.T, min(spec.num_steps, denoiser.diffusion.T), spec.spacing)  # at most T steps
    states = repaint_schedule(len(ts), spec.jump_length, spec.jump_n_sample)
    evals = sum(k_next < k for k, k_next in zip(states, states[1:]))  # one network evaluation per reverse step
    completions, start = [], time.perf_counter()
    for lo in range(0, cfg.num_samples, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num_samples - lo)
        x_T = torch.randn((n, *known.shape[1:]), generator=generator, device=device)
        cond = None if labels is None else labels[lo : lo + n].to(device)
        completions.append(denoiser.decode(repaint_sample(
            denoiser, denoiser.diffusion, x_T, ts, x0=known, keep=known_keep.to(device), generator=generator,
            jump_length=spec.jump_length, jump_n_sample=spec.jump_n_sample, variance=spec.variance, cond=cond,
        )).cpu())
    images = torch.cat(completions)
    print(f"{cfg.num_samples} RePaint completions ({len(ts)} steps, jump_length={spec.jump_length}, "
          f"jump_n_sample={spec.jump_n_sample}: {evals} network evaluations each) in {time.perf_counter() - start:.1f}s")
    out.mkdir(parents=True, exist_ok=True)
    hwc = lambda x: to_uint8(x).permute(0, 2, 3, 1).numpy()  # noqa: E731
    extra = {} if labels is None else {"labels": labels.numpy()}
    np.savez_compressed(out / "samples.npz", images=hwc(images), original=hwc(x0)[0], keep=keep.bool().numpy(), **extra)
    save_grid(side_by_side(x0, keep, images), out / "inpaint.png", nrow=min(8, len(images)) + 2, min_cell=64)
    return out


def side_by_side(x0: torch.Tensor, keep: torch.Tensor, completions: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Rows of [masked input (unknown pixels mid-grey) | up to ``per_row`` completions | original], in [0, 1]."""
    masked = (x0 * keep + 1) / 2  # unknown pixels at 0 in [-1, 1]: mid-grey
    original = (x0 + 1) / 2
    shown = (completions.clamp(-1, 1) + 1) / 2
    rows = []
    for lo in range(0, len(shown), per_row):
        chunk = shown[lo : lo + per_row]
        pad = torch.ones(per_row - len(chunk), *chunk.shape[1:]) if lo else chunk[:0]
        rows.append(torch.cat([masked, chunk, pad, original]))
    return torch.cat(rows)
