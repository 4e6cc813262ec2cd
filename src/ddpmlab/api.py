"""The public surface: build a denoiser or training module from a config, load one from a checkpoint or an
exported folder.

Notebooks, benchmarks, tests and the entry points in ``ddpmlab.cli`` all come through here. What differs between
kinds of run (pixel or latent diffusion, a first stage, a noisy classifier) is each one's stage
(:mod:`ddpmlab.stages`); reading files is :mod:`ddpmlab.checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ddpmlab.checkpoint import (
    REBUILDABLE,
    WEIGHTS_FILE,
    check_finite,
    check_targets,
    load_checkpoint,
    read_safetensors,
    rebuild,
    safetensors_api,
)
from ddpmlab.config import CONFIG_DIR, register_resolvers
from ddpmlab.diffusers_format import is_diffusers_folder
from ddpmlab.diffusers_format import load_folder as load_diffusers
from ddpmlab.diffusion import Denoiser
from ddpmlab.errors import CheckpointError
from ddpmlab.stages import (
    CLASSIFIER_TARGETS,
    build_classifier,
    build_denoiser,
    classifier_from_checkpoint,
    load_model,
    stage_of,
)
from ddpmlab.stored_config import config_from, read_yaml

__all__ = [
    "CLASSIFIER_TARGETS",
    "CONFIG_DIR",
    "REBUILDABLE",
    "WEIGHTS_FILE",
    "build_classifier",
    "build_denoiser",
    "build_module",
    "check_finite",
    "check_targets",
    "classifier_from_checkpoint",
    "denoiser_from_checkpoint",
    "load",
    "load_checkpoint",
    "load_denoiser",
    "load_diffusers",
    "load_export",
    "pick_device",
    "rebuild",
    "register_resolvers",
    "safetensors_api",
]


def build_module(cfg: DictConfig):
    """The training LightningModule for ``cfg`` (the composed ``train`` config), as its stage builds it."""
    return stage_of(cfg).build_module(cfg)


def denoiser_from_checkpoint(
    ckpt: dict[str, Any], ema: bool = True, trusted_targets=(), where: str = "checkpoint"
) -> tuple[Denoiser, DictConfig]:
    """Rebuild the denoiser from the config stored in the checkpoint and load its (EMA by default) weights.

    The stored config is data, not code: its model, schedule, sampler and data sections may name only ddpmlab's
    own targets (checked, all four, before anything is built: :func:`check_targets`). With EMA on, Lightning's
    WeightAveraging stores the average in ``state_dict`` and the raw weights in ``current_model_state``.
    A checkpoint of a stage that draws no samples (a first stage, a classifier) is refused."""
    cfg = config_from(ckpt.get("ddpmlab_config"), where)
    stage = stage_of(cfg, where)
    if not stage.draws_samples:
        raise CheckpointError(
            f"{where} is a {stage.title} checkpoint, not a diffusion model: pass the checkpoint of a diffusion run"
        )
    return stage.from_checkpoint(ckpt, cfg, ema, trusted_targets, where), cfg


def load(
    path: str | Path, ema: bool = True, device: str | torch.device = "cpu", trusted_targets=()
) -> tuple[nn.Module, DictConfig]:
    """``denoiser, cfg = ddpmlab.load("outputs/.../checkpoints/last.ckpt")``: the (EMA) model in eval mode on
    ``device``, and the config it was trained with. ``path`` may also be a folder that ``export.py`` wrote, or a
    DDPM in diffusers' format (a UNet2DModel and its scheduler: :mod:`ddpmlab.diffusers_format`).
    The model is the run's stage's: a Denoiser (a LatentDenoiser for latent diffusion), a first stage's
    autoencoder, or a noisy classifier. ``trusted_targets``: your own classes or functions that the stored config
    may name besides ddpmlab's (for a network you trained yourself)."""
    if is_diffusers_folder(path):
        model, cfg = load_diffusers(path, trusted_targets=trusted_targets)
    elif Path(str(path)).expanduser().is_dir():
        model, cfg = load_export(path, trusted_targets=trusted_targets)
    else:
        ckpt = load_checkpoint(path)
        model, cfg, _ = load_model(ckpt, ema=ema, trusted_targets=trusted_targets, where=str(path))
    return model.to(device), cfg


def load_export(folder: str | Path, trusted_targets=()) -> tuple[nn.Module, DictConfig]:
    """The model of an exported folder (config.yaml + model.safetensors), in eval mode on the CPU. The stored
    config is a file like a checkpoint's: its targets go through the same allow-list."""
    folder = Path(str(folder)).expanduser()
    weights, config = folder / WEIGHTS_FILE, folder / "config.yaml"
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(
            f"{folder} is not an exported ddpmlab model (it needs {WEIGHTS_FILE} and config.yaml); "
            "write one with: python export.py ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    cfg = read_yaml(config, str(folder))
    stage = stage_of(cfg, str(folder))
    model = stage.build(cfg, trusted_targets, str(folder))
    stage.load_state(model, read_safetensors(weights), str(weights))
    return model.eval(), cfg


def load_denoiser(path: str | Path, ema: bool = True) -> tuple[Denoiser, DictConfig]:
    """(the denoiser in eval mode on the CPU, its config) from a training checkpoint or a folder ``export.py`` wrote
    (whose weights are the ones it exported: ``ema`` does not apply) or a diffusers folder, as ``sample.py
    ckpt_path=`` and ``evaluate.py ckpt_path=`` take any of them."""
    if is_diffusers_folder(path):
        return load_diffusers(path)
    if not Path(str(path)).expanduser().is_dir():
        return denoiser_from_checkpoint(load_checkpoint(path), ema=ema, where=str(path))
    model, cfg = load_export(path)
    stage = stage_of(cfg, str(path))
    if not stage.draws_samples:
        raise CheckpointError(
            f"{path} holds a {stage.title}, not a diffusion model: pass the export of a diffusion run"
        )
    return model, cfg


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
