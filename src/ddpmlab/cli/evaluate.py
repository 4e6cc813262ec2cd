"""``python evaluate.py ckpt_path=... [metrics=[bpd,fid,inpaint,guided]] [batch_size=B] [seed=S]``: metrics.json.

Each metric is a function ``(ctx: EvalContext, options: DictConfig) -> dict`` registered in
``ddpmlab.evaluation.METRICS``; the config's ``metrics`` list picks which run, each reads its own config section of
the same name, and its result is stored under that name in metrics.json (beside ``checkpoint``, which says what
was evaluated).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddpmlab.api import CONFIG_DIR
from ddpmlab.cli.common import friendly_errors
from ddpmlab.evaluation import METRICS, EvalContext, evaluate

__all__ = ["METRICS", "EvalContext", "evaluate", "main"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = HydraConfig.get().runtime.output_dir
    evaluate(cfg, out)
    print(Path(out) / "metrics.json")


if __name__ == "__main__":
    main()
