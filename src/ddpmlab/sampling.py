"""What to draw, from a config: the sampler (a checkpoint's own with the command line's keys on top) and classifier
guidance wired from ``classifier.ckpt_path``. ``sample.py`` and ``evaluate.py`` both come through here."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from ddpmlab.checkpoint import load_checkpoint
from ddpmlab.samplers import Sampler, with_guidance
from ddpmlab.samplers.classifier_guidance import ClassifierGuidedDenoiser, check_classifier_fits
from ddpmlab.samplers.guidance import cycle_labels
from ddpmlab.stages import classifier_from_checkpoint


def given(node: DictConfig | dict | None) -> dict:
    """The keys of a config section that are set (not ``???``), as primitives."""
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        return dict(node)
    return {k: OmegaConf.to_container(node, resolve=True)[k] for k in node if not OmegaConf.is_missing(node, k)}


def chosen_sampler(cfg: DictConfig, ckpt_cfg: DictConfig) -> Sampler:
    """The checkpoint's training sampler with the ``sampler`` keys of ``cfg`` (the command line's) on top."""
    return Sampler.from_config(given(ckpt_cfg.get("sampler")), given(cfg.get("sampler")))


def classifier_guidance(cfg: DictConfig, denoiser, ckpt_cfg: DictConfig, n: int, device: torch.device):
    """(labels [n], the classifier-guided denoiser) when ``classifier.ckpt_path`` is set, else None: a noisy
    classifier trained for this model's image size and schedule (refused otherwise, both shown) guides towards
    ``cfg.labels`` cycled over the n samples with scale ``classifier.scale`` (Dhariwal & Nichol 2021)."""
    spec = cfg.get("classifier") or {}
    if not spec.get("ckpt_path"):
        return None
    classifier, classifier_diffusion, classifier_cfg = classifier_from_checkpoint(load_checkpoint(spec.ckpt_path))
    check_classifier_fits(classifier, classifier_diffusion, classifier_cfg.schedule, denoiser, ckpt_cfg.schedule)
    if denoiser.num_classes:  # a conditional model: its labels (and guidance=) as well
        labels, denoiser = with_guidance(
            denoiser, cfg.get("labels"), cfg.get("guidance"), n, cfg.get("guidance_rescale")
        )
    else:
        labels = cycle_labels(cfg.get("labels"), classifier.num_classes, n)
    return labels, ClassifierGuidedDenoiser(denoiser, classifier.to(device), float(spec.get("scale", 1.0)))
