"""``python train.py [overrides]``: compose the config, build the objects, fit (``ddpmlab.training.train``)."""

from __future__ import annotations

import importlib.util
import sys

import hydra
from omegaconf import DictConfig

from ddpmlab.api import CONFIG_DIR
from ddpmlab.cli.common import friendly_errors
from ddpmlab.errors import ConfigError
from ddpmlab.training import train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@friendly_errors
def run(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg))


def main() -> None:
    try:
        check_sweeper(sys.argv[1:])
    except ConfigError as e:  # Hydra would fail composing the config, before any of ours runs, with 10 lines
        print(f"ddpmlab: error: {e}", file=sys.stderr)
        sys.exit(2)
    run()


def check_sweeper(args: list[str]) -> None:
    """Refuse ``hparams_search=...`` (Hydra's Optuna sweeper) where the optional sweeper is not installed."""
    searches = [a for a in args if a.lstrip("+").startswith("hparams_search=") and not a.endswith(("=null", "="))]
    if searches and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise ConfigError(
            f"{searches[0]} runs Hydra's Optuna sweeper, an optional extra that is not installed: "
            "pip install -e '.[optuna]' (or pip install 'ddpmlab[optuna]')"
        )


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
