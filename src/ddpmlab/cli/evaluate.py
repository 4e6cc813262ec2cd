"""``python evaluate.py ckpt_path=... [metrics=[bpd,fid,inpaint,guided]] [batch_size=B] [seed=S]``: metrics.json.

Each metric is a function ``(ctx: EvalContext, options: DictConfig) -> dict`` registered in :data:`METRICS`; the
config's ``metrics`` list picks which run, each reads its own config section of the same name, and its result is
stored under that name in metrics.json (beside ``checkpoint``, which says what was evaluated).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ddpmlab.api import CONFIG_DIR, denoiser_from_checkpoint, load_checkpoint, pick_device, rebuild
from ddpmlab.cli.common import friendly_errors
from ddpmlab.cli.sample import given
from ddpmlab.diffusion import Denoiser
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import write_atomic
from ddpmlab.metrics.nll import evaluate_bpd
from ddpmlab.samplers import Sampler
from ddpmlab.validate import check_evaluate_config


@dataclass
class EvalContext:
    """What every metric may use: the denoiser (on ``device``, eval mode), the checkpoint's training config and
    this evaluation's config."""

    denoiser: Denoiser
    train_cfg: DictConfig
    cfg: DictConfig
    device: torch.device

    def datamodule(self):
        """The checkpoint's data module (its data config, ``cfg.data`` merged over it, batches of
        ``cfg.batch_size``)."""
        data_cfg = OmegaConf.merge(self.train_cfg.data, self.cfg.get("data") or {})
        datamodule = rebuild(data_cfg, "data", batch_size=self.cfg.batch_size)  # the checkpoint's: checked targets
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule


def bpd(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """Bits/dim (DDPM eq. 5) on the first ``num_images`` images of the validation split."""
    loader = ctx.datamodule().val_dataloader()
    if options.num_images is not None and options.num_images > len(loader.dataset):
        raise ConfigError(
            f"bpd.num_images={options.num_images} but the validation split has only {len(loader.dataset)} images; "
            "lower it, or use null for all of them"
        )
    result = evaluate_bpd(
        ctx.denoiser,
        loader,
        options.num_images,
        stride=options.stride,
        variance=options.variance,
        clip_x0=options.clip_x0,
        conditional=bool(ctx.denoiser.num_classes),
        seed=ctx.cfg.seed,
        device=ctx.device,
    )
    result["protocol"].update(dataset=ctx.train_cfg.data.get("name", "?"), split="validation")
    print(
        f"bpd = {result['value']:.4f} ± {result['stderr']:.4f} bits/dim on {result['n']} validation images "
        f"({result['protocol']['timesteps_per_image']} timesteps each) in {result['seconds']:.1f}s"
    )
    return result


def fid(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """FID, KID and IS (torch-fidelity, metrics/fid.py's protocol) of ``num_samples`` samples, generated on every
    visible GPU, against the first ``num_real`` training images (whose features torch-fidelity caches)."""
    from ddpmlab.metrics.fid import fidelity_metrics, fidelity_weights, generate_on_devices, real_images

    # What can be refused (weights file, missing data) is refused before the samples are drawn, not after.
    fidelity_weights(options.feature_extractor, options.weights_path)
    datamodule = ctx.datamodule()
    real = real_images(datamodule, options.num_real)
    sampler = Sampler.from_config(given(ctx.train_cfg.get("sampler")), given(options.get("sampler")))
    if options.get("num_steps"):
        sampler = sampler.with_steps(options.num_steps)
    print(f"sampler: {sampler}")
    perf = (ctx.cfg.get("perf") or {}).get("sampling")
    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if ctx.device.type == "cuda" else []
    devices = gpus if options.all_gpus and gpus else [ctx.device]
    start = time.perf_counter()
    fake = generate_on_devices(
        ctx.denoiser, sampler, options.num_samples, ctx.cfg.batch_size, ctx.cfg.seed, devices, perf
    )
    seconds_sampling = time.perf_counter() - start
    name = getattr(datamodule, "name", ctx.train_cfg.data.get("name", "data"))
    reference = f"{name}-train-{real.shape[1]}x{real.shape[2]}x{real.shape[3]}-first{len(real)}"
    values = fidelity_metrics(
        fake, real, reference, isc=options.isc, fid=True, kid=True,
        kid_subset_size=options.kid_subset_size, kid_subsets=options.kid_subsets,
        feature_extractor=options.feature_extractor, feature_layer=options.feature_layer,
        feature_layer_isc=options.feature_layer_isc, weights_path=options.weights_path,
        cache_dir=options.cache_dir, batch_size=ctx.cfg.batch_size, device=ctx.device, seed=ctx.cfg.seed,
    )  # fmt: skip
    protocol = {
        "num_samples": options.num_samples, "reference": reference, "num_real": len(real),
        "sampler": sampler.to_config(),
        "steps": len(sampler.timesteps(ctx.denoiser.diffusion)), "seed": ctx.cfg.seed, "devices": len(devices),
        "feature_extractor": options.feature_extractor, "feature_layer": options.feature_layer,
        "resize": "TF1 bilinear to 299, no antialiasing (inside the extractor)", "kid_subset_size":
        min(options.kid_subset_size, len(fake), len(real)), "kid_subsets": options.kid_subsets,
    }  # fmt: skip
    print(" ".join(f"{k} = {v:.4g}" for k, v in values.items()) + f" ({options.num_samples} samples, {reference})")
    return {**values, "seconds_sampling": seconds_sampling, "protocol": protocol}


METRICS: dict[str, Callable[[EvalContext, DictConfig], dict[str, Any]]] = {"bpd": bpd, "fid": fid}


def _register_image_metrics() -> None:
    from ddpmlab.cli.evaluate_images import guided, inpaint

    METRICS.update(inpaint=inpaint, guided=guided)


_register_image_metrics()


def evaluate(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Compute every metric in ``cfg.metrics`` for the checkpoint and write them to ``<output_dir>/metrics.json``."""
    check_evaluate_config(cfg)
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(cfg.ckpt_path)
    denoiser, train_cfg = denoiser_from_checkpoint(ckpt, ema=cfg.use_ema, where=str(cfg.ckpt_path))
    if "bpd" in cfg.metrics and train_cfg.get("stage") == "latent_diffusion":
        # DDPM's bound ends in a discrete decoder over the 256 levels of each pixel; a latent U-Net models
        # continuous latents z = s * E(x), whose bound says nothing in bits per pixel dimension (LDM reports none).
        raise ConfigError(
            f"metrics=[bpd] (the default) bounds the likelihood of pixels under a pixel-space model, but "
            f"{cfg.ckpt_path} is latent diffusion, whose U-Net models latents of its first stage: evaluate it with "
            "metrics=[fid] (its samples are decoded to pixels)"
        )
    ctx = EvalContext(denoiser.to(device), train_cfg, cfg, device)
    results: dict[str, Any] = {
        "checkpoint": {"path": str(cfg.ckpt_path), "global_step": ckpt.get("global_step"), "ema": cfg.use_ema}
    }
    for name in cfg.metrics:
        start = time.perf_counter()
        results[name] = METRICS[name](ctx, cfg.get(name) or OmegaConf.create())
        results[name].setdefault("seconds", time.perf_counter() - start)
    write_atomic(Path(output_dir) / "metrics.json", json.dumps(results, indent=2) + "\n")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = HydraConfig.get().runtime.output_dir
    evaluate(cfg, out)
    print(Path(out) / "metrics.json")


if __name__ == "__main__":
    main()
