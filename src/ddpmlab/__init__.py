"""ddpmlab: denoising diffusion probabilistic models, faithful to the papers.

``ddpmlab.load(path)`` returns a trained denoiser and its config; the rest of the public surface is in
``ddpmlab.api``. Importing the package alone pulls in neither Lightning nor Hydra."""

__version__ = "0.1.0"


def load(path, ema: bool = True, device="cpu", trusted_targets=()):
    """See :func:`ddpmlab.api.load`."""
    from ddpmlab.api import load as _load

    return _load(path, ema=ema, device=device, trusted_targets=trusted_targets)
