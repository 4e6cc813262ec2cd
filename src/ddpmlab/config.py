"""Where the shipped Hydra configs live, and the resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ddpm.div"):
        OmegaConf.register_new_resolver("ddpm.div", lambda a, b: int(a) // int(b))
    if not OmegaConf.has_resolver("ddpm.add"):
        OmegaConf.register_new_resolver("ddpm.add", lambda a, b: int(a) + int(b))
    if not OmegaConf.has_resolver("ddpm.sweep_group"):  # the sweep directory in a multirun, else null
        OmegaConf.register_new_resolver(
            "ddpm.sweep_group", lambda mode, sweep_dir: str(sweep_dir) if "MULTIRUN" in str(mode) else None
        )


register_resolvers()
