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

from ddpmlab.conditioning import Cond
from ddpmlab.perf import autocast, prepare_sampling
from ddpmlab.progress import SamplingProgress


def _device_of(denoiser: nn.Module) -> torch.device:
    return next(denoiser.parameters()).device


@contextmanager
def _sampling(denoiser: nn.Module, perf: Mapping[str, Any] | None):
    """Eval mode (restored after), and with a ``perf`` config the sampling levers. Yields the device and
    ``numerics``, the context each batch is drawn under (no autograd, the network's precision): entered per batch,
    so the caller of :func:`generate_batches` runs its own code between batches in its own modes."""
    device = _device_of(denoiser)
    was_training = denoiser.training
    denoiser.eval()
    precision = "fp32"
    if perf is not None:
        precision = prepare_sampling(denoiser.net, device, perf)["precision"]

    @contextmanager
    def numerics():
        with torch.no_grad(), autocast(device, precision):
            yield

    try:
        yield device, numerics
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
    cond: Cond | None = None,
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
    - ``labels`` [N]: the class of each sample (class-conditional models), short for ``cond=Cond(labels=labels)``.
    - ``cond``: a :class:`~ddpmlab.conditioning.Cond` of N conditions, one per sample (labels, a conditioning
      image, ...), sliced batch by batch; given with ``labels``, the labels are added to it.
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
    batches = generate_batches(
        denoiser, sampler, num_samples, seed=seed, batch_size=batch_size, labels=labels, cond=cond, x0=x0, keep=keep,
        perf=perf, progress=progress,
    )  # fmt: skip
    return torch.cat([x.cpu() if to_cpu else x for x, _ in batches])


def generate_batches(
    denoiser: nn.Module,
    sampler,
    num_samples: int,
    *,
    seed: int = 0,
    batch_size: int = 256,
    labels: Tensor | None = None,
    cond: Cond | None = None,
    x0: Tensor | None = None,
    keep: Tensor | None = None,
    perf: Mapping[str, Any] | None = None,
    progress: bool | str | Callable = False,
    start: int = 0,
    generator_state: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """:func:`generate`'s batches one at a time, as they are drawn: (samples [n,C,H,W] float32 on the denoiser's
    device, the generator's state after them), so a caller can write each batch away and hold only one.

    To continue a draw that stopped, pass ``start`` (a multiple of ``batch_size``: the samples already drawn) and
    ``generator_state``, the state yielded with the batch before it: the batches that follow are the ones an
    uninterrupted :func:`generate` would have drawn. Other arguments as for :func:`generate`."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1")
    cond = with_labels(cond, labels)
    if cond is not None and len(cond) != num_samples:
        raise ValueError(f"cond holds {len(cond)} conditions for {num_samples} samples")
    aligned = start % batch_size == 0 or start == num_samples
    if not aligned or not 0 <= start <= num_samples or (start > 0) != (generator_state is not None):
        raise ValueError(f"start={start}: give a multiple of batch_size up to {num_samples} and the state there")
    evals = sampler.num_evaluations(denoiser.diffusion) * -(-(num_samples - start) // batch_size)
    with _sampling(denoiser, perf) as (device, numerics), _progress(progress, evals, f"sampling {num_samples}") as wrap:
        generator = torch.Generator(device).manual_seed(seed)
        if generator_state is not None:
            generator.set_state(generator_state)
        inpaint = {} if x0 is None else {"x0": x0.to(device), "keep": keep.to(device)}
        for lo in range(start, num_samples, batch_size):
            n = min(batch_size, num_samples - lo)
            with numerics():
                x_T = torch.randn((n, *denoiser.sample_shape), generator=generator, device=device)
                c = None if cond is None else cond[lo : lo + n].to(device)
                x = sampler(denoiser, x_T, generator=generator, cond=c, progress=wrap, **inpaint)
                x = denoiser.decode(x).float()  # latent diffusion: z -> pixels; the identity for pixel diffusion
            yield x, generator.get_state()


def with_labels(cond: Cond | None, labels: Tensor | None) -> Cond | None:
    """``cond`` with ``labels`` added (either may be None)."""
    if labels is None:
        return cond
    return Cond(labels=labels) if cond is None else cond.replace(labels=labels)


def generate_chain(
    denoiser: nn.Module,
    sampler,
    num_samples: int,
    num_frames: int = 10,
    *,
    seed: int = 0,
    labels: Tensor | None = None,
    cond: Cond | None = None,
    perf: Mapping[str, Any] | None = None,
    progress: bool | str | Callable = False,
) -> Tensor:
    """The denoising chain of ``num_samples`` samples (one batch, seeded as :func:`generate`): [N, F, C, H, W]
    on the CPU, F = ``num_frames`` snapshots evenly spaced over the sampler's steps, x_T first and x_0 last;
    ``progress`` as for :func:`generate`."""
    evals = sampler.num_evaluations(denoiser.diffusion)
    with (
        _sampling(denoiser, perf) as (device, numerics),
        _progress(progress, evals, "denoising chain") as wrap,
        numerics(),
    ):
        generator = torch.Generator(device).manual_seed(seed)
        x_T = torch.randn((num_samples, *denoiser.sample_shape), generator=generator, device=device)
        cond = with_labels(cond, labels)
        cond = None if cond is None else cond.to(device)
        frames = sampler.chain(denoiser, x_T, num_frames, generator=generator, cond=cond, progress=wrap)
        frames = denoiser.decode(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])  # latents: each state as pixels
    return frames.float().cpu()
