"""The one way to draw images: :func:`generate` (samples) and :func:`generate_chain` (x_T -> x_0 snapshots).

``sample.py``, ``evaluate.py`` (FID), the training callbacks (sample grid, denoising chain, FID), the notebooks
and ``bench/sample_throughput.py`` all come through here, so the levers a benchmark measures are the ones users
run. Randomness: one ``torch.Generator`` on the denoiser's device, seeded with ``seed``, draws every x_T (batch
after batch) and every noise of the sampler, so the same seed and batch size give the same samples.

Samples are images in the data's range, nominally [-1, 1] (a latent denoiser's samples are decoded to pixels by its
``decode``); ``ddpmlab.images`` turns them into [0, 1] or uint8.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ddpmlab.perf import autocast, prepare_sampling
from ddpmlab.progress import SamplingProgress


def _device_of(denoiser: nn.Module) -> torch.device:
    return next(denoiser.parameters()).device


@contextmanager
def _sampling(denoiser: nn.Module, perf: Mapping[str, Any] | None):
    """Eval mode (restored after), and with a ``perf`` config the sampling levers and the network's precision."""
    device = _device_of(denoiser)
    was_training = denoiser.training
    denoiser.eval()
    precision = "fp32"
    if perf is not None:
        precision = prepare_sampling(denoiser.net, device, perf)["precision"]
    try:
        with torch.no_grad(), autocast(device, precision):
            yield device
    finally:
        denoiser.train(was_training)


@contextmanager
def _progress(progress: bool | str | Callable, total: int, label: str) -> Iterator[Callable | None]:
    """The step wrapper a sampler call gets: the caller's own (a callable), a new bar (True or a label), or none."""
    if callable(progress):
        yield progress
    elif not progress:
        yield None
    else:
        with SamplingProgress(total, progress if isinstance(progress, str) else label) as bar:
            yield bar.wrap


def generate(
    denoiser: nn.Module,
    sampler,
    num_samples: int,
    *,
    seed: int = 0,
    batch_size: int = 256,
    labels: Tensor | None = None,
    x0: Tensor | None = None,
    keep: Tensor | None = None,
    perf: Mapping[str, Any] | None = None,
    to_cpu: bool = True,
    progress: bool | str | Callable = False,
) -> Tensor:
    """``num_samples`` samples [N, C, H, W] (float32, model range) from ``sampler`` (a :class:`Sampler`), drawn in
    batches of ``batch_size`` on the denoiser's device.

    - ``denoiser``: a :class:`~ddpmlab.diffusion.Denoiser` (or a ``GuidedDenoiser`` for classifier-free
      guidance); its ``sample_shape`` is the shape of each sample and its ``diffusion`` the schedule.
    - ``labels`` [N]: the class of each sample (class-conditional models; passed to the network as ``cond``).
    - ``x0`` [1 or N, C, H, W] in [-1, 1] and ``keep`` (1 = known pixel, broadcastable): RePaint's inputs, for a
      ``Sampler("repaint", ...)``, in the diffusion's space (for a latent denoiser: the encoded image and the mask
      at latent size).
    - ``perf``: the ``perf.sampling`` config (compile with CUDA graphs, channels_last, TF32, bf16 ``precision``),
      applied in place to ``denoiser.net``; ``auto`` switches are on for a CUDA device only, so on the CPU this
      is the plain fp32 eager path. None: nothing applied.
    - ``to_cpu``: gather the samples on the CPU (else they stay on the device).
    - ``progress``: True (or a label): a bar over network evaluations on a terminal, a line every quarter
      elsewhere; a callable: the caller's own step wrapper (``SamplingProgress.wrap``), for a bar that spans
      several calls; False: silent.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1")
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"labels holds {len(labels)} classes for {num_samples} samples")
    out = []
    evals = sampler.num_evaluations(denoiser.diffusion) * -(-num_samples // batch_size)
    with _sampling(denoiser, perf) as device, _progress(progress, evals, f"sampling {num_samples}") as wrap:
        generator = torch.Generator(device).manual_seed(seed)
        inpaint = {} if x0 is None else {"x0": x0.to(device), "keep": keep.to(device)}
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            x_T = torch.randn((n, *denoiser.sample_shape), generator=generator, device=device)
            cond = None if labels is None else labels[start : start + n].to(device)
            x = sampler(denoiser, denoiser.diffusion, x_T, generator=generator, cond=cond, progress=wrap, **inpaint)
            x = denoiser.decode(x).float()  # latent diffusion: z -> pixels; the identity for pixel diffusion
            out.append(x.cpu() if to_cpu else x)
    return torch.cat(out)


def generate_chain(
    denoiser: nn.Module,
    sampler,
    num_samples: int,
    num_frames: int = 10,
    *,
    seed: int = 0,
    labels: Tensor | None = None,
    perf: Mapping[str, Any] | None = None,
    progress: bool | str | Callable = False,
) -> Tensor:
    """The denoising chain of ``num_samples`` samples (one batch, seeded as :func:`generate`): [N, F, C, H, W]
    on the CPU, F = ``num_frames`` snapshots evenly spaced over the sampler's steps, x_T first and x_0 last;
    ``progress`` as for :func:`generate`."""
    evals = sampler.num_evaluations(denoiser.diffusion)
    with _sampling(denoiser, perf) as device, _progress(progress, evals, "denoising chain") as wrap:
        generator = torch.Generator(device).manual_seed(seed)
        x_T = torch.randn((num_samples, *denoiser.sample_shape), generator=generator, device=device)
        cond = None if labels is None else labels.to(device)
        frames = sampler.chain(
            denoiser, denoiser.diffusion, x_T, num_frames, generator=generator, cond=cond, progress=wrap
        )
        frames = denoiser.decode(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])  # latents: each state as pixels
    return frames.float().cpu()
