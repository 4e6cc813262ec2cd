"""Shared fixtures: compose the real Hydra configs exactly as the CLI does, with tiny fast overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ddpmlab.api import CONFIG_DIR
from ddpmlab.diffusion import GaussianDiffusion, linear_betas

REPO = Path(__file__).resolve().parents[1]

# A run that trains in a few seconds on the CPU through the real train(cfg) path.
TINY = [
    "model=unet_tiny",
    "schedule.num_timesteps=50",
    "data.batch_size=32",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.checkpoint.every_n_train_steps=3",
    "callbacks.sample_grid.every_n_steps=3",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.num_steps=5",
]

# The noisy classifier of classifier guidance, as small and fast.
TINY_CLASSIFIER = [
    "experiment=classifier_digits", "schedule.num_timesteps=50", "data.batch_size=32", "trainer.max_steps=4",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "model.base_channels=16", "model.channel_mult=[1,2]",
    "model.num_res_blocks=1", "model.attn_resolutions=[]", "model.num_groups=8", "model.num_heads=1",
]  # fmt: skip


def fid_tiny(feature_target: str, *extra: str) -> list[str]:
    """callbacks=fid on a few samples, with a tiny feature network (``feature_target``) in place of Inception."""
    return [
        "callbacks=fid",
        f"+callbacks.fid.feature._target_={feature_target}",
        "callbacks.fid.every_n_steps=3",
        "callbacks.fid.num_samples=8",
        "callbacks.fid.batch_size=4",
        "callbacks.fid.num_steps=2",
        "callbacks.fid.num_real=200",
        *extra,
    ]


def tiny_denoiser(
    T: int = 50, *, num_classes: int | None = None, prediction: str = "eps", seed: int = 0, cond_channels: int = 0
):
    """A small random U-Net denoiser on 8x8 grey images (initialised from ``seed``; ``cond_channels``: conditioned
    on an image of that many channels), in eval mode: the tests that need a real network but no training share it."""
    from ddpmlab.diffusion import Denoiser
    from ddpmlab.networks import UNet

    torch.manual_seed(seed)
    net = UNet(
        in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
        dropout=0.0, num_groups=8, num_classes=num_classes, cond_channels=cond_channels,
    )  # fmt: skip
    return Denoiser(net, GaussianDiffusion(linear_betas(T)), prediction).eval()


# The tests' networks are tiny: one thread beats OpenMP's fork/join by far (3-10x where the cores are shared),
# here and in the CLI subprocesses the tests start (they inherit OMP_NUM_THREADS).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides; set the Hydra runtime so ${hydra:...} resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def train_cfg(tmp_path):
    """The default training config made tiny, writing into tmp_path/run."""

    def make(*extra: str, run_dir: Path | None = None) -> DictConfig:
        return compose_cfg("train", TINY + list(extra), run_dir or tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """One tiny trained checkpoint (digits, unet_tiny, T = 50, 6 steps, EMA) for every test that only reads one.
    Tests must not write next to it: give outputs their own tmp_path."""
    from ddpmlab.training import train

    run = tmp_path_factory.mktemp("tiny_run")
    train(compose_cfg("train", TINY, run))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def diffusion() -> GaussianDiffusion:
    """DDPM's process: linear betas 1e-4 .. 0.02, T = 1000 (read-only: its tables are shared)."""
    return GaussianDiffusion(linear_betas(1000))


@pytest.fixture
def generator():
    """``generator(seed)``: a fresh CPU torch.Generator seeded with ``seed`` (default 0)."""
    return lambda seed=0: torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def oracle():
    """The Gaussian oracle of the sampler tests (sampler_helpers.make_oracle)."""
    from sampler_helpers import make_oracle

    return make_oracle()


def run_cli(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a root script (train.py, sample.py, ...) as a user would, in a subprocess."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
