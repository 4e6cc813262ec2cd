"""evaluate.py's ``inpaint`` and ``guided`` metrics (registered in ``cli/evaluate.py: METRICS``): RePaint
completions of held-out images against the originals, and samples drawn for requested labels judged by a
classifier. The numbers come from ``ddpmlab.metrics.image_metrics``; sampling is ``generate(...)``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from ddpmlab.cli.sample import classifier_guidance, given
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.image_metrics import (
    classifier_judge,
    guided_agreement,
    inpainting_metrics,
    svc_digits,
    to_pixels,
    within_class_std,
)
from ddpmlab.samplers import Sampler, generate, with_guidance
from ddpmlab.samplers.masks import make_mask

if TYPE_CHECKING:
    from ddpmlab.cli.evaluate import EvalContext


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
    if hasattr(denoiser, "first_stage"):
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
    from ddpmlab.api import classifier_from_checkpoint, load_checkpoint

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
