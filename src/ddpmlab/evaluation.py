"""evaluate.py's metrics: each a function ``(ctx: EvalContext, options: DictConfig) -> dict`` registered in
:data:`METRICS` under the name the config's ``metrics`` list uses; each reads its own config section of that name.

- ``bpd``: bits/dim (DDPM eq. 5) on validation images (pixel-space models only);
- ``fid``: FID, KID and IS of generated samples against training images (``ddpmlab.metrics.fid``'s protocol);
- ``inpaint``: RePaint completions of held-out images against the originals; for a trained inpainting model
  (``task=inpaint``), its completions beside RePaint's on an unconditional model, on the same masks;
- ``guided``: samples drawn for requested labels, judged by a classifier;
- ``sr``: super-resolution (``task=sr``) against the high-resolution originals, beside bicubic upsampling;
- ``caption``: whether a text model on the digit pairs drew its caption's two digits in order (seen and held-out
  pairs, the swap test; ``ddpmlab.metrics.caption``'s protocol).

The numbers come from ``ddpmlab.metrics``; sampling is ``generate(...)``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpmlab.api import CONFIG_DIR, denoiser_from_checkpoint, load_denoiser, pick_device
from ddpmlab.checkpoint import load_checkpoint, rebuild
from ddpmlab.conditioning import Cond, Inpainting, SuperResolution, make_task, text_cond, upsample_bicubic
from ddpmlab.diffusion import Denoiser
from ddpmlab.distributed import process_group
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_path, write_atomic
from ddpmlab.images import save_grid, to_hwc_uint8, to_unit
from ddpmlab.metrics.image_metrics import (
    classifier_judge,
    guided_agreement,
    inpainting_metrics,
    sr_metrics,
    ssim_window,
    svc_digits,
    to_pixels,
    within_class_std,
)
from ddpmlab.metrics.nll import evaluate_bpd
from ddpmlab.networks.unet import image_hw
from ddpmlab.samplers import GuidedDenoiser, Sampler, generate, with_guidance
from ddpmlab.samplers.masks import make_mask
from ddpmlab.sampling import classifier_guidance, given
from ddpmlab.stages import classifier_from_checkpoint, stage_of
from ddpmlab.validate import check_evaluate_config


@dataclass
class EvalContext:
    """What every metric may use: the denoiser (on ``device``, eval mode), the checkpoint's training config,
    this evaluation's config and the folder its outputs go to."""

    denoiser: Denoiser
    train_cfg: DictConfig
    cfg: DictConfig
    device: torch.device
    output_dir: Path | None = None

    def datamodule(self):
        """The checkpoint's data module (its data config, ``cfg.data`` merged over it, batches of
        ``cfg.batch_size``)."""
        data_cfg = OmegaConf.merge(self.train_cfg.data, self.cfg.get("data") or {})
        if not data_cfg.get("name"):  # a diffusers model says nothing of its data
            raise ConfigError(
                f"{self.cfg.ckpt_path} does not say what data it was trained on, which this metric needs: name one "
                f"of the shipped data configs, e.g. data=cifar10 ({', '.join(shipped_data_names())}), with "
                "data.root=<the folder that holds its files> if it is not ./data"
            )
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
        task=make_task(ctx.train_cfg.get("task")),
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
    import torch.distributed as dist

    from ddpmlab.metrics.fid import (
        fidelity_metrics,
        fidelity_weights,
        generate_across_ranks,
        generate_on_devices,
        real_images,
    )

    # What can be refused (weights file, missing data) is refused before the samples are drawn, not after.
    features = options.get("features")  # a Frechet distance in another space instead of Inception's
    if features in (None, "inception"):
        fidelity_weights(options.feature_extractor, options.weights_path)
    datamodule = ctx.datamodule()
    real = real_images(datamodule, options.num_real)
    name = getattr(datamodule, "name", ctx.train_cfg.data.get("name", "data"))
    reference = f"{name}-train-{real.shape[1]}x{real.shape[2]}x{real.shape[3]}-first{len(real)}"
    quality = None if features in (None, "inception") else quality_measure(ctx, options, real, reference, "fid")
    sampler = Sampler.from_config(given(ctx.train_cfg.get("sampler")), given(options.get("sampler")))
    if options.get("num_steps"):
        sampler = sampler.with_steps(options.num_steps)
    print(f"sampler: {sampler}")
    perf = (ctx.cfg.get("perf") or {}).get("sampling")
    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if ctx.device.type == "cuda" else []
    devices = gpus if options.all_gpus and gpus else [ctx.device]
    conds = None
    task = make_task(ctx.train_cfg.get("task"))
    if task is not None:  # an image-conditioned model: sample i for validation image i's condition (cycled)
        x_val, y_val = held_out(ctx, None, "fid")
        conds = Cond(image=task(x_val, torch.Generator().manual_seed(ctx.cfg.seed)))
        conds = conds.replace(labels=y_val) if ctx.denoiser.num_classes else conds
    start = time.perf_counter()
    if ranks := dist.is_initialized() and dist.get_world_size() > 1:  # evaluate.py under torchrun or SLURM
        devices = [ctx.device] * dist.get_world_size()  # one rank each: its chunks, once
        fake = generate_across_ranks(
            ctx.denoiser, sampler, options.num_samples, ctx.cfg.batch_size, ctx.cfg.seed, perf, conds=conds
        )
    else:
        fake = generate_on_devices(
            ctx.denoiser, sampler, options.num_samples, ctx.cfg.batch_size, ctx.cfg.seed, devices, perf, conds=conds
        )
    seconds_sampling = time.perf_counter() - start
    if ranks and dist.get_rank() != 0:
        return {}  # rank 0 measures the samples of all ranks
    if quality is not None:
        values = quality.measure(fake)
        print(f"{quality.label} = {values['fd']:.4g} ({options.num_samples} samples, {reference})")
        protocol = {
            "num_samples": options.num_samples, "reference": reference, "num_real": len(real),
            "sampler": sampler.to_config(), "steps": sampler.num_evaluations(ctx.denoiser.diffusion),
            "seed": ctx.cfg.seed, "devices": len(devices), "quality": quality.label,
            "conditions": None if task is None else f"{task.name} of the validation images, cycled",
        }  # fmt: skip
        return {**values, "seconds_sampling": seconds_sampling, "protocol": protocol}
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
        "conditions": None if task is None else f"{task.name} of the validation images, cycled",
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
    task = make_task(ctx.train_cfg.get("task"))
    if isinstance(task, Inpainting):
        return trained_inpaint(ctx, options, task)
    if task is not None:
        raise ConfigError(
            f"metrics=[inpaint] completes images with an unconditional model (RePaint) or a trained inpainting "
            f"model (task=inpaint); {ctx.cfg.ckpt_path} was trained for task={task.name}"
            + (": use metrics=[sr]" if isinstance(task, SuperResolution) else "")
        )
    if options.get("repaint_ckpt"):
        raise ConfigError(
            "inpaint.repaint_ckpt sets RePaint beside a trained inpainting model (ckpt_path of experiment="
            f"inpaint_digits), but {ctx.cfg.ckpt_path} is unconditional: drop inpaint.repaint_ckpt to run RePaint on "
            "it, or pass the inpainting checkpoint as ckpt_path"
        )
    if options.get("masks"):  # a table per mask: RePaint on each
        return per_mask(ctx, options, {"repaint": ctx.denoiser}, None)
    denoiser = ctx.denoiser
    if not stage_of(ctx.train_cfg).pixel_space:
        raise ConfigError(
            "metrics=[inpaint] runs on pixel-space checkpoints; for latent diffusion use sample.py's "
            "inpaint.index=... (RePaint on latents) one image at a time"
        )
    x0, _ = held_out(ctx, options.num_images, "inpaint")
    _, H, W = denoiser.sample_shape
    keep = make_mask(str(options.mask), (H, W), torch.Generator().manual_seed(ctx.cfg.seed))  # [H,W], 1 = known
    sampler = repaint_sampler(options, options.num_steps)
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


def repaint_sampler(options: DictConfig, num_steps: int) -> Sampler:
    """RePaint (``inpaint.*``: spacing, jump_length, jump_n_sample, variance) on a grid of ``num_steps``."""
    return Sampler("repaint", num_steps, options.spacing, jump_length=options.jump_length,
                   jump_n_sample=options.jump_n_sample, variance=options.variance)  # fmt: skip


def repaint_steps_for(nfe: int, T: int, jump_length: int, jump_n_sample: int) -> int:
    """The largest RePaint grid S <= T whose network evaluations are at most ``nfe``. RePaint's walk
    (``repaint_schedule``) takes S reverse steps, plus j more for each of its r - 1 jumps back at every state
    0, j, 2j, ... below S - j: S + (r - 1) j ceil((S - j) / j) evaluations, which grow with S."""
    j, r = jump_length, jump_n_sample

    def evaluations(S: int) -> int:
        return S + (r - 1) * j * len(range(0, S - j, j))

    lowest = 1 if r == 1 else j + 1  # resampling needs j < S
    if lowest > T or evaluations(lowest) > nfe:
        raise ConfigError(
            f"RePaint with jump_length={j}, jump_n_sample={r} needs at least {evaluations(lowest)} network "
            f"evaluations, more than the trained model's {nfe}: lower inpaint.jump_length / inpaint.jump_n_sample, "
            "give the trained model more steps (inpaint.sampler.num_steps), or inpaint.match_nfe=false"
        )
    return max(S for S in range(lowest, T + 1) if evaluations(S) <= nfe)


def repaint_model(ctx: EvalContext, path: str) -> Denoiser:
    """The unconditional pixel-space model at ``path`` that RePaint runs on, for images of ctx's model's shape."""
    ckpt = load_checkpoint(path)
    denoiser, cfg = denoiser_from_checkpoint(ckpt, ema=ctx.cfg.use_ema, where=path)
    if not stage_of(cfg).pixel_space or getattr(denoiser, "cond_channels", 0):
        raise ConfigError(
            f"inpaint.repaint_ckpt={path} must be an unconditional pixel-space model (RePaint conditions it on "
            "the known pixels alone), e.g. the run of python train.py on the same data"
        )
    if tuple(denoiser.sample_shape) != tuple(ctx.denoiser.sample_shape):
        raise ConfigError(
            f"inpaint.repaint_ckpt={path} draws images of shape {list(denoiser.sample_shape)}, the inpainting "
            f"model {list(ctx.denoiser.sample_shape)}: train it on the same data"
        )
    return denoiser.to(ctx.device)


def trained_inpaint(ctx: EvalContext, options: DictConfig, task: Inpainting) -> dict[str, Any]:
    """A trained inpainting model (Palette; Stable Diffusion's inpainting model), conditioned on [x0 * keep, keep],
    beside RePaint on the unconditional model ``repaint_ckpt`` (where given), on the same images and masks; RePaint's
    grid matches the trained sampler's network evaluations (``match_nfe``) or is ``num_steps``."""
    sampler = Sampler.from_config(given(ctx.train_cfg.get("sampler")), given(options.get("sampler")))
    nfe = sampler.num_evaluations(ctx.denoiser.diffusion)
    models: dict[str, Any] = {"trained": ctx.denoiser}
    if options.get("repaint_ckpt"):
        models["repaint"] = repaint_model(ctx, str(options.repaint_ckpt))
    return per_mask(ctx, options, models, (task, sampler, nfe))


def per_mask(ctx: EvalContext, options: DictConfig, models: dict[str, Any], trained) -> dict[str, Any]:
    """Completions of the first ``num_images`` validation images for each mask of ``masks`` (or ``mask``) by each
    model (``trained``: conditioned on the masked image; ``repaint``: RePaint), with the metrics of each, a table
    per mask. The masks are drawn once per mask name, from ``cfg.seed``: every model sees the same ones."""
    if not stage_of(ctx.train_cfg).pixel_space:
        raise ConfigError("metrics=[inpaint] with several masks or a trained inpainting model runs on pixel space")
    x0, _ = held_out(ctx, options.num_images, "inpaint")
    H, W = x0.shape[-2:]
    samplers, nfes = {}, {}
    if trained is not None:
        task, samplers["trained"], nfes["trained"] = trained
    if "repaint" in models:
        diffusion = models["repaint"].diffusion
        matched = trained is not None and options.get("match_nfe", True)
        steps = (
            repaint_steps_for(nfes["trained"], diffusion.T, options.jump_length, options.jump_n_sample)
            if matched
            else options.num_steps
        )
        samplers["repaint"] = repaint_sampler(options, steps)
        nfes["repaint"] = samplers["repaint"].num_evaluations(diffusion)
    for name, sampler in samplers.items():
        print(f"{name}: {sampler}, {nfes[name]} network evaluations per image")
    masks = [str(m) for m in (options.get("masks") or [options.mask])]
    rows: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for mask in masks:
        keep = make_mask(mask, (H, W), torch.Generator().manual_seed(ctx.cfg.seed))  # [H,W], 1 = known
        row: dict[str, Any] = {"hole_fraction": float((keep < 0.5).float().mean())}
        for name, model in models.items():
            if name == "trained":
                cond = Cond(image=task(x0, keep=keep))  # [N,C+1,H,W]: the masked image and the mask
                out = generate(model, samplers[name], len(x0), seed=ctx.cfg.seed, batch_size=ctx.cfg.batch_size,
                               cond=cond, progress=True)  # fmt: skip
                out = torch.where(keep.bool(), x0, out)  # the known pixels are given, as RePaint's output keeps them
            else:
                out = generate(model, samplers[name], len(x0), seed=ctx.cfg.seed, batch_size=ctx.cfg.batch_size,
                               x0=x0, keep=keep, progress=True)  # fmt: skip
            row[name] = inpainting_metrics(out, x0, keep, lpips=bool(options.lpips))
        rows[mask] = row
        print_table(f"mask {mask} (hole {row['hole_fraction']:.0%}), {len(x0)} validation images",
                    {name: row[name] for name in models})  # fmt: skip
    protocol = {
        "masks": masks, "num_images": len(x0), "dataset": ctx.train_cfg.data.get("name", "?"),
        "split": "validation (the first num_images)", "seed": ctx.cfg.seed, "range": "[0, 1]",
        "samplers": {name: s.to_config() for name, s in samplers.items()}, "network_evaluations": nfes,
        "nfe_matched": "repaint" in models and trained is not None and bool(options.get("match_nfe", True)),
        "repaint_ckpt": str(options.repaint_ckpt) if options.get("repaint_ckpt") else None,
        "known_pixels": "the trained model's known pixels replaced by the original's (RePaint's equal them)",
        "mse_hole": "mean over the hole's pixels", "psnr_ssim": "whole images, mean over images",
        "ssim_window": "gaussian sigma 1.5, 11 taps, reflect-padded",
    }  # fmt: skip
    return {"masks": rows, "seconds_sampling": time.perf_counter() - start, "protocol": protocol}


def print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    """A small table: a row per method, a column per metric."""
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    print(title)
    print(f"{'':10s}" + "".join(f"{c:>13s}" for c in columns))
    for name, row in rows.items():
        print(f"{name:10s}" + "".join(f"{row[c]:13.4f}" if c in row else f"{'-':>13s}" for c in columns))


def judge_for(ctx: EvalContext, judge: str, what: str = "guided") -> tuple[Any, dict[str, Any]]:
    """(predict(images) -> labels, what it is) for ``<what>.judge``: ``svc_digits`` or a noisy-classifier
    checkpoint (at t = 0, images resized to the size it was trained on where they differ)."""
    if judge == "svc_digits":
        if ctx.train_cfg.data.get("name") != "digits":
            raise ConfigError(
                f"{what}.judge=svc_digits judges the bundled 8x8 digits, but this checkpoint was "
                f"trained on {ctx.train_cfg.data.get('name')!r}: name a classifier checkpoint instead "
                f"({what}.judge=<classifier run>/checkpoints/last.ckpt)"
            )
        datamodule = ctx.datamodule()
        fit = [datamodule.train_set[i] for i in range(len(datamodule.train_set))]
        predict = svc_digits(torch.stack([x for x, _ in fit]), torch.tensor([int(y) for _, y in fit]))
        x_val, y_val = held_out(ctx, None, what)
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
            f"metrics=[{what}] needs a judge: {what}.judge=svc_digits (the bundled digits) or "
            f"{what}.judge=<noisy-classifier run>/checkpoints/last.ckpt"
        )
    classifier, _, classifier_cfg = classifier_from_checkpoint(load_checkpoint(judge), f"{what}.judge")
    judged = classifier_judge(classifier.to(ctx.device), ctx.cfg.batch_size)
    size = int(classifier_cfg.data.image_size)

    def predict(images: torch.Tensor):  # e.g. 32x32 latent-diffusion samples judged by a 28x28 MNIST classifier
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        return judged(images)

    return predict, {"judge": f"{judge} at t = 0", "judge_image_size": size}


def guided(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """``num_samples`` samples for ``labels`` (cycled; null: every class) with classifier-free guidance
    ``guidance`` or classifier guidance ``classifier.ckpt_path`` (as sample.py), judged by ``judge``."""
    predict, judge_info = judge_for(ctx, str(options.judge) if options.judge is not None else "")
    n = options.num_samples
    wiring = classifier_guidance(options, ctx.denoiser, ctx.train_cfg, n, ctx.device)
    labels, denoiser = wiring or with_guidance(
        ctx.denoiser, options.get("labels"), options.get("guidance"), n, options.get("guidance_rescale")
    )
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
        "guidance_rescale": float(options.get("guidance_rescale") or 0.0),
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


def sr(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """Super-resolution (``task=sr``) of the first ``num_images`` validation images from their low-resolution
    versions, ``num_samples`` samples each (``sampler``, classifier-free ``guidance``), beside bicubic upsampling:
    ``sr_metrics`` of both (PSNR, SSIM, consistency, the ``judge``'s accuracy where one is named, spread)."""
    task = make_task(ctx.train_cfg.get("task"))
    if not isinstance(task, SuperResolution):
        raise ConfigError(
            f"metrics=[sr] evaluates a super-resolution model (trained with task=sr, e.g. experiment=sr_digits); "
            f"{ctx.cfg.ckpt_path} has task={getattr(task, 'name', None)}"
        )
    if not (isinstance(options.num_samples, int) and options.num_samples >= 1):
        raise ConfigError(f"sr.num_samples={options.num_samples} must be an integer >= 1 (samples per input)")
    x0, labels = held_out(ctx, options.num_images, "sr")  # pixels, also for latent diffusion
    lowres = task(x0)  # [N,C,H/f,W/f]: the condition, computed from the pixels as in training
    N, K = len(x0), int(options.num_samples)
    predict, judge_info = judge_for(ctx, str(options.judge), "sr") if options.get("judge") else (None, {"judge": None})
    w = float(options.get("guidance") or 0.0)
    denoiser = GuidedDenoiser(ctx.denoiser, w, options.get("guidance_rescale") or 0.0) if w else ctx.denoiser
    cond = Cond(image=lowres, labels=labels if ctx.denoiser.num_classes else None).repeat_interleave(K)
    sampler = Sampler.from_config(given(ctx.train_cfg.get("sampler")), given(options.get("sampler")))
    print(f"sampler: {sampler}")
    start = time.perf_counter()
    samples = generate(denoiser, sampler, N * K, seed=ctx.cfg.seed, batch_size=ctx.cfg.batch_size, cond=cond,
                       progress=True)  # fmt: skip  # [N*K,C,H,W] pixels (latents decoded), K per input in a row
    seconds_sampling = time.perf_counter() - start
    window = ssim_window(tuple(x0.shape[-2:]))
    bicubic = upsample_bicubic(lowres, tuple(x0.shape[-2:]))
    results = {
        "model": sr_metrics(samples.unflatten(0, (N, K)), x0, lowres, task, predict, labels, window),
        "bicubic": sr_metrics(bicubic[:, None], x0, lowres, task, predict, labels, window),
    }
    if predict is not None:
        results["originals_accuracy"] = float((predict(x0) == labels.numpy()).mean())  # the judge's own ceiling
    if ctx.output_dir is not None:  # the outputs, for any other judge (bench/mnist_classifier.py reads them)
        with atomic_path(ctx.output_dir / "sr_samples.npz") as tmp:
            np.savez_compressed(
                tmp, images=to_hwc_uint8(samples), labels=labels.repeat_interleave(K).numpy(),
                input_index=torch.arange(N).repeat_interleave(K).numpy(), bicubic=to_hwc_uint8(bicubic),
                originals=to_hwc_uint8(x0), lowres=to_hwc_uint8(lowres),
            )  # fmt: skip
    f = task.factor
    protocol = {
        "num_images": N, "num_samples": K, "dataset": ctx.train_cfg.data.get("name", "?"),
        "split": "validation (the first num_images)", "factor": f,
        "sizes": f"{x0.shape[-2] // f}x{x0.shape[-1] // f} -> {x0.shape[-2]}x{x0.shape[-1]}",
        "degradation": f"mean over {f}x{f} blocks (the task's)", "bicubic": "torch bicubic (a = -0.75), clamped",
        "sampler": sampler.to_config(), "network_evaluations": sampler.num_evaluations(ctx.denoiser.diffusion),
        "guidance": w, "guidance_rescale": float(options.get("guidance_rescale") or 0.0), "seed": ctx.cfg.seed,
        "range": "[0, 1], clamped",
        "averaging": "every number is the mean over all num_images x num_samples outputs",
        "psnr": "per image, then the mean",
        "ssim_window": f"gaussian sigma {window[1]}, {window[0]} taps, reflect-padded",
        "consistency": "PSNR of the output downsampled by the task against the low-resolution input",
        "spread": "per-pixel std (population) over an input's samples, mean over pixels and inputs",
        **judge_info,
    }  # fmt: skip
    print_table(f"x{f} super-resolution of {N} validation images ({K} samples each)",
                {"model": results["model"], "bicubic": results["bicubic"]})  # fmt: skip
    if predict is not None:
        print(f"judge ({judge_info['judge']}) on the originals: accuracy {results['originals_accuracy']:.4f}")
    return {**results, "seconds_sampling": seconds_sampling, "protocol": protocol}


def caption(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """A text model on the digit pairs: ``per_pair`` samples of each of the 100 ordered pairs, its captions in
    turn (``sampler``, classifier-free ``guidance`` with the empty caption as the null), read by the ``judge`` (an
    RBF-SVM fit on the training digits, or ``classifier``: a noisy-classifier checkpoint at t = 0): accuracy on
    the seen and on the held-out pairs, per half, the swap test and the judge's ceiling on the real validation
    pairs (``ddpmlab.metrics.caption``). Writes caption.json and caption_grid.png beside metrics.json."""
    from ddpmlab.metrics.caption import caption_accuracy, digit_svm, judge_ceiling

    needs = "metrics=[caption] needs a model trained on data=digit_pairs (experiment=text_digits)"
    if ctx.denoiser.tokenizer is None:
        raise ConfigError(f"{needs}; {ctx.cfg.ckpt_path} is not conditioned on text")
    datamodule = ctx.datamodule()
    if not hasattr(datamodule.train_set, "held_out") or len(getattr(datamodule.train_set, "captions", ())) != 100:
        raise ConfigError(f"{needs}; {ctx.cfg.ckpt_path} was trained on data={ctx.train_cfg.data.get('name')}")
    dataset = datamodule.val_set  # every pair, of the digits training never saw: the judge's ceiling
    if dataset is None or not len(dataset):
        raise ConfigError(
            "metrics=[caption] reads the judge's ceiling off the validation pairs, and there are none: keep "
            "data.val_fraction > 0 and data.val_pairs_per_pair >= 1 (e.g. +data.val_pairs_per_pair=10)"
        )
    per_pair = options.per_pair
    if not (isinstance(per_pair, int) and not isinstance(per_pair, bool) and per_pair >= 1):
        raise ConfigError(f"caption.per_pair={per_pair} must be an integer >= 1 (samples of each ordered pair)")
    if options.get("classifier"):
        judge, judge_info = judge_for(ctx, str(options.classifier), "caption")
    else:
        data_cfg = OmegaConf.merge(ctx.train_cfg.data, ctx.cfg.get("data") or {})
        judge = digit_svm(float(data_cfg.get("val_fraction", 0.1)))
        judge_info = {"judge": "RBF-SVM (C=10) fit on the training split of the bundled digits"}
    w = float(options.get("guidance") or 0.0)
    denoiser = GuidedDenoiser(ctx.denoiser, w, options.get("guidance_rescale") or 0.0) if w else ctx.denoiser
    sampler = Sampler.from_config(given(ctx.train_cfg.get("sampler")), given(options.get("sampler")))
    print(f"sampler: {sampler}, guidance w = {w}")

    def sample(prompts: list[str], seed: int) -> torch.Tensor:
        cond = text_cond(ctx.denoiser, prompts)  # a prompt the tokenizer refuses is a ConfigError naming it
        return generate(denoiser, sampler, len(prompts), seed=seed, batch_size=ctx.cfg.batch_size, cond=cond,
                        progress=True)  # fmt: skip

    start = time.perf_counter()
    run = caption_accuracy(sample, dataset.captions, dataset.held_out, judge, per_pair, seed=ctx.cfg.seed)
    seconds_sampling = time.perf_counter() - start
    result = {**run.metrics, "ceiling": judge_ceiling(dataset.images, dataset.labels, judge)}
    protocol = {
        "per_pair": per_pair, "num_samples": len(run.keys), "guidance": w,
        "guidance_rescale": float(options.get("guidance_rescale") or 0.0), "sampler": sampler.to_config(),
        "network_evaluations": sampler.num_evaluations(ctx.denoiser.diffusion), "seed": ctx.cfg.seed,
        "held_out_pairs": sorted(int(k) for k in dataset.held_out),
        "captions": "sample j of pair (a, b): its caption (j + a + b) mod K of K, the same template for (b, a)",
        "halves": "left x[..., :W/2], right x[..., W/2:], each read as one digit",
        "swap": "(a, b) and (b, a), a < b, from the same x_T and sampler noise: both read right",
        "ceiling": f"the judge on the {len(dataset)} real validation pairs", **judge_info,
    }  # fmt: skip
    result = {**result, "seconds_sampling": seconds_sampling, "protocol": protocol}
    print_table(
        f"caption accuracy, {per_pair} samples per ordered pair (guidance w = {w})",
        {name: {k: result[name][k] for k in ("accuracy", "left", "right")} for name in ("seen", "held_out", "ceiling")},
    )
    swap = result["swap"]
    print(f"swap test: {swap['all']:.4f} ({swap['n']} pairs of samples), seen {swap['seen']:.4f}, "
          f"with a held-out order {swap['held_out']:.4f}   judge: {judge_info['judge']}")  # fmt: skip
    if ctx.output_dir is not None:
        grid = caption_grid(run, dataset, per_pair)
        result["grid"] = grid["rows"]
        save_grid(grid["images"], ctx.output_dir / "caption_grid.png", nrow=grid["nrow"])
        write_atomic(ctx.output_dir / "caption.json", json.dumps(result, indent=2) + "\n")
    return result


def caption_grid(run, dataset, per_pair: int, rows: int = 4, columns: int = 8) -> dict[str, Any]:
    """A plain grid of the caption samples: for each of the first ``rows`` held-out pairs (a, b), a row of its
    samples and a row of its swap (b, a), each ended by a real validation pair; the rows' prompts beside it."""
    keys = []
    for a, b in sorted(divmod(k, 10) for k in dataset.held_out)[:rows]:
        keys += [10 * a + b, 10 * b + a]
    per = min(columns, per_pair)
    images, described = [], []
    for key in keys:
        where = (run.keys == key).nonzero().flatten()[:per]
        real = dataset.images[int((dataset.labels == key).nonzero()[0])].float() / 127.5 - 1
        images += [*to_unit(run.samples[where]), to_unit(real)]
        described.append(
            {"pair": list(divmod(key, 10)), "held_out": key in dataset.held_out,
             "prompts": [run.prompts[i] for i in where.tolist()], "last_column": "a real validation pair"}
        )  # fmt: skip
    return {"images": torch.stack(images), "nrow": per + 1, "rows": described}


def quality_measure(ctx: EvalContext, options: DictConfig, real: torch.Tensor, reference: str, section: str):
    """How generated images are judged against ``real`` (uint8): ``options.features`` = ``inception`` (FID with the
    Inception protocol of ``fid.*``), ``pixels`` or a noisy-classifier checkpoint (a Frechet distance in that space,
    ``ddpmlab.metrics.frechet``), or ``auto``: Inception where its weights are present, else pixels for images of at
    most 256 values."""
    from ddpmlab.atlas import Quality
    from ddpmlab.metrics.fid import fidelity_metrics, inception_present
    from ddpmlab.metrics.frechet import feature_space, frechet_to_real, real_stats

    fid_cfg = ctx.cfg.fid
    spec = options.get("features") or "auto"
    dim = int(np.prod(real.shape[1:]))
    if spec == "auto":
        if inception_present(fid_cfg.weights_path):
            spec = "inception"
        elif dim <= 256:
            spec = "pixels"
        else:
            raise ConfigError(
                f"no Inception weights here for FID, and {dim}-d pixels are too many for a Frechet distance in pixels: "
                f"pass {section}.features=<noisy-classifier checkpoint> (experiment=classifier_mnist ...), "
                f"{section}.features=pixels, or fid.weights_path=<Inception weights>"
            )
    if spec == "inception":

        def measure(fake):
            values = fidelity_metrics(
                fake, real, reference, isc=False, fid=True, kid=False, feature_extractor=fid_cfg.feature_extractor,
                feature_layer=fid_cfg.feature_layer, weights_path=fid_cfg.weights_path, cache_dir=fid_cfg.cache_dir,
                batch_size=ctx.cfg.batch_size, device=ctx.device, seed=ctx.cfg.seed,
            )  # fmt: skip
            return {"fid": values["fid"]}

        label = f"FID ({fid_cfg.feature_extractor})"
        return Quality(measure, "fid", label, f"{label} {fid_cfg.feature_layer} {reference}")
    space = feature_space(str(spec), tuple(real.shape[1:]), f"{section}.features")
    mu, cov = real_stats(space, real, reference, fid_cfg.cache_dir, ctx.cfg.batch_size, ctx.device)

    def measure(fake):
        return {"fd": frechet_to_real(space, fake, mu, cov, ctx.cfg.batch_size, ctx.device)}

    return Quality(measure, "fd", space.label, f"{space.key()} {reference}")


def atlas(ctx: EvalContext, options: DictConfig) -> dict[str, Any]:
    """Quality against network evaluations for every sampler of ``atlas.samplers`` at every ``atlas.nfe``, all cells
    from the same x_T (``ddpmlab.atlas``): atlas.json, atlas.csv and atlas.png beside metrics.json."""
    from ddpmlab.atlas import atlas_samplers, check_atlas_options, file_digest, run_atlas
    from ddpmlab.metrics.fid import generate_on_devices, real_images

    check_atlas_options(options)
    if ctx.denoiser.tokenizer:
        raise ConfigError("metrics=[atlas] draws without captions; a text model is measured by metrics=[caption]")
    samplers = atlas_samplers(list(OmegaConf.to_container(options.samplers, resolve=True)))
    datamodule = ctx.datamodule()
    real = real_images(datamodule, options.num_real)
    name = getattr(datamodule, "name", ctx.train_cfg.data.get("name", "data"))
    reference = f"{name}-train-{'x'.join(map(str, real.shape[1:]))}-first{len(real)}"
    quality = quality_measure(ctx, options, real, reference, "atlas")
    denoiser, conds = ctx.denoiser, None
    task = make_task(ctx.train_cfg.get("task"))
    if task is not None:  # an image-conditioned model: sample i for validation image i's condition, as fid's
        x_val, y_val = held_out(ctx, None, "atlas")
        conds = Cond(image=task(x_val, torch.Generator().manual_seed(ctx.cfg.seed)))
        conds = conds.replace(labels=y_val) if denoiser.num_classes else conds
    if options.guidance:
        if conds is None and denoiser.num_classes:
            conds = Cond(labels=torch.arange(options.num_samples) % denoiser.num_classes)
        denoiser = GuidedDenoiser(denoiser, options.guidance)
    perf = (ctx.cfg.get("perf") or {}).get("sampling")

    def draw(sampler):
        return generate_on_devices(
            denoiser, sampler, options.num_samples, ctx.cfg.batch_size, ctx.cfg.seed, [ctx.device], perf, conds=conds,
            progress=False,
        )  # fmt: skip

    identity = {
        "checkpoint_sha256": file_digest(ctx.cfg.ckpt_path), "ema": ctx.cfg.use_ema,
        "num_samples": options.num_samples, "seed": ctx.cfg.seed, "batch_size": ctx.cfg.batch_size,
        "guidance": float(options.guidance), "device": ctx.device.type,
        "perf": OmegaConf.to_container(perf, resolve=True) if isinstance(perf, DictConfig) else perf,
    }  # fmt: skip
    protocol = {
        "checkpoint": str(ctx.cfg.ckpt_path), "num_samples": options.num_samples, "reference": reference,
        "num_real": len(real), "seed": ctx.cfg.seed, "batch_size": ctx.cfg.batch_size, "same_x_T": True,
        "nfe": "network calls per sample; a sampler that cannot take the NFE asked takes the most below it",
        "guidance": float(options.guidance) if options.guidance else None,
        "guidance_nfe": "conditional and unconditional halves batched in one call on [2B]: counted once"
        if options.guidance else None,
        "device": str(ctx.device), "threads": torch.get_num_threads(),
        "title": f"{'/'.join(Path(str(ctx.cfg.ckpt_path)).parts[-3:])}: {quality.label}, "
        f"{options.num_samples} samples a cell",
    }  # fmt: skip
    cache_dir = Path(options.cache_dir).expanduser() if options.cache_dir else None
    out_dir = ctx.output_dir or Path(".")
    result = run_atlas(denoiser, samplers, list(options.nfe), draw, quality, identity, out_dir, cache_dir, protocol)
    return {**result, "files": [str(out_dir / f"atlas.{ext}") for ext in ("json", "csv", "png")]}


METRICS: dict[str, Callable[[EvalContext, DictConfig], dict[str, Any]]] = {
    "bpd": bpd,
    "fid": fid,
    "inpaint": inpaint,
    "guided": guided,
    "sr": sr,
    "caption": caption,
    "atlas": atlas,
}


def evaluate(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Compute every metric in ``cfg.metrics`` for the checkpoint and write them to ``<output_dir>/metrics.json``."""
    check_evaluate_config(cfg)
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    run = process_group()  # evaluate.py started by torchrun or SLURM: the ranks share out the sampling
    if run is not None and list(cfg.metrics) != ["fid"]:
        raise ConfigError(
            f"{run.launcher} started {run.world_size} ranks: they share out metrics=[fid] only, and "
            f"metrics={list(cfg.metrics)} would run whole on every rank; evaluate the others in one process"
        )
    device = pick_device(cfg.device)
    if run is not None and device.type == "cuda":
        device = torch.device("cuda", run.local_rank)
    if Path(str(cfg.ckpt_path)).expanduser().is_dir():  # an export folder, ddpmlab's or diffusers' format
        denoiser, train_cfg = load_denoiser(cfg.ckpt_path)
        step = None
    else:
        ckpt = load_checkpoint(cfg.ckpt_path)
        denoiser, train_cfg = denoiser_from_checkpoint(ckpt, ema=cfg.use_ema, where=str(cfg.ckpt_path))
        step = ckpt.get("global_step")
    if cfg.get("data"):  # resolved here, where ${paths.data_dir} of a named data config (data=cifar10) resolves
        with open_dict(cfg):
            cfg.data = OmegaConf.to_container(cfg.data, resolve=True)
    train_cfg = with_named_data(train_cfg, cfg, denoiser)
    if "bpd" in cfg.metrics and not stage_of(train_cfg).pixel_space:
        # DDPM's bound ends in a discrete decoder over the 256 levels of each pixel; a latent U-Net models
        # continuous latents z = s * E(x), whose bound says nothing in bits per pixel dimension (LDM reports none).
        raise ConfigError(
            f"metrics=[bpd] (the default) bounds the likelihood of pixels under a pixel-space model, but "
            f"{cfg.ckpt_path} is latent diffusion, whose U-Net models latents of its first stage: evaluate it with "
            "metrics=[fid] (its samples are decoded to pixels)"
        )
    ctx = EvalContext(denoiser.to(device), train_cfg, cfg, device, Path(output_dir))
    results: dict[str, Any] = {"checkpoint": {"path": str(cfg.ckpt_path), "global_step": step, "ema": cfg.use_ema}}
    for name in cfg.metrics:
        start = time.perf_counter()
        results[name] = METRICS[name](ctx, cfg.get(name) or OmegaConf.create())
        results[name].setdefault("seconds", time.perf_counter() - start)
    if run is not None and run.rank != 0:
        return results  # rank 0 writes metrics.json
    write_atomic(Path(output_dir) / "metrics.json", json.dumps(results, indent=2) + "\n")
    if (cfg.get("logger") or {}).get("wandb") is not None:
        log_to_wandb(cfg, results, Path(output_dir))
    return results


def shipped_data_names() -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))


def with_named_data(train_cfg: DictConfig, cfg: DictConfig, denoiser: Denoiser) -> DictConfig:
    """The model's config with the data named on the command line (``data=cifar10``: a model whose folder does not
    say, or other data of the same images), which must hold the images a pixel-space model draws."""
    data = OmegaConf.merge(train_cfg.data, cfg.get("data") or {})
    if data.get("name") == train_cfg.data.get("name"):
        return train_cfg
    train_cfg = train_cfg.copy()
    train_cfg.data = data
    if not stage_of(train_cfg).pixel_space:
        return train_cfg
    shape = (int(data.channels), *image_hw(data.image_size))
    if shape != tuple(denoiser.sample_shape):
        raise ConfigError(
            f"data={data.name} holds {'x'.join(map(str, shape))} images, but {cfg.ckpt_path} draws "
            f"{'x'.join(map(str, denoiser.sample_shape))}: name data of its image size"
        )
    return train_cfg


def log_to_wandb(cfg: DictConfig, results: dict[str, Any], output_dir: Path) -> None:
    """The evaluation as a W&B run (``logger=wandb``): every number of metrics.json in its summary, and the atlas as
    a table and its plot. Only the project, entity and offline keys of the logger config are read (its name and
    tags name a training run's choices)."""
    import wandb

    logger = cfg.logger.wandb
    keys = {k: OmegaConf.select(logger, k, default=None) for k in ("project", "entity")}
    offline = bool(OmegaConf.select(logger, "offline", default=False))
    run_name = Path(str(cfg.ckpt_path)).parent.parent.name  # <run dir>/checkpoints/last.ckpt
    run = wandb.init(
        **keys, job_type="evaluate", dir=str(output_dir), name=f"evaluate-{run_name}",
        config={"ckpt_path": str(cfg.ckpt_path), "metrics": list(cfg.metrics), "seed": cfg.seed},
        mode="offline" if offline else None,
    )  # fmt: skip
    try:
        summary = {
            f"{name}/{k}": v
            for name, values in results.items()
            if isinstance(values, dict)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        run.summary.update(summary)
        if "atlas" in results:
            atlas = results["atlas"]
            columns = ["sampler", "nfe", "requested_nfe", "num_steps", atlas["quality"], "seconds_per_image"]
            key = atlas["key"]
            rows = [[c["sampler"], c["nfe"], c["requested_nfe"], c["num_steps"], c[key], c["seconds_per_image"]]
                    for c in atlas["cells"]]  # fmt: skip
            run.log({"atlas/table": wandb.Table(columns=columns, data=rows),
                     "atlas/plot": wandb.Image(str(output_dir / "atlas.png"))})  # fmt: skip
    finally:
        run.finish()
