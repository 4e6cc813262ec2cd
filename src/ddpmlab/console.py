"""The console around a run: the composed config as a tree at the start, upstream warnings filtered, and a
closing summary (final metrics, the checkpoint, the command to sample from it)."""

from __future__ import annotations

import re
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# Raised by the libraries underneath on every run, whatever the config: nothing a user can act on.
UPSTREAM_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper on torch >= 2.9
    r".*Consider setting `persistent_workers=True`",
    r".*does not have many workers which may be a bottleneck",
)
# Raised because of ddpmlab's own choices, and wrong for them: Lightning logs by global step, so an epoch
# of fewer batches than log_every_n_steps (the 12 batches of the digits) still logs on schedule.
FALSE_ALARMS = (r".*is smaller than the logging interval Trainer\(log_every_n_steps",)

TREE_ORDER = (
    "data",
    "model",
    "schedule",
    "objective",
    "sampler",
    "optimizer",
    "ema",
    "trainer",
    "callbacks",
    "logger",
    "perf",
    "paths",
    "extras",
)


def apply_extras(cfg: DictConfig, run_dir: str | Path | None = None) -> None:
    """Warning filters and the config tree, as ``cfg.extras`` asks (missing extras: the defaults)."""
    extras = cfg.get("extras") or {}
    for pattern in FALSE_ALARMS:
        warnings.filterwarnings("ignore", message=pattern)
    if run_dir is not None and not (Path(run_dir) / "metrics.csv").exists():
        # The CSV logger writes into the Hydra run directory, which already holds .hydra/: no log is lost there.
        warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty")
    if extras.get("ignore_warnings", True):
        for pattern in UPSTREAM_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
    if extras.get("print_config", False) and rank_zero_only.rank == 0:  # once, not once per DDP rank
        print_config_tree(cfg)


def print_config_tree(cfg: DictConfig, file: Any = None) -> None:
    """The resolved config as a tree: one branch per group, in the order a reader wants them."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    groups = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER and k != "hydra"]
    top = {}
    for key in groups:
        value = cfg[key]
        if isinstance(value, DictConfig):
            text = OmegaConf.to_yaml(value, resolve=True).rstrip() or "{}"
            tree.add(key).add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            top[key] = value
    if top:
        text = OmegaConf.to_yaml(OmegaConf.create(top), resolve=True).rstrip()
        tree.add("top level").add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    Console(file=file or sys.stdout, soft_wrap=True).print(tree)


def sample_command(ckpt_path: str | Path) -> str:
    return f"python sample.py ckpt_path={shlex.quote(str(ckpt_path))}"


def final_summary(
    step: int,
    seconds: float,
    metrics: dict[str, float],
    ckpt_path: str | Path | None,
    next_command: Callable[[str | Path], str] | None = None,
) -> str:
    """The closing lines of a run: steps and time, final metrics, the checkpoint and the next command, which
    depends on what was trained (``next_command(ckpt_path)``: its stage's, ``ddpmlab.stages``; by default the
    sampling command of a diffusion model)."""
    from ddpmlab.progress import format_seconds

    shown = {k: v for k, v in metrics.items() if re.match(r"(train|val)/(loss|fid|kid|is|bpd|psnr|ssim|acc)$", k)}
    lines = [
        f"trained {step} steps in {format_seconds(seconds)}"
        + ("" if not shown else ": " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    ]
    if ckpt_path:
        lines.append(f"checkpoint: {ckpt_path}")
        lines.append(next_command(ckpt_path) if next_command else f"sample with: {sample_command(ckpt_path)}")
    return "\n".join(lines)
