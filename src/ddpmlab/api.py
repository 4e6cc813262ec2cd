"""The public surface: build a denoiser or training module from a config, load one from a checkpoint.

Notebooks, benchmarks, tests and the entry points in ``ddpmlab.cli`` all come through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpmlab.config import CONFIG_DIR, register_resolvers
from ddpmlab.diffusion import Denoiser, GaussianDiffusion
from ddpmlab.errors import CheckpointError

__all__ = [
    "CONFIG_DIR",
    "build_denoiser",
    "build_module",
    "denoiser_from_checkpoint",
    "load",
    "load_checkpoint",
    "load_export",
    "pick_device",
    "register_resolvers",
]


def build_denoiser(cfg: DictConfig) -> Denoiser:
    """The network, the diffusion process and their contract, from the model / schedule / prediction config."""
    net = instantiate(cfg.model)
    diffusion = GaussianDiffusion(instantiate(cfg.schedule))
    return Denoiser(net, diffusion, cfg.prediction)


def build_module(cfg: DictConfig):
    """The training LightningModule for ``cfg`` (the composed ``train`` config)."""
    from ddpmlab.lit.module import DiffusionModule

    return DiffusionModule(
        denoiser=build_denoiser(cfg),
        objective=instantiate(cfg.objective),
        optimizer=instantiate(cfg.optimizer),
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_schedule=cfg.get("lr_schedule", "constant"),
        sampler=instantiate(cfg.sampler),
        p_uncond=cfg.p_uncond,
        seed=cfg.seed,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ddpmlab checkpoint safely (weights_only) with a clear error for a missing or corrupt file."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unpickling refused
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {first})") from e
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
        raise CheckpointError(
            f"the checkpoint's weights do not fit the network its config describes: {str(e)[:300]}"
        ) from e
    return denoiser.eval(), cfg


def load(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[Denoiser, DictConfig]:
    """``denoiser, cfg = ddpmlab.load("outputs/.../checkpoints/last.ckpt")``: the (EMA) denoiser in eval mode
    on ``device``, and the config it was trained with. ``path`` may also be a folder that ``export.py`` wrote."""
    if Path(str(path)).expanduser().is_dir():
        denoiser, cfg = load_export(path)
    else:
        denoiser, cfg = denoiser_from_checkpoint(load_checkpoint(path), ema=ema)
    return denoiser.to(device), cfg


WEIGHTS_FILE = "model.safetensors"


def safetensors_api():
    try:
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError("exported models are safetensors files: pip install 'ddpmlab[export]'") from e
    return safetensors.torch


def load_export(folder: str | Path) -> tuple[Denoiser, DictConfig]:
    """The denoiser of an exported folder (config.yaml + model.safetensors), in eval mode on the CPU."""
    folder = Path(str(folder)).expanduser()
    weights, config = folder / WEIGHTS_FILE, folder / "config.yaml"
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(f"{folder} is not an exported ddpmlab model (it needs {WEIGHTS_FILE} and config.yaml); "
                              "write one with: python export.py ckpt_path=<run dir>/checkpoints/last.ckpt")
    cfg = OmegaConf.load(config)
    denoiser = build_denoiser(cfg)
    try:
        denoiser.net.load_state_dict(safetensors_api().load_file(str(weights)))
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights} does not fit the network config.yaml describes: {str(e)[:300]}") from e
    return denoiser.eval(), cfg


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
