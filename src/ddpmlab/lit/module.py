"""DiffusionModule: wiring and logging only. All math lives in ddpmlab.diffusion / objectives / samplers."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ddpmlab.conditioning import CaptionBank, Cond, Inpainting, SuperResolution
from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.objectives.timestep_samplers import UniformSampler
from ddpmlab.samplers import Sampler
from ddpmlab.seeding import seed_step, shard_index, validation_seed

# Config sections that must match for a checkpoint to resume into this run.
ARCH_KEYS = ("model", "schedule", "prediction", "task")  # (a text encoder, with its vocabulary, is in model)
LR_SCHEDULES = ("constant", "cosine")  # after the linear warm-up: constant, or a cosine decay to 0 at max_steps
# Keys of the optimizer config that configure_optimizers reads (the LambdaLR around the optimizer), not torch.
SCHEDULE_KEYS = ("lr_warmup_steps", "lr_schedule")


class DiffusionModule(pl.LightningModule):
    def __init__(
        self,
        denoiser: Denoiser,
        objective: Callable[..., Tensor],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
        sampler: Sampler | None = None,
        p_uncond: float = 0.0,
        seed: int = 0,
        config: dict[str, Any] | None = None,
        task: SuperResolution | Inpainting | None = None,
        data_channels: int | None = None,
    ):
        super().__init__()
        self.denoiser = denoiser
        self.task = task  # the image condition built from each clean image (super-resolution, inpainting), or None
        check_task(task, denoiser.cond_channels, data_channels or denoiser.sample_shape[0])
        self.objective = objective
        if hasattr(objective, "check"):  # e.g. a learned variance needs objective=hybrid or vlb
            objective.check(denoiser)
        # How training draws t: the objective's (iDDPM's importance sampler for vlb), else uniform (DDPM Alg. 1).
        self.timestep_sampler = getattr(objective, "timestep_sampler", None) or UniformSampler()
        self.optimizer_factory = optimizer
        self.lr_warmup_steps = lr_warmup_steps
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={lr_schedule!r}: choose one of {list(LR_SCHEDULES)}")
        self.lr_schedule = lr_schedule
        self.sampler = sampler or Sampler("ddpm")  # for sample grids and FID during training
        self.p_uncond = p_uncond
        self.seed = seed
        self.config = config or {}
        self._noise: torch.Generator | None = None
        self._micro = (-1, 0)  # (global step, micro-batches of it trained on this rank): see _micro_batch
        self.captions: dict[str, CaptionBank] = {}  # a text model's captions of each split's item keys
        # The progress bar reads train/loss with .item() every step, a host sync; perf.sync_free_logging turns it off.
        self.loss_in_progress_bar = True

    @property
    def diffusion(self):
        return self.denoiser.diffusion

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        self._noise = torch.Generator(self.device)

    def _draw(self, x0: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        t = torch.randint(0, self.diffusion.T, (x0.shape[0],), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return t, eps

    @property
    def text(self) -> bool:
        """Whether the model is conditioned on captions (a text encoder in its network)."""
        return self.denoiser.tokenizer is not None

    @property
    def data_conditioned(self) -> bool:
        """Whether each sample's condition comes from a data item (an image task's input, a caption), so that grids
        and FID draw with the conditions of validation items."""
        return self.task is not None or self.text

    def set_captions(self, train_set, val_set=None) -> None:
        """Tokenize the captions of a text dataset's splits once (``dataset.captions[key]``: the item's captions)."""
        tokenizer = self.denoiser.tokenizer
        for split, ds in (("train", train_set), ("val", val_set)):
            if ds is not None and len(ds):
                self.captions[split] = CaptionBank(ds.captions, tokenizer)

    def condition(self, batch: tuple[Tensor, ...], generator: torch.Generator | None, train: bool) -> Cond | None:
        """What the batch (x0, y[, image]) conditions on: its labels (a class-conditional model), its image (an
        image task: built here from x0, or given by a latent run's data, computed from the pixels) and its caption (a
        text model: y is the item's key, one of its captions drawn at random), with condition dropout (Ho &
        Salimans 2022: the null condition at rate p_uncond) in training."""
        x0, y, *image = batch
        fields = {}
        if self.denoiser.num_classes:
            fields["labels"] = y
        if self.task is not None:
            fields["image"] = image[0] if image else self.task(x0, generator)
        if self.text:
            bank = self.captions.get("train" if train else "val") or self.captions.get("train")
            if bank is None:
                raise ConfigError(
                    "this model is conditioned on text but its data has no captions: use a captioned dataset "
                    "(data=digit_pairs | captioned_folder)"
                )
            fields.update(bank.draw(y, generator)._fields())
        if not fields:
            return None
        cond = Cond(**fields)
        if train and self.p_uncond > 0:
            return cond.drop(torch.rand(y.shape, device=y.device, generator=generator) < self.p_uncond)
        return cond

    def fixed_conditions(self, dataset, n: int, seed: int = 0) -> tuple[Cond, Tensor]:
        """Conditions for grids and chains: those of the first ``n`` images of ``dataset`` (the validation split),
        with their labels (a class-conditional model) and the task's image (inpainting masks seeded by ``seed``),
        and the images themselves [n,C,H,W] in pixel space."""
        if self.text:
            return self.caption_conditions(dataset, n)
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        x0 = torch.stack([x for x, _ in items])
        fields = {"image": self.task(x0, torch.Generator().manual_seed(seed))}
        if self.denoiser.num_classes:
            fields["labels"] = torch.stack([torch.as_tensor(y) for _, y in items]).long()
        return Cond(**fields), x0

    def caption_conditions(self, dataset, n: int) -> tuple[Cond, Tensor]:
        """Conditions for grids of a text model: the canonical captions (``captions[key][0]``) of ``n`` items of
        ``dataset`` with distinct keys -- its ``preview_keys`` where it names them, else spread over its keys -- and
        the first image of each."""
        keys = preview_keys(dataset, n)
        first = [int((dataset.labels == k).nonzero()[0]) for k in keys]
        x0 = torch.stack([dataset[i][0] for i in first])
        prompts = [dataset.captions[k][0] for k in keys]
        tokens, mask = self.denoiser.tokenizer(prompts)
        return Cond(tokens=tokens, token_mask=mask), x0

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x0 = batch[0]
        # a resumed run draws the same; so does every layout with the same global batch (data/order.py's shard)
        seed_step(self._noise, self.seed, self._micro_batch(), self.global_step)
        t, weight = self.timestep_sampler.sample(x0.shape[0], self.diffusion.T, x0.device, self._noise)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=self._noise)
        loss_per_sample = self.objective(self.denoiser, x0, t, eps, self.condition(batch, self._noise, True))
        loss = (loss_per_sample * weight).mean()  # weight = 1 / (T p_t): 1 for uniform t
        if not isinstance(self.timestep_sampler, UniformSampler):  # every rank keeps the same loss history
            gathered = self.all_gather(torch.stack([t.to(loss_per_sample.dtype), loss_per_sample.detach()]))
            self.timestep_sampler.update(*gathered.reshape(-1, 2, t.shape[0]).transpose(0, 1).flatten(1))
        self.log("train/loss", loss, prog_bar=self.loss_in_progress_bar)
        # per-sample loss and t go to callbacks (loss by timestep quartile: callbacks.dashboard.LossByTimestep)
        return {"loss": loss, "loss_per_sample": loss_per_sample.detach(), "t": t}

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        # Same t, eps (and inpainting masks) for a batch at every validation, so val/loss curves compare like with like.
        x0 = batch[0]
        g = torch.Generator(x0.device).manual_seed(validation_seed(self.seed, self.global_rank, batch_idx))
        t, eps = self._draw(x0, g)
        loss = self.objective(self.denoiser, x0, t, eps, self.condition(batch, g, False)).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def _micro_batch(self) -> int:
        """Which micro-batch of this optimizer step's global batch this rank trains on now (seeding.shard_index):
        gradient accumulation runs ``accumulate_grad_batches`` of them per step on each rank, counted here."""
        step, micro = self._micro
        micro = micro + 1 if step == self.global_step else 0
        self._micro = (self.global_step, micro)
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        world_size = self.trainer.world_size if self._trainer is not None else 1
        return shard_index(self.global_rank, world_size, micro % accumulate)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the denoiser's parameters (no LR schedule: that needs the Trainer)."""
        return self.optimizer_factory(self.denoiser.parameters())

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        if self.lr_warmup_steps <= 0 and self.lr_schedule == "constant":
            return optimizer
        factor = partial(lr_factor, self.lr_schedule, self.lr_warmup_steps, max(1, self.trainer.max_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # The gradient norm before clipping, logged as a device tensor: loggers read it at logging steps only.
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.denoiser.parameters() if p.grad is not None])
        self.log("train/grad_norm", grad_norm)
        # Lightning refuses to clip a fused optimizer under any mixed precision, for fp16's loss scale; bf16 has
        # none, so its gradients are clipped here as the fp32 path clips them (on the device, no host sync).
        if gradient_clip_val and self.trainer.precision == "bf16-mixed" and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grads_with_norm_(self.denoiser.parameters(), gradient_clip_val, grad_norm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ddpmlab_config"] = self.config  # primitives only: loads with weights_only=True
        checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()  # tensors: the importance history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint.get("ddpmlab_config"), self.config)
        if checkpoint.get("timestep_sampler"):
            self.timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])


def preview_keys(dataset, n: int) -> list[int]:
    """The item keys of a text dataset whose canonical captions grids show: its ``preview_keys`` that it holds items
    of, where it names them, else ``n`` distinct keys spread over its keys."""
    labels = dataset.labels
    keys = [int(k) for k in getattr(dataset, "preview_keys", None) or [] if bool((labels == k).any())][:n]
    if not keys:
        distinct = torch.unique(labels).tolist()
        keys = [distinct[i * len(distinct) // n] for i in range(min(n, len(distinct)))]
    return keys


def check_task(task, cond_channels: int, data_channels: int) -> None:
    """The network's conditioning input must be the one the image task builds."""
    want = 0 if task is None else task.channels(data_channels)
    if want != cond_channels:
        what = "no image task (task=null)" if task is None else f"task={task.name} on {data_channels}-channel data"
        raise ConfigError(
            f"model.cond_channels={cond_channels} does not fit {what}, which concatenates {want} channels with x_t: "
            f"set model.cond_channels={want}"
        )


def optimizer_partial(node) -> Callable[..., torch.optim.Optimizer]:
    """The ``optimizer`` config as a partial over the parameters, without its learning-rate schedule's keys."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(node, resolve=True)
    return instantiate({k: v for k, v in kwargs.items() if k not in SCHEDULE_KEYS})


def _differences(saved: Any, current: Any, key: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current), key=str)
        return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{key}.{k}")]
    return [] if saved == current else [f"{key}: checkpoint {saved!r}, this run {current!r}"]


def lr_factor(schedule: str, warmup: int, max_steps: int, step: int) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of the configured one: a linear warm-up over
    ``warmup`` steps (DDPM: 5,000 on CIFAR-10), then constant, or a half cosine from 1 down to 0 at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def with_defaults(section: Any) -> Any:
    """A stored ``model`` / ``schedule`` section with the keys it predates filled in with the defaults of its own
    class or function (one of ddpmlab's: a checkpoint written before ``UNet(cond_channels=...)`` existed was trained
    with 0, one written before ``schedule.zero_terminal_snr`` with false)."""
    target = section.get("_target_") if isinstance(section, dict) else None
    if not isinstance(target, str) or not target.startswith("ddpmlab."):
        return section
    import inspect

    from hydra.utils import get_object

    try:
        built = get_object(target)
        params = inspect.signature(built.__init__ if inspect.isclass(built) else built).parameters
    except Exception:  # not a class ddpmlab has (any more): compare as stored
        return section
    defaults = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, **section}


def check_compatible(saved: dict | None, current: dict) -> None:
    """Refuse a checkpoint whose network or schedule differs from the run's config (before weights load)."""
    if not saved or not current:
        return
    for key in ARCH_KEYS:
        if key in saved and key in current and with_defaults(saved[key]) != with_defaults(current[key]):
            diff = _differences(with_defaults(saved[key]), with_defaults(current[key]), key)
            raise CheckpointError(
                f"the checkpoint was trained with a different '{key}' config ({'; '.join(diff[:4])}); use the same "
                f"{key} settings as the run that wrote it, or start afresh in a new run directory"
            )
