"""Metrics of completions against their originals (inpainting) and of samples against the labels they were drawn
for (guidance), as the papers report them.

- Inpainting: the error inside the hole (MSE on [0, 1], hole pixels only), and over the whole image PSNR and SSIM
  (torchmetrics, data range 1, the mean of the per-image values; SSIM's Gaussian window of sigma 1.5, 11 taps,
  over the reflect-padded image) and, where the VGG16 weights are in torch's hub
  cache, LPIPS (torchmetrics' VGG LPIPS, Zhang et al. 2018; the weights read as tensors only, ddpmlab.pretrained).
- Guidance: the agreement of a judge classifier's prediction with the requested label, and the within-class pixel
  std (the std over the samples of one class, per pixel on [0, 1], averaged over pixels and classes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ddpmlab.errors import ConfigError
from ddpmlab.images import to_uint8, to_unit


def inpainting_metrics(completions: Tensor, originals: Tensor, keep: Tensor, lpips: bool = False) -> dict[str, float]:
    """``completions`` and ``originals`` [N,C,H,W] in [-1, 1], ``keep`` [H,W] (1 = known pixel): ``mse_hole``
    (mean over the hole's pixels and channels, on [0, 1]), ``psnr`` and ``ssim`` (whole images, mean over images)
    and with ``lpips=True`` ``lpips`` (mean over images; ConfigError where its weights are not cached or are not
    plain tensors)."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    if completions.shape != originals.shape:
        raise ValueError(f"completions {tuple(completions.shape)} and originals {tuple(originals.shape)} differ")
    x_hat, x = to_unit(completions), to_unit(originals)  # clamped: samples may overshoot
    hole = (keep < 0.5).expand_as(x)
    if not hole.any():
        raise ConfigError("the mask has no hole (every pixel known): choose a mask with pixels to inpaint")
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)  # Gaussian sigma 1.5 (11 taps), reflect-padded
    result = {
        "mse_hole": float(((x_hat - x) ** 2)[hole].mean()),
        "psnr": float(psnr(x_hat, x)),
        "ssim": float(ssim(x_hat, x)),
    }
    if lpips:
        from ddpmlab.metrics.lpips import lpips as lpips_net

        net = lpips_net(x.shape[1])  # ConfigError naming the missing or refused weights file
        with torch.no_grad():
            result["lpips"] = float(net(completions.float().clamp(-1, 1), originals.float()).mean())
    return result


def within_class_std(pixels: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the per-pixel std over that class's samples, averaged over pixels."""
    return float(np.mean([pixels[labels == k].std(0).mean() for k in np.unique(labels)]))


def to_pixels(images: Tensor) -> np.ndarray:
    """[N,C,H,W] in [-1, 1] -> [N, C*H*W] float64 on [0, 1], quantised to uint8 as saved samples are."""
    return to_uint8(images).double().flatten(1).numpy() / 255.0


def svc_digits(train_x0: Tensor, train_labels: Tensor) -> Callable[[Tensor], np.ndarray]:
    """An RBF-SVM (scikit-learn ``SVC(C=10, gamma="scale")``) fit on real images [N,C,H,W] in [-1, 1] (their
    uint8 pixels on [0, 1]); returns ``predict(images) -> labels``."""
    from sklearn.svm import SVC

    svm = SVC(kernel="rbf", C=10.0, gamma="scale").fit(to_pixels(train_x0), train_labels.numpy())
    return lambda images: svm.predict(to_pixels(images))


def classifier_judge(classifier: torch.nn.Module, batch_size: int = 256) -> Callable[[Tensor], np.ndarray]:
    """A noisy classifier p(y | x_t, t) judging clean images: argmax of its logits at t = 0."""
    device = next(classifier.parameters()).device

    @torch.no_grad()
    def predict(images: Tensor) -> np.ndarray:
        out = []
        for x in images.split(batch_size):
            t = torch.zeros(len(x), dtype=torch.long, device=device)
            out.append(classifier(x.to(device).float(), t).argmax(-1).cpu())
        return torch.cat(out).numpy()

    return predict


def guided_agreement(samples: Tensor, labels: Tensor, predict: Callable[[Tensor], np.ndarray]) -> dict[str, float]:
    """``agreement``: the fraction of samples [N,C,H,W] (in [-1, 1]) whose predicted class is the requested label;
    ``within_class_std`` of their uint8 pixels on [0, 1]."""
    want = labels.cpu().numpy()
    return {
        "agreement": float((np.asarray(predict(samples)) == want).mean()),
        "within_class_std": within_class_std(to_pixels(samples), want),
    }
