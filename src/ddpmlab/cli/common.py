"""What the entry points share: config resolvers, building the denoiser from a config, friendly errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpmlab.diffusion import Denoiser, GaussianDiffusion
from ddpmlab.errors import CheckpointError, ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ddpm.div"):
        OmegaConf.register_new_resolver("ddpm.div", lambda a, b: int(a) // int(b))


register_resolvers()


def build_denoiser(cfg: DictConfig) -> Denoiser:
    """The network, the diffusion process and their contract, from the model / schedule / prediction config."""
    net = instantiate(cfg.model)
    diffusion = GaussianDiffusion(instantiate(cfg.schedule))
    return Denoiser(net, diffusion, cfg.prediction)


def user_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc`` (Hydra wraps errors raised while instantiating), if any."""
    while exc is not None:
        if isinstance(exc, ConfigError):
            return exc
        exc = exc.__cause__ or (exc.__context__ if isinstance(exc, InstantiationException) else None)
    return None


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one clear line and exit with status 2; let real bugs show their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            err = user_error(e)
            if err is None:
                raise
            print(f"ddpmlab: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ddpmlab checkpoint safely (weights_only) with a clear error for a missing or corrupt file."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unpickling refused
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from e
    if not isinstance(ckpt, dict) or "ddpmlab_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a ddpmlab training checkpoint (no ddpmlab_config / state_dict in it)")
    return ckpt


def denoiser_from_checkpoint(ckpt: dict[str, Any], ema: bool = True) -> tuple[Denoiser, DictConfig]:
    """Rebuild the denoiser from the config stored in the checkpoint and load its (EMA by default) weights.

    With EMA on, Lightning's WeightAveraging stores the average in ``state_dict`` and the raw weights in
    ``current_model_state``."""
    cfg = OmegaConf.create(ckpt["ddpmlab_config"])
    denoiser = build_denoiser(cfg)
    key = "state_dict" if ema or "current_model_state" not in ckpt else "current_model_state"
    prefix = "denoiser."
    state = {k[len(prefix):]: v for k, v in ckpt[key].items() if k.startswith(prefix)}
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit the network its config describes: {str(e)[:300]}") from e
    return denoiser.eval(), cfg


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
