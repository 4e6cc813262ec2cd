"""evaluate.py's metrics: each a function ``(ctx: EvalContext, options: DictConfig) -> dict`` registered in
:data:`METRICS` under the name the config's ``metrics`` list uses; each reads its own config section of that name.

- ``bpd``: bits/dim (DDPM eq. 5) on validation images (pixel-space models only);
- ``fid``: FID, KID and IS of generated samples against training images (``ddpmlab.metrics.fid``'s protocol);
- ``inpaint``: RePaint completions of held-out images against the originals;
- ``guided``: samples drawn for requested labels, judged by a classifier.

The numbers come from ``ddpmlab.metrics``; sampling is ``generate(...)``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ddpmlab.api import denoiser_from_checkpoint, pick_device
from ddpmlab.checkpoint import load_checkpoint, rebuild
from ddpmlab.diffusion import Denoiser
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import write_atomic
from ddpmlab.metrics.image_metrics import (
    classifier_judge,
    guided_agreement,
    inpainting_metrics,
    svc_digits,
    to_pixels,
    within_class_std,
)
from ddpmlab.metrics.nll import evaluate_bpd
from ddpmlab.samplers import Sampler, generate, with_guidance
from ddpmlab.samplers.masks import make_mask
from ddpmlab.sampling import classifier_guidance, given
from ddpmlab.stages import classifier_from_checkpoint, stage_of
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


def held_out(ctx: EvalContext, num_images: int | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_images`` images [N,C,H,W] in [-1, 1] of the checkpoint's validation split, and their labels."""
    ds = ctx.datamodule().val_set
    n = len(ds) if ds is not None else 0
    if n == 0 or (num_images is not None and not 1 <= num_images <= n):
        raise ConfigError(
            f"{what}.num_images={num_images} but the validation split has {n} images; use 1..{n}, or null for all"
        )
    items = [ds[i] for i in range(n if num_images is None else num_images)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def inpaint(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """RePaint completions (one per image, seed ``cfg.seed``) of the first ``num_images`` validation images with
    the mask ``mask``; MSE in the hole, PSNR, SSIM (and LPIPS with ``lpips=true``) against the originals."""
    denoiser = ctx.denoiser
    if not stage_of(ctx.train_cfg).pixel_space:
        raise ConfigError(
            "metrics=[inpaint] runs on pixel-space checkpoints; for latent diffusion use sample.py's "
            "inpaint.index=... (RePaint on latents) one image at a time"
        )
    x0, _ = held_out(ctx, options.num_images, "inpaint")
    _, H, W = denoiser.sample_shape
    keep = make_mask(str(options.mask), (H, W), torch.Generator().manual_seed(ctx.cfg.seed))  # [H,W], 1 = known
    sampler = Sampler("repaint", options.num_steps, options.spacing, jump_length=options.jump_length,
                      jump_n_sample=options.jump_n_sample, variance=options.variance)  # fmt: skip
    print(f"sampler: {sampler}")
    start = time.perf_counter()
    completions = generate(denoiser, sampler, len(x0), seed=ctx.cfg.seed, batch_size=ctx.cfg.batch_size, x0=x0,
                           keep=keep, progress=True)  # fmt: skip  # a class-conditional model: the null label
    seconds_sampling = time.perf_counter() - start
    values = inpainting_metrics(completions, x0, keep, lpips=bool(options.lpips))
    protocol = {
        "mask": str(options.mask), "hole_fraction": float((keep < 0.5).float().mean()), "num_images": len(x0),
        "dataset": ctx.train_cfg.data.get("name", "?"), "split": "validation (the first num_images)",
        "sampler": sampler.to_config(), "network_evaluations": sampler.num_evaluations(denoiser.diffusion),
        "seed": ctx.cfg.seed, "range": "[0, 1]", "mse_hole": "mean over the hole's pixels",
        "psnr_ssim": "whole images, mean over images", "ssim_window": "gaussian sigma 1.5, 11 taps, reflect-padded",
    }  # fmt: skip
    print(
        " ".join(f"{k} = {v:.4g}" for k, v in values.items())
        + f" ({len(x0)} held-out images, mask {options.mask}, {seconds_sampling:.1f}s)"
    )
    return {**values, "seconds_sampling": seconds_sampling, "protocol": protocol}


def judge_for(ctx: EvalContext, judge: str) -> tuple[Any, dict[str, Any]]:
    """(predict(images) -> labels, what it is) for ``guided.judge``: ``svc_digits`` or a noisy-classifier checkpoint."""
    if judge == "svc_digits":
        if ctx.train_cfg.data.get("name") != "digits":
            raise ConfigError(
                f"guided.judge=svc_digits judges the bundled 8x8 digits, but this checkpoint was "
                f"trained on {ctx.train_cfg.data.get('name')!r}: name a classifier checkpoint instead "
                "(guided.judge=<classifier run>/checkpoints/last.ckpt)"
            )
        datamodule = ctx.datamodule()
        fit = [datamodule.train_set[i] for i in range(len(datamodule.train_set))]
        predict = svc_digits(torch.stack([x for x, _ in fit]), torch.tensor([int(y) for _, y in fit]))
        x_val, y_val = held_out(ctx, None, "guided")
        accuracy = float((predict(x_val) == y_val.numpy()).mean())
        real = torch.cat([torch.stack([x for x, _ in fit]), x_val])  # every digit: the spread to compare with
        real_std = within_class_std(to_pixels(real), torch.cat([torch.tensor([int(y) for _, y in fit]), y_val]).numpy())
        return predict, {
            "judge": "RBF-SVM (C=10) fit on the training split",
            "judge_heldout_accuracy": accuracy,
            "real_within_class_std": real_std,
        }
    if not judge:
        raise ConfigError(
            "metrics=[guided] needs a judge: guided.judge=svc_digits (the bundled digits) or "
            "guided.judge=<noisy-classifier run>/checkpoints/last.ckpt"
        )
    classifier, _, _ = classifier_from_checkpoint(load_checkpoint(judge))
    return classifier_judge(classifier.to(ctx.device), ctx.cfg.batch_size), {"judge": f"{judge} at t = 0"}


def guided(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """``num_samples`` samples for ``labels`` (cycled; null: every class) with classifier-free guidance
    ``guidance`` or classifier guidance ``classifier.ckpt_path`` (as sample.py), judged by ``judge``."""
    predict, judge_info = judge_for(ctx, str(options.judge) if options.judge is not None else "")
    n = options.num_samples
    wiring = classifier_guidance(options, ctx.denoiser, ctx.train_cfg, n, ctx.device)
    labels, denoiser = wiring or with_guidance(ctx.denoiser, options.get("labels"), options.get("guidance"), n)
    if labels is None:
        raise ConfigError(
            "metrics=[guided] needs samples drawn for labels: a class-conditional checkpoint "
            "(guided.guidance=w) or a classifier (guided.classifier.ckpt_path=...)"
        )
    sampler = Sampler.from_config(given(ctx.train_cfg.get("sampler")), given(options.get("sampler")))
    print(f"sampler: {sampler}")
    start = time.perf_counter()
    samples = generate(denoiser, sampler, n, seed=ctx.cfg.seed, batch_size=ctx.cfg.batch_size, labels=labels,
                       progress=True)  # fmt: skip
    seconds_sampling = time.perf_counter() - start
    values = guided_agreement(samples, labels, predict)
    spec = options.get("classifier") or {}
    protocol = {
        "num_samples": n, "labels": sorted(set(labels.tolist())), "guidance": float(options.get("guidance") or 0.0),
        "classifier": str(spec.get("ckpt_path")) if spec.get("ckpt_path") else None,
        "classifier_scale": float(spec.get("scale", 1.0)) if spec.get("ckpt_path") else None,
        "sampler": sampler.to_config(), "steps": len(sampler.timesteps(ctx.denoiser.diffusion)),
        "seed": ctx.cfg.seed, "pixels": "uint8-quantised, on [0, 1]", **judge_info,
    }  # fmt: skip
    print(
        f"agreement = {values['agreement']:.4f} within_class_std = {values['within_class_std']:.4f} "
        f"({n} samples, {protocol['judge']})"
    )
    return {**values, "seconds_sampling": seconds_sampling, "protocol": protocol}


METRICS: dict[str, Callable[[EvalContext, DictConfig], dict[str, Any]]] = {
    "bpd": bpd,
    "fid": fid,
    "inpaint": inpaint,
    "guided": guided,
}


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
    if "bpd" in cfg.metrics and not stage_of(train_cfg).pixel_space:
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
