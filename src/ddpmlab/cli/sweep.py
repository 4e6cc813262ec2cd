"""The summary of a Hydra multirun: one row per job with its overrides and final metrics.

Every training job writes ``<job dir>/final_metrics.json``; when the sweep ends (with any launcher, local or
submitit), this Hydra callback collects them into ``<sweep dir>/summary.csv`` and prints a table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job directory that has final metrics: job number, overrides, then the metrics."""
    rows = []
    by_job_number = lambda p: (len(p.parent.name), p.parent.name)
    for metrics_file in sorted(Path(sweep_dir).glob("*/final_metrics.json"), key=by_job_number):
        job = metrics_file.parent
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        rows.append({"job": job.name, "overrides": " ".join(overrides), **json.loads(metrics_file.read_text())})
    return rows


def write_summary(sweep_dir: str | Path) -> Path | None:
    rows = collect(sweep_dir)
    if not rows:
        return None
    keys = list(dict.fromkeys(k for row in rows for k in row))
    path = Path(sweep_dir) / "summary.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    shown = [k for k in keys if k in ("job", "overrides", "step") or k.startswith("val/")]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    table = [shown] + [[fmt(row.get(k, "")) for k in shown] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(shown))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table))
    print(f"sweep summary: {path}")
    return path


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(config.hydra.sweep.dir)
