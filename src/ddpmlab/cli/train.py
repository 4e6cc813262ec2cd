"""``python train.py [overrides]``: compose the config, build the objects, fit (``ddpmlab.training.train``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpmlab.api import CONFIG_DIR
from ddpmlab.cli.common import friendly_errors
from ddpmlab.errors import ConfigError
from ddpmlab.training import train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg))


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of ``cfg.optimized_metric`` that a sweeper minimises or maximises (None when unset)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name!r} was never logged by this run (it logged {sorted(metrics)}); validate at the "
            "last step (trainer.val_check_interval=${trainer.max_steps}), or add what logs it (callbacks=fid: val/fid)"
        )
    return metrics[name]


if __name__ == "__main__":
    main()
