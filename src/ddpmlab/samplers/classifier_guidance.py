"""Classifier guidance (Dhariwal & Nichol 2021, Sec. 4): steer an (unconditional or conditional) diffusion model
towards class y with the gradient of a noisy classifier's log p_phi(y | x_t), scaled by s.

The guided denoiser returns the model's Prediction with ``guide_grad = s * grad_{x_t} log p_phi(y | x_t, t)``
attached, and each sampler uses it as its paper says:
    ancestral (Algorithm 1):  mu <- mu + s Sigma grad log p_phi(y | x_t)           (samplers.ddpm.ddpm_step)
    DDIM etc. (Algorithm 2):  eps_hat <- eps_hat - sqrt(1 - alpha_bar_t) s grad log p_phi(y | x_t)
                                                                      (diffusion.parameterization.shift_score)
s = 0 is the model itself; larger s gives samples the classifier is surer of, at a cost in diversity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddpmlab.conditioning import Cond
from ddpmlab.diffusion.gaussian import GaussianDiffusion
from ddpmlab.diffusion.parameterization import Denoiser, DenoiserWrapper, Prediction
from ddpmlab.errors import ConfigError


def grad_log_p(classifier: nn.Module, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """grad_{x_t} log p_phi(y | x_t, t) [B,C,H,W], each sample's own (the batch sum separates)."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x, t).float(), dim=-1)  # [B,K]
        selected = log_p[torch.arange(len(y), device=y.device), y]
        return torch.autograd.grad(selected.sum(), x)[0]


class ClassifierGuidedDenoiser(DenoiserWrapper):
    """Wraps a :class:`Denoiser` (or another guided one) and a noisy classifier; ``forward(x_t, t, y)`` returns the
    model's Prediction with the classifier's scaled gradient for labels y [B] attached. The classifier sees the
    original timestep t (as the model does), also on a respaced grid."""

    def __init__(self, denoiser: Denoiser | nn.Module, classifier: nn.Module, scale: float):
        super().__init__()
        if not float(scale) >= 0:
            raise ConfigError(f"classifier.scale={scale} must be >= 0 (0: unguided)")
        self.denoiser, self.classifier, self.scale = denoiser, classifier.eval(), float(scale)
        self.conditional_model = bool(getattr(denoiser.net, "num_classes", None))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond | Tensor | None = None) -> Prediction:
        cond = Cond.of(cond)
        y = None if cond is None else cond.labels
        if y is None or y.shape != (x_t.shape[0],):
            raise ConfigError(
                f"classifier guidance needs one class label per sample, [{x_t.shape[0]}], e.g. labels=[0,1,2]"
            )
        model_cond = cond if self.conditional_model else cond.replace(labels=None)  # the image, if any, stays
        pred = self.denoiser(x_t, t, model_cond if model_cond.image is not None or self.conditional_model else None)
        if self.scale == 0:
            return pred
        return pred._replace(guide_grad=self.scale * grad_log_p(self.classifier, x_t, t, y))


def check_classifier_fits(
    classifier: nn.Module, classifier_diffusion: GaussianDiffusion, classifier_schedule, denoiser, model_schedule
) -> None:
    """Refuse a classifier trained for another image size, channel count, class count or noise schedule, showing
    both sides."""
    net = denoiser.net
    problems = []
    for what, theirs, ours in (
        ("image size", classifier.image_size, net.image_size),
        ("channels", classifier.in_channels, net.in_channels),
    ):
        if theirs != ours:
            problems.append(f"{what}: classifier {theirs}, diffusion model {ours}")
    model_classes = getattr(net, "num_classes", None)
    if model_classes and model_classes != classifier.num_classes:
        problems.append(f"classes: classifier {classifier.num_classes}, class-conditional model {model_classes}")
    a, b = classifier_diffusion.beta64, denoiser.diffusion.beta64
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=1e-12):
        problems.append(
            f"schedule: classifier {classifier_schedule} (T={a.numel()}), "
            f"diffusion model {model_schedule} (T={b.numel()})"
        )
    if problems:
        raise ConfigError(
            "this classifier was trained for another diffusion process or data: "
            + "; ".join(problems)
            + ". Train one for this model: python train.py experiment=classifier_digits "
            "(with the model's data and schedule)"
        )
