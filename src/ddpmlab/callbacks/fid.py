"""FID and KID during training, on one GPU or split across DDP ranks (a callback, never on the module: the
EMA copy of a module would duplicate Inception and average it).

Every ``every_n_steps`` the EMA weights generate ``num_samples`` images with the run's sampler (respaced to
``num_steps``). The images come in chunks of ``batch_size``; chunk k is drawn from the seed ``seed + k`` and
the chunks are split into contiguous blocks, one per rank, so each rank generates its own share with its
own seeds (rank r starts at chunk r * K / W) and the sample set is the same whatever the number of GPUs. A model
conditioned on an image (super-resolution, inpainting) draws sample i for the condition of validation image i
(cycled), so the set does not depend on the chunks either.
Each rank feeds its features to torchmetrics' FID/KID; ``compute`` syncs them and every rank gets the same
value, logged as ``val/fid`` and ``val/kid``; with ``isc`` the Inception Score of the same samples, from the
logits of the same forward pass (``features_and_logits``), is logged as ``val/is``.

Real features are computed once per dataset, resolution and feature network and cached in ``cache_dir``;
each rank holds a contiguous shard of them, so the synced sums and concatenations are the full set.
Without Inception weights (see :func:`ddpmlab.metrics.fid.inception_weights`) the callback says so once and
switches itself off; training goes on.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ddpmlab.callbacks.dashboard import log_scalars
from ddpmlab.callbacks.periodic import EveryNSteps
from ddpmlab.callbacks.utils import ema_denoiser, sampling_perf
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.fid import (
    FeatureMetrics,
    InceptionUnavailable,
    extract_features,
    generate_chunks,
    inception,
    inception_score,
    real_features,
    real_images,
    real_stats_file,
    share,
    to_inception_input,
)


class FID(EveryNSteps):
    def __init__(
        self,
        every_n_steps: int = 10_000,
        num_samples: int = 10_000,
        batch_size: int = 256,
        seed: int = 0,
        num_steps: int | None = None,
        feature: int | nn.Module = 2048,
        weights_path: str | None = None,
        cache_dir: str | None = "data/fid_stats",
        num_real: int | None = None,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        at_train_end: bool = True,
        isc: bool = True,
        isc_splits: int = 10,
    ):
        """``feature``: 2048 for Inception's pool features (the papers), or any module mapping uint8
        [N,3,H,W] to [N,D] (tests use a tiny one). ``num_steps`` respaces the run's sampler for FID only
        (None: the sampler's own grid). ``num_real``: how many training images make the reference (None: all).
        ``isc``: also the Inception Score in ``isc_splits`` groups (a custom ``feature`` module needs a
        ``features_and_logits(x) -> (features, logits)`` method for it)."""
        if num_samples < 2 or batch_size < 1:
            raise ConfigError(f"fid.num_samples ({num_samples}) must be >= 2 and fid.batch_size ({batch_size}) >= 1")
        super().__init__(every_n_steps, num_steps, at_train_end)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.feature, self.weights_path, self.cache_dir, self.num_real = feature, weights_path, cache_dir, num_real
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self.isc, self.isc_splits = isc, isc_splits
        self.isc_metric: nn.Module | None = None
        self.enabled = True
        self.net: nn.Module | None = None
        self.metrics: FeatureMetrics | None = None
        self.seconds = 0.0  # wall time spent here, to report the overhead
        self.generated: list[tuple[int, int]] = []  # this rank's chunks at the last evaluation

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or self.net is not None:
            return
        error = None
        try:
            feature = self.feature
            net = inception(self.weights_path, feature, self.isc) if isinstance(feature, int) else feature
        except InceptionUnavailable as e:
            error = e
        # Every rank must agree, or the ranks that go on would wait forever for the others in compute().
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            self.enabled = False
            reason = error or "another rank has no Inception weights"
            rank_zero_warn(f"FID callback switched off, training goes on: {reason}")
            return
        self.net = net.eval().requires_grad_(False).to(pl_module.device)
        if self.isc and not hasattr(net, "features_and_logits"):
            rank_zero_warn(
                f"no Inception Score during training: the feature network {type(net).__name__} has no "
                "features_and_logits method (callbacks.fid.isc=false silences this)"
            )
            self.isc = False

    def _load_real(self, trainer: pl.Trainer, device: torch.device) -> int:
        """Put this rank's shard of the real features into the metrics; return the size of the whole set."""
        images = real_images(trainer.datamodule, self.num_real)
        name = getattr(trainer.datamodule, "name", type(trainer.datamodule).__name__)
        path = None if self.cache_dir is None else real_stats_file(self.cache_dir, name, images, self.net)
        if path is not None and trainer.is_global_zero and not path.is_file():
            real_features(self.net, images, path, self.batch_size, device)
        trainer.strategy.barrier()
        rank, world = trainer.global_rank, trainer.world_size
        if path is not None and path.is_file():
            shard = real_features(self.net, images, path).tensor_split(world)[rank]
        else:  # no cache, or a node that cannot see it: each rank computes its own shard
            shard = extract_features(self.net, images.tensor_split(world)[rank], self.batch_size, device)
        subset = min(self.kid_subset_size, self.num_samples, len(images))
        self.metrics = FeatureMetrics(shard.shape[1], subset, self.kid_subsets).to(device)
        self.metrics.update(shard.to(device), real=True)
        return len(images)

    # ------------------------------------------------------------------ when
    def active(self, trainer: pl.Trainer) -> bool:
        return self.enabled and not trainer.fast_dev_run  # a dry run measures nothing

    def run(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ what
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        self._last_step = trainer.global_step
        device = pl_module.device
        if self.metrics is None:
            self._load_real(trainer, device)
        sampler = self.sampler(pl_module)
        denoiser = ema_denoiser(trainer, pl_module)
        self.generated = share(self.num_samples, self.batch_size, trainer.global_rank, trainer.world_size)
        conds = None
        if getattr(pl_module, "data_conditioned", False):  # image or caption conditions of validation items, cycled
            dataset = trainer.datamodule.val_set or trainer.datamodule.train_set
            conds = pl_module.fixed_conditions(dataset, min(len(dataset), self.num_samples), self.seed)[0]
        for chunk in self.generated:  # this rank's share, one chunk of images at a time
            x0 = generate_chunks(denoiser, sampler, [chunk], self.seed, sampling_perf(pl_module, denoiser), conds=conds,
                                 chunk_size=self.batch_size)  # fmt: skip
            with torch.no_grad():
                if self.isc:  # features and logits from one forward pass
                    features, logits = self.net.features_and_logits(to_inception_input(x0))
                    if self.isc_metric is None:
                        splits = min(self.isc_splits, self.num_samples)
                        self.isc_metric = inception_score(logits.shape[1], splits).to(device)
                    self.isc_metric.update(logits.float())
                else:
                    features = self.net(to_inception_input(x0))
                self.metrics.update(features.float(), real=False)
        values = self.metrics.compute(self.seed)  # synced: the same on every rank
        self.metrics.reset()
        if self.isc_metric is not None:
            with torch.random.fork_rng(devices=[]):  # IS's random split of the samples, as KID's subsets
                torch.manual_seed(self.seed)
                values["is"], values["is_std"] = (float(v) for v in self.isc_metric.compute())
            self.isc_metric.reset()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        keys = [k for k in ("fid", "kid", "is") if k in values]
        for key in keys:
            trainer.callback_metrics[f"val/{key}"] = torch.tensor(values[key])
        log_scalars(trainer, {**{f"val/{k}": values[k] for k in keys}, "val/fid_seconds": seconds})
        return values

    def __repr__(self) -> str:
        return f"FID(every_n_steps={self.every_n_steps}, num_samples={self.num_samples}, num_steps={self.num_steps})"
