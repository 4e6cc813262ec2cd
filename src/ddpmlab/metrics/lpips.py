"""LPIPS (Zhang et al. 2018), the perceptual distance of a first stage's loss and of evaluate.py's inpainting
metric, on images in [-1, 1] (grey images repeated to three channels)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ddpmlab.errors import ConfigError


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
