"""Latent diffusion runs: the first stage (an autoencoder) trained by ddpmlab or brought as a diffusers
``AutoencoderKL`` folder, the training module for it, and the data that feeds the second stage latents.

Stages (the config's ``stage`` key): ``autoencoder`` trains a first stage (experiment=autoencoder_mnist);
``latent_diffusion`` trains the DiffusionModule on z = s * E(x) of a frozen first stage read from
``first_stage.ckpt_path`` (experiment=ldm_mnist); absent: pixel diffusion. A latent-diffusion checkpoint holds the
first stage's weights (``denoiser.first_stage.*``), its architecture (``first_stage.net`` in the stored config)
and the scale factor s (buffer ``denoiser.scale_factor``): sampling needs nothing else.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from ddpmlab.data.order import ResumesAtStep, batch_seed, epoch_order, position
from ddpmlab.diffusion.latent import LatentDenoiser
from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.networks.autoencoder import Autoencoder, PatchDiscriminator
from ddpmlab.stored_config import build_checked, check_plain, read_text

AUTOENCODER, LATENT = "autoencoder", "latent_diffusion"
ENCODE_MODES = ("auto", "once", "per_batch")


def stage_of(cfg: DictConfig | dict) -> str:
    return cfg.get("stage") or "diffusion"


# ---------------------------------------------------------------------------------------------- first stages
class DiffusersAutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE) behind the first-stage interface (moments / encode /
    decode). ``config``: the model's config.json as a dict; weights come from its folder or a checkpoint."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ConfigError("a diffusers AutoencoderKL first stage needs diffusers: pip install diffusers") from e
        self.vae = AutoencoderKL.from_config(dict(config))
        self.in_channels, self.latent_channels = int(config["in_channels"]), int(config["latent_channels"])
        self.factor = 2 ** (len(config["block_out_channels"]) - 1)
        self.image_size = None  # fully convolutional: any multiple of factor

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std

    def encode(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        mean, std = self.moments(x)
        if not sample:
            return mean
        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample


# The only classes a stored first_stage.net config may build (nothing read from a file picks a class freely).
FIRST_STAGES = {
    "ddpmlab.networks.autoencoder.Autoencoder": Autoencoder,
    "ddpmlab.latent.DiffusersAutoencoderKL": DiffusersAutoencoderKL,
}


def build_first_stage(net_cfg: DictConfig | dict, where: str = "checkpoint") -> nn.Module:
    """The first stage's architecture (random weights) from its ``first_stage.net`` config, as stored in the
    checkpoint or folder ``where``: a key its class does not take is a CheckpointError, not a TypeError."""
    spec = OmegaConf.to_container(net_cfg, resolve=True) if isinstance(net_cfg, DictConfig) else net_cfg
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: its first_stage.net is not a config (a {type(spec).__name__})")
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if target not in FIRST_STAGES:
        raise CheckpointError(
            f"{where}: first_stage.net._target_={str(target)[:100]!r} is not a first stage; one of "
            f"{sorted(FIRST_STAGES)}"
        )
    return build_checked(FIRST_STAGES[target], spec, where, "first_stage.net config")


def latent_size(first_stage: nn.Module, image_size: int) -> int:
    return image_size // first_stage.factor


def load_first_stage(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained first stage in eval mode and its ``first_stage.net`` config, from a ddpmlab autoencoder
    checkpoint (.ckpt) or a folder in diffusers' AutoencoderKL format (config.json + safetensors weights)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return load_diffusers_autoencoder(p)
    if not p.is_file():
        raise CheckpointError(
            f"first_stage.ckpt_path={p} does not exist; pass a first-stage checkpoint "
            "(<autoencoder run dir>/checkpoints/last.ckpt) or a diffusers AutoencoderKL folder"
        )
    from ddpmlab.api import load_checkpoint

    ckpt = load_checkpoint(p)  # its config: plain data of bounded size (ddpmlab.stored_config)
    saved = ckpt["ddpmlab_config"]
    saved = saved if isinstance(saved, dict) else {}
    net_cfg = (saved.get("first_stage") if isinstance(saved.get("first_stage"), dict) else {}).get("net")
    if stage_of(saved) != AUTOENCODER or not isinstance(net_cfg, dict):
        raise CheckpointError(
            f"first_stage.ckpt_path={p} is not an autoencoder checkpoint (it was written by a "
            f"{str(stage_of(saved))[:40]} run); train a first stage with: python train.py experiment=autoencoder_mnist"
        )
    net_cfg = dict(net_cfg)
    first_stage = build_first_stage(net_cfg, f"first_stage.ckpt_path={p}")
    prefix = "autoencoder."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        first_stage.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{p}: the weights do not fit the autoencoder its config describes: {str(e)[:200]}"
        ) from e
    return first_stage.eval(), net_cfg


def load_diffusers_autoencoder(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """diffusers' AutoencoderKL from a local folder: its config.json and safetensors weights only (pickled .bin
    weights could run code when read)."""
    import json

    from safetensors.torch import load_file

    cfg_file, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            f"first_stage.ckpt_path={folder} is a folder but not a diffusers AutoencoderKL: it needs config.json and "
            "diffusion_pytorch_model.safetensors (e.g. the vae/ folder of a Stable Diffusion download)"
        )
    where = f"first_stage.ckpt_path={folder}"
    try:
        config = json.loads(read_text(cfg_file, where))
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; nesting deeper than json allows
        raise CheckpointError(f"{cfg_file} is not valid JSON ({str(e)[:200]}); download the VAE folder again") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file} is not a diffusers config (a JSON {type(config).__name__}, not an object)")
    check_plain(config, where, "config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{folder} holds a diffusers {str(config['_class_name'])[:60]}, not an AutoencoderKL")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not str(k).startswith("_")}
    first_stage = build_checked(DiffusersAutoencoderKL, {"config": config}, where, "config.json")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors' own error: a truncated file, a header that is not JSON
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); download it again"
        ) from e
    try:
        first_stage.vae.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: the weights do not fit its config.json: {str(e)[:200]}") from e
    return first_stage.eval(), {"_target_": "ddpmlab.latent.DiffusersAutoencoderKL", "config": config}


# ---------------------------------------------------------------------------------------------- building
def build_autoencoder_module(cfg: DictConfig):
    """The first stage's training module for ``cfg`` (stage=autoencoder)."""
    from ddpmlab.lit.autoencoder import AutoencoderModule
    from ddpmlab.lit.module import optimizer_partial

    # Lightning warns that manual optimisation saves the state after the step: that is the state at global_step.
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization")
    if cfg.trainer.get("gradient_clip_val"):
        raise ConfigError(
            "the autoencoder clips its own gradients (two optimizers, manual optimisation): set "
            "trainer.gradient_clip_val=null and first_stage.gradient_clip_val=<value> instead"
        )
    loss = cfg.first_stage.loss
    autoencoder = instantiate(cfg.first_stage.net)
    discriminator = None
    if loss.get("disc_start") is not None:
        discriminator = PatchDiscriminator(
            autoencoder.in_channels, 64, loss.get("disc_layers", 2), cfg.first_stage.net.get("num_groups", 32)
        )
    return AutoencoderModule(
        autoencoder=autoencoder,
        optimizer=optimizer_partial(cfg.optimizer),
        reconstruction=loss.reconstruction,
        reg_weight=loss.reg_weight,
        perceptual=lpips(autoencoder.in_channels) if loss.get("perceptual_weight") else None,
        perceptual_weight=loss.get("perceptual_weight") or 0.0,
        discriminator=discriminator,
        disc_start=loss.get("disc_start") or 0,
        disc_weight=loss.get("disc_weight", 0.5),
        gradient_clip_val=cfg.first_stage.get("gradient_clip_val"),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


class _GreyToRGB(nn.Module):
    def __init__(self, metric: nn.Module):
        super().__init__()
        self.metric = metric

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x_hat, x = x_hat.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
        return self.metric(x_hat.clamp(-1, 1), x)


def lpips(in_channels: int) -> nn.Module:
    """LPIPS (Zhang et al. 2018, VGG) from torchmetrics, per sample, on images in [-1, 1]. Its linear layers ship
    with torchmetrics; the VGG16 ImageNet weights must already be in torch's hub cache (no download here), and are
    read there as tensors only (:func:`ddpmlab.pretrained.lpips_vgg`: torchvision would unpickle the file)."""
    from torchvision.models import VGG16_Weights

    from ddpmlab.pretrained import hub_path, lpips_vgg

    cached = hub_path(VGG16_Weights.IMAGENET1K_V1.url)
    if not cached.is_file():
        raise ConfigError(
            f"LPIPS needs the VGG16 ImageNet weights at {cached} (not found; nothing is downloaded here): copy "
            f"{Path(cached).name} there or set TORCH_HOME, or train without it: first_stage.loss.perceptual_weight=0"
        )
    return _GreyToRGB(lpips_vgg(cached))


def prepare_latent_config(cfg: DictConfig) -> tuple[DictConfig, nn.Module]:
    """For a latent-diffusion run: read the first stage from ``first_stage.ckpt_path``, check it against the data,
    put its architecture into ``cfg.first_stage.net`` and the latent shape into ``cfg.model``."""
    path = cfg.first_stage.get("ckpt_path") if cfg.get("first_stage") else None
    if not path:
        raise ConfigError(
            "latent diffusion needs a trained first stage: first_stage.ckpt_path=<autoencoder run dir>/"
            "checkpoints/last.ckpt (train one with: python train.py experiment=autoencoder_mnist)"
        )
    if cfg.first_stage.get("encode", "auto") not in ENCODE_MODES:
        raise ConfigError(f"first_stage.encode={cfg.first_stage.encode!r}: choose one of {list(ENCODE_MODES)}")
    first_stage, net_cfg = load_first_stage(path)
    size, channels = cfg.data.image_size, cfg.data.channels
    fixed = getattr(first_stage, "image_size", None)
    if first_stage.in_channels != channels or (fixed is not None and fixed != size) or size % first_stage.factor:
        raise CheckpointError(
            f"the first stage in {path} takes {first_stage.in_channels}-channel {fixed or 'any multiple of '}"
            f"{'' if fixed else first_stage.factor}x{fixed or ''} images, but this run's data are {channels}-channel "
            f"{size}x{size}: use the data settings the autoencoder was trained with (data.image_size, data.channels)"
        )
    with open_dict(cfg):
        cfg.first_stage.net = net_cfg
        cfg.model.in_channels = first_stage.latent_channels
        cfg.model.image_size = latent_size(first_stage, size)
    return cfg, first_stage


def build_latent_denoiser(cfg: DictConfig, net: nn.Module, diffusion, where: str = "checkpoint") -> LatentDenoiser:
    """The denoiser of a latent-diffusion config: its first stage's architecture from ``cfg.first_stage.net``
    (weights: from the first-stage checkpoint when training, from the checkpoint's state_dict when loading)."""
    net_cfg = cfg.first_stage.get("net") if isinstance(cfg.get("first_stage"), DictConfig) else None
    return LatentDenoiser(net, diffusion, build_first_stage(net_cfg, where), cfg.prediction)


# ---------------------------------------------------------------------------------------------- data
def _pixels(dataset, batch_size: int):
    """Batches of x0 [B,C,H,W] in [-1, 1] over a split in order (in-memory tensors or any Dataset)."""
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor) and images.dtype == torch.uint8:
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size].float() / 127.5 - 1.0
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        yield batch[0]


@torch.no_grad()
def encode_split(
    denoiser: LatentDenoiser, dataset, device: torch.device, batch_size: int = 256, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """The unscaled latent moments (mean, std) of a split's first ``limit`` images, on ``device``."""
    means, stds, n = [], [], 0
    for x in _pixels(dataset, batch_size):
        mean, std = denoiser.moments(x.to(device))
        means.append(mean)
        stds.append(std)
        n += x.shape[0]
        if limit is not None and n >= limit:
            break
    mean, std = torch.cat(means), torch.cat(stds)
    return (mean[:limit], std[:limit]) if limit is not None else (mean, std)


class LatentLoader(ResumesAtStep):
    """(z [B,c,h,w], label [B]) batches from latent moments held on one device, with a fresh posterior sample
    z = s * (mean + std * eps) every batch, like encoding each batch anew. Training (``train``): each epoch in the
    order and rank shard of data/order.py, from the first batch not yet trained on (``position``), eps of a batch
    seeded by its place in that order, so a resumed run draws what the uninterrupted run drew. Validation: the
    split in order, the same eps at every pass."""

    def __init__(
        self,
        denoiser: LatentDenoiser,
        mean: Tensor,
        std: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        position: Callable[[int], tuple[int, int] | None] | None = None,
    ):
        self.denoiser, self.mean, self.std, self.labels = denoiser, mean, std, labels.to(mean.device)
        self.batch_size, self.train, self.seed, self.rank, self.world_size = batch_size, train, seed, rank, world_size
        n = mean.shape[0]
        # Training shards are cut to equal length so that every rank runs the same number of steps.
        self.shard_size = n // world_size if train else n
        self.drop_last = train and self.shard_size >= batch_size
        self.epoch, self.position = 0, position

    def __len__(self) -> int:
        return self.shard_size // self.batch_size if self.drop_last else math.ceil(self.shard_size / self.batch_size)

    def __iter__(self):
        where = self.position(len(self)) if self.position is not None else None
        epoch, skip = where if where is not None else (self.epoch, 0)
        self.epoch = epoch + 1  # plain iteration (no Lightning) gets a fresh order every pass
        device = self.mean.device
        if self.train:
            order, _ = epoch_order(self.mean.shape[0], self.seed, epoch, True, False, device)
            shard = order[self.rank :: self.world_size][: self.shard_size]
        else:
            shard, epoch = torch.arange(self.shard_size, device=device), 0
        split = "train" if self.train else "val"
        for b in range(skip, len(self)):
            i = shard[b * self.batch_size : (b + 1) * self.batch_size]
            g = torch.Generator(device).manual_seed(batch_seed(self.seed, self.rank, epoch, b, split))
            yield self.denoiser.scaled_sample(self.mean[i], self.std[i], g), self.labels[i]


class SeededBatches(ResumesAtStep):
    """``encode="per_batch"``: the pixel loader's batches (x, y), each with the seed of its posterior sample
    (data/order.py's ``batch_seed`` of its place in the epoch) as a third element, so the sample drawn after the
    batch reaches the device does not depend on what the process drew before. The pixel loader itself skips the
    batches already trained on; this counts from the same ``position``."""

    def __init__(self, loader, *, train: bool, seed: int, rank: int = 0, position=None):
        self.loader, self.train, self.seed, self.rank, self.position = loader, train, seed, rank, position
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        where = self.position(len(self)) if self.position is not None else None
        epoch, skip = where if where is not None else (self.epoch, 0)
        self.epoch = epoch + 1
        epoch, split = (epoch, "train") if self.train else (0, "val")  # validation: the same draws every pass
        for b, (x, y) in enumerate(self.loader, start=skip):
            yield x, y, batch_seed(self.seed, self.rank, epoch, b, split)


class LatentDataModule(pl.LightningDataModule):
    """Wraps a DiffusionDataModule so the second stage sees latents z = s * E(x) of the frozen first stage:
    ``encode="once"`` encodes each split once on the training device and keeps its moments there;
    ``"per_batch"`` encodes every batch after it reaches the device. Both resume mid-epoch exactly (data/order.py).
    Anything else goes to the wrapped module."""

    def __init__(self, data: pl.LightningDataModule, denoiser: LatentDenoiser, encode: str = "once", seed: int = 0):
        super().__init__()
        self.data, self.denoiser, self.encode, self.seed = data, denoiser, encode, seed
        self.encode_seconds = 0.0

    def __getattr__(self, name: str):
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        # Lightning attaches its trainer to this module only; the wrapped one's loaders ask it for the training
        # device, the rank and where a resumed run stands (per_batch).
        self.data.trainer = self.trainer
        self.data.setup(stage)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _position(self, train: bool):
        return (lambda batches: position(self.trainer, batches)) if train and self.trainer is not None else None

    def _once(self, dataset, train: bool) -> LatentLoader:
        start = time.perf_counter()
        limit = None if train or self.trainer is None else self.trainer.limit_val_batches
        limit = limit * self.data.batch_size if isinstance(limit, int) else None  # only the batches validation uses
        mean, std = encode_split(self.denoiser, dataset, self._device(), limit=limit)
        seconds = time.perf_counter() - start
        self.encode_seconds += seconds
        if train:
            print(f"latent diffusion: encoded {len(mean)} training images once in {seconds:.1f}s", flush=True)
        rank, world_size = self._rank() if train else (0, 1)
        return LatentLoader(
            self.denoiser,
            mean,
            std,
            dataset.labels[: len(mean)],
            self.data.batch_size,
            train=train,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            position=self._position(train),
        )

    def _per_batch(self, loader, train: bool) -> SeededBatches:
        return SeededBatches(loader, train=train, seed=self.seed, rank=self._rank()[0], position=self._position(train))

    def train_dataloader(self):
        if self.encode == "once":
            return self._once(self.data.train_set, True)
        return self._per_batch(self.data.train_dataloader(), True)

    def val_dataloader(self):
        val = self.data.val_set
        if val is None or not len(val):
            return []
        return self._once(val, False) if self.encode == "once" else self._per_batch(self.data.val_dataloader(), False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.encode != "per_batch":
            return batch
        x, y, seed = batch
        return self.denoiser.encode(x, torch.Generator(x.device).manual_seed(seed)), y


def encode_mode(cfg: DictConfig, num_train: int) -> str:
    """``first_stage.encode``; auto: once when the run sees at least one epoch of images (then each image is
    encoded once instead of every time it is drawn), else per batch (the up-front pass would cost more)."""
    mode = cfg.first_stage.get("encode", "auto")
    if mode != "auto":
        return mode
    return "once" if cfg.trainer.max_steps * cfg.data.batch_size >= num_train else "per_batch"


def setup_latent_training(cfg: DictConfig, module, datamodule, first_stage: nn.Module) -> LatentDataModule:
    """Put the trained first stage into the module's denoiser, fit the scale factor s = 1 / std on
    ``first_stage.scale_images`` training latents (LDM; a resumed run restores the stored s instead), and wrap the
    data so that batches are latents."""
    denoiser: LatentDenoiser = module.denoiser
    denoiser.first_stage.load_state_dict(first_stage.state_dict())
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # the frozen first stage, by design
    datamodule.setup("fit")
    mean, std = encode_split(
        denoiser, datamodule.train_set, torch.device("cpu"), limit=cfg.first_stage.get("scale_images", 4096)
    )
    g = torch.Generator().manual_seed(cfg.seed)
    scale = denoiser.fit_scale_factor(mean + std * torch.randn(mean.shape, generator=g))
    mode = encode_mode(cfg, len(datamodule.train_set))
    print(
        f"latent diffusion: first stage f={first_stage.factor}, latents {tuple(mean.shape[1:])}, "
        f"scale factor 1/std = {scale:.4f}, encoding {mode}",
        flush=True,
    )
    return LatentDataModule(datamodule, denoiser, mode, seed=cfg.seed)
