"""``python train.py [overrides]``: compose the config, build the objects, fit (``ddpmlab.training.train``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpmlab.api import CONFIG_DIR
from ddpmlab.cli.common import friendly_errors
from ddpmlab.training import train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
