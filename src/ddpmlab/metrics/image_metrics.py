"""Metrics of completions against their originals (inpainting), of super-resolved images against the
high-resolution originals and the low-resolution inputs, and of samples against the labels they were drawn for
(guidance), as the papers report them.

- Inpainting: the error inside the hole (MSE on [0, 1], hole pixels only), and over the whole image PSNR and SSIM
  (torchmetrics, data range 1, the mean of the per-image values; SSIM's Gaussian window of sigma 1.5, 11 taps,
  over the reflect-padded image) and, where the VGG16 weights are in torch's hub
  cache, LPIPS (torchmetrics' VGG LPIPS, Zhang et al. 2018; the weights read as tensors only, ddpmlab.pretrained).
- Super-resolution (SR3, Saharia et al. 2021, Sec. 5; LDM, Rombach et al. 2022, Sec. 4.4): PSNR and SSIM against
  the originals; consistency, the PSNR of the output degraded again (downsampled by the task) against the
  low-resolution input (SR3's "consistency"); a judge classifier's accuracy on the outputs against the originals'
  labels; the spread, the per-pixel std between the samples of one input (0 for a deterministic method).
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
    if completions.shape != originals.shape:
        raise ValueError(f"completions {tuple(completions.shape)} and originals {tuple(originals.shape)} differ")
    x_hat, x = to_unit(completions), to_unit(originals)  # clamped: samples may overshoot
    hole = (keep < 0.5).expand_as(x)
    if not hole.any():
        raise ConfigError("the mask has no hole (every pixel known): choose a mask with pixels to inpaint")
    result = {"mse_hole": float(((x_hat - x) ** 2)[hole].mean()), **psnr_ssim(x_hat, x)}
    if lpips:
        from ddpmlab.metrics.lpips import lpips as lpips_net

        net = lpips_net(x.shape[1])  # ConfigError naming the missing or refused weights file
        with torch.no_grad():
            result["lpips"] = float(net(completions.float().clamp(-1, 1), originals.float()).mean())
    return result


WANG_WINDOW = (11, 1.5)  # SSIM's Gaussian window (Wang et al. 2004): 11 taps, sigma 1.5


def ssim_window(size: tuple[int, int]) -> tuple[int, float]:
    """(taps, sigma) of SSIM's Gaussian window for images of ``size``: Wang et al.'s 11 taps, sigma 1.5, where the
    image has at least 16 pixels a side; on smaller images (8x8 digits) 7 taps, sigma 1.0 (cut at 3 sigma, as
    Wang's), since 11 taps would reach 5 pixels into the reflection of an 8-pixel image at every border."""
    return WANG_WINDOW if min(size) >= 16 else (7, 1.0)


def psnr(x_hat: Tensor, x: Tensor) -> float:
    """PSNR (dB, data range 1) of each image [N,C,H,W] on [0, 1], the mean over images (inf where all are exact)."""
    from torchmetrics.image import PeakSignalNoiseRatio

    return float(PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))(x_hat, x))


def psnr_ssim(x_hat: Tensor, x: Tensor, window: tuple[int, float] = WANG_WINDOW) -> dict[str, float]:
    """``psnr`` and ``ssim`` (torchmetrics, data range 1, Gaussian ``window`` (taps, sigma) over the reflect-padded
    image) of images [N,C,H,W] on [0, 1] against ``x``, each the mean of the per-image values."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=window[0], sigma=window[1])
    return {"psnr": psnr(x_hat, x), "ssim": float(ssim(x_hat, x))}


def sr_metrics(
    outputs: Tensor, originals: Tensor, lowres: Tensor, degrade: Callable[[Tensor], Tensor],
    predict: Callable[[Tensor], np.ndarray] | None = None, labels: Tensor | None = None,
    window: tuple[int, float] = WANG_WINDOW,
) -> dict[str, float]:  # fmt: skip
    """Super-resolved ``outputs`` [N,K,C,H,W] (K samples of each input, in [-1, 1]) of the ``originals``
    [N,C,H,W] from their low-resolution ``lowres`` [N,C,h,w] (= ``degrade(originals)``), every number the mean
    over all N*K outputs, on pixels in [0, 1]: ``psnr``, ``ssim`` (``window``) against the originals;
    ``consistency``, the PSNR of ``degrade(output)`` against ``lowres``; with a judge ``predict``, its
    ``accuracy`` against ``labels`` [N]; ``spread``, the per-pixel std (population) over the K samples of an
    input, averaged over pixels and inputs."""
    N, K = outputs.shape[:2]
    if outputs.shape[2:] != originals.shape[1:] or len(originals) != N:
        raise ValueError(f"outputs {tuple(outputs.shape)} do not fit originals {tuple(originals.shape)}")
    flat = outputs.flatten(0, 1).float().clamp(-1, 1)  # [N*K,C,H,W], output k of input n at n*K + k

    def repeat(t: Tensor) -> Tensor:  # one row per output: input n's K times
        return t.repeat_interleave(K, dim=0)

    result = psnr_ssim(to_unit(flat), to_unit(repeat(originals)), window)
    result["consistency"] = psnr(to_unit(degrade(flat)), to_unit(repeat(lowres)))
    if predict is not None:
        result["accuracy"] = float((np.asarray(predict(flat)) == repeat(labels).numpy()).mean())
    result["spread"] = float(to_unit(outputs).std(dim=1, correction=0).mean())
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
