"""``python export.py ckpt_path=...``: the weights a user shares, without the training state. The folder holds
``model.safetensors`` (the model's EMA weights, as its stage says: for latent diffusion the U-Net, the first stage
and the scale factor; safetensors executes nothing when read), ``config.yaml`` (the resolved training config, which
rebuilds the model) and ``README.md`` (a model card naming the stage); ``ddpmlab.load(folder)`` reads it as it
reads the checkpoint, with nothing outside the folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ddpmlab.api import CONFIG_DIR, WEIGHTS_FILE, load_checkpoint, safetensors_api
from ddpmlab.cli.common import friendly_errors
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_dir
from ddpmlab.networks.unet import image_hw
from ddpmlab.stages import Stage, load_model

EXPORT_FILES = (WEIGHTS_FILE, "config.yaml", "README.md")


def export(ckpt_path: str | Path, out_dir: str | Path | None = None, use_ema: bool = True) -> Path:
    """Write the export folder ``out_dir`` (default ``<run dir>/export``) whole: the files go to a temporary folder
    beside it, which then takes its place in one step, so a kill or an error mid-write leaves the previous export
    as it was."""
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    model, cfg, stage = load_model(ckpt, ema=use_ema, where=str(ckpt_path))
    run_dir = ckpt_path.resolve().parent.parent
    out = Path(out_dir) if out_dir else run_dir / "export"
    check_replaceable(out)
    state = {k: v.detach().contiguous() for k, v in stage.export_state(model).items()}
    metadata = {
        "format": "ddpmlab",
        "stage": stage.title,
        "weights": "ema" if use_ema else "raw",
        "step": str(ckpt.get("global_step", "")),
    }
    final = run_dir / "final_metrics.json"
    metrics = json.loads(final.read_text()) if final.is_file() else {}
    params = sum(v.numel() for v in state.values())
    with atomic_dir(out) as tmp:
        safetensors_api().save_file(state, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (tmp / "README.md").write_text(model_card(cfg, stage, ckpt.get("global_step"), params, metrics, use_ema))
    return out


def check_replaceable(out: Path) -> None:
    """An export replaces the whole folder: refuse one that holds anything an export does not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={out} is a file, not a folder; give a new or empty folder for the export")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"out_dir={out} holds files an export does not write ({shown}); an export replaces the whole folder, so "
            f"give a new or empty folder"
        )


def model_card(
    cfg: DictConfig, stage: Stage, step: int | None, params: int, metrics: dict[str, Any], use_ema: bool
) -> str:
    d = cfg.data
    shown = {k: v for k, v in metrics.items() if k != "step" and not k.startswith("train/loss_q")}
    what = "A denoising diffusion model (DDPM, Ho et al. 2020)" if stage.draws_samples else f"A {stage.title}"
    lines = [
        "# ddpmlab model",
        "",
        f"{what} trained with ddpmlab: {params:,} parameters, "
        f"{'EMA' if use_ema else 'raw'} weights after {step} training steps.",
        "",
        "| | |",
        "|---|---|",
        f"| stage | {stage.title} |",
        f"| data | {d.name} ({d.channels} x {' x '.join(map(str, image_hw(d.image_size)))}), batch {d.batch_size} |",
        *stage.card_rows(cfg),
        f"| training | {step} steps, {cfg.optimizer._target_.rsplit('.', 1)[-1]} lr {cfg.optimizer.lr}, "
        f"EMA decay {cfg.ema.decay if cfg.get('ema') else 'none'}, seed {cfg.seed} |",
    ]
    if shown:
        lines += ["", "Final metrics of the training run:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(shown.items())]
    name = "denoiser" if stage.draws_samples else "model"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import torch, ddpmlab",
        *(["from ddpmlab.samplers import Sampler"] if stage.draws_samples else []),
        f"{name}, cfg = ddpmlab.load('<this folder>')",
        *stage.usage(cfg),
        "```",
        "",
        f"Files: `model.safetensors` (the {stage.title}'s weights), `config.yaml` (the resolved training config).",
        "",
    ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@friendly_errors
def main(cfg: DictConfig) -> None:
    out = export(cfg.ckpt_path, cfg.out_dir, cfg.use_ema)
    print(f"exported to {out}")
    print(f"load with: ddpmlab.load({str(out)!r})")


if __name__ == "__main__":
    main()
