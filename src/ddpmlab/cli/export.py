"""``python export.py ckpt_path=... [format=ddpmlab|diffusers]``: the weights a user shares, without the training
state.

``format=ddpmlab`` (the default) writes ``model.safetensors`` (the model's EMA weights, as its stage says: for latent
diffusion the U-Net, the first stage and the scale factor; safetensors executes nothing when read), ``config.yaml``
(the resolved training config, which rebuilds the model) and ``README.md`` (a model card naming the stage);
``ddpmlab.load(folder)`` reads it as it reads the checkpoint, with nothing outside the folder.

``format=diffusers`` writes a pixel-diffusion model as the folder ``diffusers.DDPMPipeline.from_pretrained`` (and
``DDIMPipeline``) loads: ``unet/`` (UNet2DModel), ``scheduler/`` (DDPMScheduler), ``model_index.json``, the model card
and ``ddpmlab_config.yaml`` (:mod:`ddpmlab.diffusers_format`); ``ddpmlab.load`` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ddpmlab.api import CONFIG_DIR, WEIGHTS_FILE, load_checkpoint, safetensors_api
from ddpmlab.cli.common import friendly_errors
from ddpmlab.diffusers_format import DDPMLAB_CONFIG, scheduler_config, unet_config, write_folder
from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_dir
from ddpmlab.networks.unet import image_hw
from ddpmlab.stages import Stage, load_model

EXPORT_FILES = {
    "ddpmlab": (WEIGHTS_FILE, "config.yaml", "README.md"),
    "diffusers": ("unet", "scheduler", "model_index.json", "README.md", DDPMLAB_CONFIG),
}


def export(
    ckpt_path: str | Path, out_dir: str | Path | None = None, use_ema: bool = True, format: str = "ddpmlab"
) -> Path:
    """Write the export folder ``out_dir`` (default ``<run dir>/export``, ``<run dir>/export_diffusers`` for
    ``format=diffusers``) whole: the files go to a temporary folder beside it, which then takes its place in one
    step, so a kill or an error mid-write leaves the previous export as it was."""
    if format not in EXPORT_FILES:
        raise ConfigError(f"format={format!r}: choose ddpmlab (ddpmlab.load reads it) or diffusers (DDPMPipeline)")
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    model, cfg, stage = load_model(ckpt, ema=use_ema, where=str(ckpt_path))
    run_dir = ckpt_path.resolve().parent.parent
    out = Path(out_dir) if out_dir else run_dir / ("export" if format == "ddpmlab" else "export_diffusers")
    check_replaceable(out, EXPORT_FILES[format])
    if format == "diffusers":
        return export_diffusers(ckpt_path, ckpt, model, cfg, stage, out, use_ema)
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


def export_diffusers(
    ckpt_path: Path, ckpt: dict, model, cfg: DictConfig, stage: Stage, out: Path, use_ema: bool
) -> Path:
    """The diffusers folder of a pixel-diffusion model; anything diffusers' DDPM pipelines cannot run is refused
    before a file is written."""
    if not stage.draws_samples:
        raise ConfigError(f"{ckpt_path} is a {stage.title}, not a diffusion model: diffusers' DDPM format holds one")
    if not stage.pixel_space:
        raise ConfigError(
            f"{ckpt_path} is latent diffusion: its U-Net draws latents that only its first stage decodes, and "
            "diffusers' latent pipelines need that autoencoder in their own classes (a VQModel for LDMPipeline), "
            "which ddpmlab's first stages are not; export it with format=ddpmlab"
        )
    unet_config(cfg.model, str(ckpt_path))  # refuses, with the reason, a network diffusers has no class for
    state = {k: v.detach().contiguous() for k, v in model.net.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    card = diffusers_card(cfg, stage, ckpt.get("global_step"), params, use_ema)
    with atomic_dir(out) as tmp:
        write_folder(tmp, cfg, state, card)
    return out


def diffusers_card(cfg: DictConfig, stage: Stage, step: int | None, params: int, use_ema: bool) -> str:
    """The model card of a diffusers export: its tags, what the model is, and how diffusers and ddpmlab run it."""
    T = int(scheduler_config(cfg)["num_train_timesteps"])
    classes = cfg.model.get("num_classes")
    notes = []
    if classes:
        notes.append(
            f"Class-conditional: the UNet takes `class_labels` 0..{classes - 1}; label {classes} is the learned null "
            "label of classifier-free guidance. DDPMPipeline passes no labels: call the UNet with them (or sample "
            "with ddpmlab, `labels=` and `guidance=`)."
        )
    if cfg.model.get("learn_sigma"):
        notes.append(
            "Learned variances (iDDPM): the UNet's second half of channels is the variance's interpolation, which "
            "DDPMScheduler reads (variance_type learned_range); DDIMScheduler does not, so use DDPMPipeline."
        )
    lines = [
        "---",
        "library_name: diffusers",
        "tags:",
        "- pytorch",
        "- diffusers",
        "- unconditional-image-generation",
        "- ddpmlab",
        "---",
        "",
        "# ddpmlab model (diffusers format)",
        "",
        f"A denoising diffusion model (DDPM, Ho et al. 2020) trained with ddpmlab: {params:,} parameters, "
        f"{'EMA' if use_ema else 'raw'} weights after {step} training steps, as diffusers' `UNet2DModel` and "
        "`DDPMScheduler`.",
        "",
        *card_table(cfg, stage, step),
        *(["", *notes] if notes else []),
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DDIMPipeline, DDPMPipeline",
        f"images = DDPMPipeline.from_pretrained('<this folder>')(batch_size=16, num_inference_steps={T}).images",
        "images = DDIMPipeline.from_pretrained('<this folder>')(batch_size=16, num_inference_steps=50, eta=0.0,",
        "                                                         use_clipped_model_output=True).images",
        "```",
        "",
        "`use_clipped_model_output=True` re-derives eps from the clipped x0 prediction, as ddpmlab's samplers do.",
        "With ddpmlab (every sampler, guidance, bits/dim, FID):",
        "",
        "```python",
        "import ddpmlab",
        "denoiser, cfg = ddpmlab.load('<this folder>')",
        "```",
        "",
        "Files: `unet/` (config.json, diffusion_pytorch_model.safetensors), `scheduler/scheduler_config.json`, "
        f"`model_index.json`, `{DDPMLAB_CONFIG}` (the training config ddpmlab reads back; diffusers does not).",
        "",
    ]
    return "\n".join(lines)


def check_replaceable(out: Path, files: tuple[str, ...] = EXPORT_FILES["ddpmlab"]) -> None:
    """An export replaces the whole folder: refuse one that holds anything an export does not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={out} is a file, not a folder; give a new or empty folder for the export")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in files) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"out_dir={out} holds files an export does not write ({shown}); an export replaces the whole folder, so "
            f"give a new or empty folder"
        )


def card_table(cfg: DictConfig, stage: Stage, step: int | None) -> list[str]:
    """The model card's table: the stage, the data, the stage's own rows, the training."""
    d = cfg.data
    return [
        "| | |",
        "|---|---|",
        f"| stage | {stage.title} |",
        f"| data | {d.name} ({d.channels} x {' x '.join(map(str, image_hw(d.image_size)))}), batch {d.batch_size} |",
        *stage.card_rows(cfg),
        f"| training | {step} steps, {cfg.optimizer._target_.rsplit('.', 1)[-1]} lr {cfg.optimizer.lr}, "
        f"EMA decay {cfg.ema.decay if cfg.get('ema') else 'none'}, seed {cfg.seed} |",
    ]


def model_card(
    cfg: DictConfig, stage: Stage, step: int | None, params: int, metrics: dict[str, Any], use_ema: bool
) -> str:
    shown = {k: v for k, v in metrics.items() if k != "step" and not k.startswith("train/loss_q")}
    what = "A denoising diffusion model (DDPM, Ho et al. 2020)" if stage.draws_samples else f"A {stage.title}"
    lines = [
        "# ddpmlab model",
        "",
        f"{what} trained with ddpmlab: {params:,} parameters, "
        f"{'EMA' if use_ema else 'raw'} weights after {step} training steps.",
        "",
        *card_table(cfg, stage, step),
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
    out = export(cfg.ckpt_path, cfg.out_dir, cfg.use_ema, cfg.get("format", "ddpmlab"))
    print(f"exported to {out}")
    print(f"load with: ddpmlab.load({str(out)!r})")


if __name__ == "__main__":
    main()
