"""diffusers' format for DDPMs, both ways: a ddpmlab pixel-diffusion model written as a folder that
``diffusers.DDPMPipeline.from_pretrained`` (and ``DDIMPipeline``) loads, and a ``UNet2DModel`` + scheduler folder read
into a ddpmlab :class:`~ddpmlab.diffusion.Denoiser`, so that every ddpmlab sampler and metric runs on it.

The folder (diffusers' pipeline layout)::

    model_index.json                          {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                          UNet2DModel's config
    unet/diffusion_pytorch_model.safetensors  its weights, diffusers' names
    scheduler/scheduler_config.json           DDPMScheduler's config: the betas, prediction, variance, clipping
    README.md                                 the model card
    ddpmlab_config.yaml                       (written by ddpmlab) the training config: data, objective, sampler

A folder with the UNet's ``config.json`` and weights at its root and ``scheduler_config.json`` beside them (the
layout of early diffusers conversions) is read too. Nothing here imports diffusers or runs code from the folder:
the configs are JSON, checked key by key against what ddpmlab's U-Net can express; the weights are safetensors, or
a ``.bin`` pickle read with ``torch.load(weights_only=True)`` (tensors only, anything else refused).

The two networks are the same architecture (DDPM, Ho et al. 2020, Appendix B); the conventions in which
implementations of it differ are options of ddpmlab's U-Net (``freq_shift``, ``flip_sin_to_cos``, ``norm_eps``,
``downsample_padding``, ``num_head_channels``), so a converted network computes what it computed there. Weights
map one to one, except attention: diffusers' separate to_q / to_k / to_v linears are ddpmlab's one 1x1 ``qkv``
convolution (stacked in that order, :class:`~ddpmlab.networks.layers.SelfAttention`), its to_out the 1x1 ``proj``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.networks.unet import image_hw

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_PICKLE = "diffusion_pytorch_model.bin"
DDPMLAB_CONFIG = "ddpmlab_config.yaml"
DIFFUSERS_VERSION = "0.30.0"  # the format written: every key below exists in diffusers since this version
UNET_TARGET = "ddpmlab.networks.UNet"
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

# UNet2DModel's keys and their defaults in diffusers (a key a config leaves out takes these, as diffusers does).
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# The discrete schedulers' keys (DDPMScheduler's, which DDIMScheduler and the others share) and their defaults.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
# diffusers' beta_schedule name -> (ddpmlab's schedule function, fixed arguments it must have to be the same)
BETA_SCHEDULES = {
    "linear": ("linear_betas", {}),
    "scaled_linear": ("quadratic_betas", {}),
    "squaredcos_cap_v2": ("cosine_betas", {"s": 0.008, "max_beta": 0.999}),
    "sigmoid": ("sigmoid_betas", {"steepness": 6.0}),
}
VARIANCE_TYPES = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large"}
SPACINGS = ("leading", "trailing", "linspace")  # the grids both libraries build alike


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder in diffusers' layout (a pipeline with unet/, or a UNet2DModel's own folder)."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and (
        (p / "model_index.json").is_file()
        or (p / "unet" / "config.json").is_file()
        or ((p / "config.json").is_file() and (p / "scheduler_config.json").is_file())
    )


# ---------------------------------------------------------------------------------------------- the network
def _level_heights(height: int, levels: int) -> list[int]:
    return [height // 2**i for i in range(levels)]


def unet_config(model: Mapping[str, Any], where: str = "the model") -> dict[str, Any]:
    """UNet2DModel's config.json for ddpmlab's U-Net config ``model`` (its ``model`` section, resolved)."""
    m = dict(model)
    refused = []
    if m.get("_target_", "").rsplit(".", 1)[-1] != "UNet":
        refused.append(f"model._target_={m.get('_target_')} (only ddpmlab's UNet has a diffusers equivalent)")
    if int(m.get("cond_channels") or 0):
        refused.append(
            f"model.cond_channels={m['cond_channels']}: an image-conditioned U-Net (super-resolution, inpainting) "
            "takes the condition concatenated with x_t, which no diffusers pipeline for UNet2DModel feeds it"
        )
    if m.get("text_encoder"):
        refused.append(
            "model.text_encoder: a text-conditioned U-Net needs diffusers' UNet2DConditionModel and its text "
            "encoder, not UNet2DModel"
        )
    if refused:
        raise ConfigError(f"{where} cannot be written in diffusers' format: " + "; ".join(refused))
    C = int(m["in_channels"])
    base, mult = int(m["base_channels"]), [int(k) for k in m["channel_mult"]]
    channels = [base * k for k in mult]
    height = image_hw(m["image_size"])[0]
    attn = [r in [int(a) for a in m.get("attn_resolutions") or []] for r in _level_heights(height, len(mult))]
    head_channels = m.get("num_head_channels")
    num_heads = int(m.get("num_heads") or 1)
    if head_channels:
        head_dim = int(head_channels)
    elif num_heads == 1:
        head_dim = None  # diffusers: one head of all the block's channels
    else:  # diffusers fixes the channels per head; ddpmlab's fixed head count maps where every attention is as wide
        widths = {c for c, a in zip(channels, attn, strict=True) if a} | {channels[-1]}
        if len(widths) > 1:
            raise ConfigError(
                f"{where} cannot be written in diffusers' format: model.num_heads={num_heads} at attention widths "
                f"{sorted(widths)} gives heads of different sizes, and diffusers' attention_head_dim is one size "
                "for all (train with model.num_head_channels instead)"
            )
        head_dim = widths.pop() // num_heads
    size = m["image_size"]
    out = int(m.get("out_channels") or C) * (2 if m.get("learn_sigma") else 1)  # iDDPM: the variance's channels
    classes = m.get("num_classes")
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size if isinstance(size, int) else list(image_hw(size)),
        "in_channels": C,
        "out_channels": out,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": _number(m.get("freq_shift", 0.0)),
        "flip_sin_to_cos": bool(m.get("flip_sin_to_cos", False)),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels,
        "layers_per_block": int(m["num_res_blocks"]),
        "mid_block_scale_factor": 1,
        "downsample_padding": int(m.get("downsample_padding", 1)),
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(m.get("dropout") or 0.0),
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": int(m.get("num_groups", 32)),
        "attn_norm_num_groups": int(m.get("num_groups", 32)),  # the middle attention's GroupNorm, as the others'
        "norm_eps": float(m.get("norm_eps", 1e-6)),
        "resnet_time_scale_shift": "scale_shift" if m.get("use_scale_shift_norm") else "default",
        "add_attention": True,
        "class_embed_type": None,
        # ddpmlab's label embedding has a row more than the classes: the learned null label of classifier-free
        # guidance (Ho & Salimans 2022), label num_classes
        "num_class_embeds": int(classes) + 1 if classes else None,
        "num_train_timesteps": None,
    }


def _number(x: Any) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def unet_from_config(config: Mapping[str, Any], where: str, null_label: bool = False) -> dict[str, Any]:
    """ddpmlab's U-Net config (its ``model`` section) for UNet2DModel's ``config``; every key ddpmlab's U-Net cannot
    express is named in one ConfigError. ``null_label``: the class embedding's last row is a classifier-free
    guidance null label (a folder ddpmlab wrote says so)."""
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        why = {
            "UNet2DConditionModel": "a U-Net conditioned on a text encoder's tokens (Stable Diffusion's), not DDPM's",
            "UNet1DModel": "a 1-D U-Net",
        }.get(cls, "not the DDPM family's UNet2DModel")
        raise ConfigError(f"{where}: a diffusers {str(cls)[:60]} ({why}); ddpmlab reads UNet2DModel")
    unknown = sorted(k for k in config if not str(k).startswith("_") and k not in UNET_DEFAULTS)
    c = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if k in UNET_DEFAULTS}}
    problems = [f"{k}={config[k]!r} (a key this converter does not know)" for k in unknown]

    def need(key: str, ok: bool, why: str) -> None:
        if not ok:
            problems.append(f"{key}={c[key]!r} ({why})")

    need("center_input_sample", not c["center_input_sample"], "ddpmlab's U-Net takes x_t in [-1, 1] as it is")
    need("time_embedding_type", c["time_embedding_type"] == "positional", "only the sinusoidal embedding")
    need("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", "only UNetMidBlock2D")
    need("add_attention", bool(c["add_attention"]), "ddpmlab's middle block always attends")
    need("mid_block_scale_factor", c["mid_block_scale_factor"] == 1, "ddpmlab's blocks do not rescale their output")
    need("downsample_type", c["downsample_type"] == "conv", "only the strided convolution")
    need("upsample_type", c["upsample_type"] == "conv", "only nearest upsampling and a convolution")
    need("act_fn", c["act_fn"] in ("silu", "swish"), "only SiLU")
    need("class_embed_type", c["class_embed_type"] is None, "only a class embedding table (num_class_embeds)")
    need("downsample_padding", c["downsample_padding"] in (0, 1), "0 or 1")
    need("resnet_time_scale_shift", c["resnet_time_scale_shift"] in ("default", "scale_shift"), "default or AdaGN")
    need("norm_num_groups", isinstance(c["norm_num_groups"], int), "a number of groups")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    need("down_block_types", set(down) <= {"DownBlock2D", "AttnDownBlock2D"}, "DownBlock2D or AttnDownBlock2D")
    need("up_block_types", set(up) <= {"UpBlock2D", "AttnUpBlock2D"}, "UpBlock2D or AttnUpBlock2D")
    attn = [b == "AttnDownBlock2D" for b in down]
    need(
        "up_block_types",
        [b == "AttnUpBlock2D" for b in reversed(up)] == attn,
        f"ddpmlab attends on the way up where it attends on the way down ({down})",
    )
    channels = [int(n) for n in c["block_out_channels"]]
    base = channels[0]
    need("block_out_channels", all(n % base == 0 for n in channels), "each a multiple of the first")
    need("time_embedding_dim", c["time_embedding_dim"] in (None, 4 * base), f"4 x {base}, ddpmlab's")
    need("sample_size", c["sample_size"] is not None, "the image size is needed")
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    groups = c["norm_num_groups"]
    need(
        "attn_norm_num_groups",
        c["attn_norm_num_groups"] in ((groups,) if scale_shift else (None, groups)),
        "the middle attention normalises with norm_num_groups groups in ddpmlab"
        + (" (with scale_shift, diffusers leaves it without a GroupNorm unless it is set)" if scale_shift else ""),
    )
    head_dim = c["attention_head_dim"]
    widths = [n for n, a in zip(channels, attn, strict=False) if a] + [channels[-1]]
    if head_dim is not None:
        need("attention_head_dim", all(w % int(head_dim) == 0 for w in widths), f"must divide every width {widths}")
    classes = c["num_class_embeds"]
    if classes is not None and not null_label:
        problems.append(
            f"num_class_embeds={classes} (ddpmlab's class-conditional U-Net keeps a learned null label for "
            "classifier-free guidance in its last row; this UNet2DModel was not written with one)"
        )
    in_ch, out_ch = int(c["in_channels"]), int(c["out_channels"])
    need("out_channels", out_ch in (in_ch, 2 * in_ch), f"in_channels={in_ch}, or twice that with a learned variance")
    if problems:
        raise ConfigError(f"{where}: this UNet2DModel has no ddpmlab equivalent: " + "; ".join(problems))
    size = c["sample_size"]
    height = image_hw(size if isinstance(size, int) else list(size))[0]
    return {
        "_target_": UNET_TARGET,
        "in_channels": in_ch,
        "out_channels": None,
        "image_size": size if isinstance(size, int) else list(size),
        "base_channels": base,
        "channel_mult": [n // base for n in channels],
        "num_res_blocks": int(c["layers_per_block"]),
        "attn_resolutions": [r for r, a in zip(_level_heights(height, len(channels)), attn, strict=True) if a],
        "dropout": float(c["dropout"]),
        "num_heads": 1,
        "num_groups": int(groups),
        "num_classes": int(classes) - 1 if classes is not None else None,
        "learn_sigma": out_ch == 2 * in_ch,
        "use_scale_shift_norm": scale_shift,
        "cond_channels": 0,
        "freq_shift": _number(c["freq_shift"]),
        "flip_sin_to_cos": bool(c["flip_sin_to_cos"]),
        "norm_eps": float(c["norm_eps"]),
        "downsample_padding": int(c["downsample_padding"]),
        "num_head_channels": None if head_dim is None else int(head_dim),
    }


def _tensor_map(model: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """ddpmlab module prefix -> (diffusers module prefix, kind) for the U-Net config ``model``; kind is ``same``
    (the same tensors), ``resnet`` (two renamed) or ``attention`` (qkv / proj against to_q, to_k, to_v, to_out.0)."""
    levels, n = len(model["channel_mult"]), int(model["num_res_blocks"])
    height = image_hw(model["image_size"])[0]
    attn = [r in [int(a) for a in model.get("attn_resolutions") or []] for r in _level_heights(height, levels)]
    pairs = {
        "time_embed.mlp.0": ("time_embedding.linear_1", "same"),
        "time_embed.mlp.2": ("time_embedding.linear_2", "same"),
        "label_embed": ("class_embedding", "same"),
        "conv_in": ("conv_in", "same"),
        "mid.0": ("mid_block.resnets.0", "resnet"),
        "mid.1": ("mid_block.attentions.0", "attention"),
        "mid.2": ("mid_block.resnets.1", "resnet"),
        "norm_out": ("conv_norm_out", "same"),
        "conv_out": ("conv_out", "same"),
    }
    k = 0
    for i in range(levels):
        for j in range(n):
            pairs[f"down.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", "resnet")
            if attn[i]:
                pairs[f"down.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", "attention")
            k += 1
        if i != levels - 1:
            pairs[f"down.{k}.0"] = (f"down_blocks.{i}.downsamplers.0", "same")
            k += 1
    k = 0
    for u, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            pairs[f"up.{k}.0"] = (f"up_blocks.{u}.resnets.{j}", "resnet")
            if attn[level]:
                pairs[f"up.{k}.1"] = (f"up_blocks.{u}.attentions.{j}", "attention")
            if level and j == n:
                pairs[f"up.{k}.{2 if attn[level] else 1}"] = (f"up_blocks.{u}.upsamplers.0", "same")
            k += 1
    return pairs


RESNET_NAMES = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut"}  # ddpmlab -> diffusers; the rest alike
ATTENTION_NAMES = {"norm": "group_norm", "proj": "to_out.0"}
# diffusers' attention before 0.14 (and the checkpoints converted then): query / key / value / proj_attn
DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _split(key: str, pairs: dict[str, tuple[str, str]]) -> tuple[str, str, str, str]:
    """(ddpmlab prefix, diffusers prefix, kind, the rest) of a ddpmlab tensor name."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in pairs:
            theirs, kind = pairs[prefix]
            return prefix, theirs, kind, ".".join(parts[cut:])
    raise KeyError(key)


def to_diffusers_state(state: Mapping[str, Tensor], model: Mapping[str, Any]) -> dict[str, Tensor]:
    """UNet2DModel's state dict (diffusers' names and shapes) for ddpmlab U-Net weights ``state`` of config
    ``model``."""
    pairs, out = _tensor_map(model), {}
    for key, value in state.items():
        _, theirs, kind, rest = _split(key, pairs)
        name, _, leaf = rest.rpartition(".")
        if kind == "resnet":
            out[f"{theirs}.{RESNET_NAMES.get(name, name)}.{leaf}"] = value
        elif kind == "attention" and name == "qkv":  # [3C, C, 1, 1] -> to_q, to_k, to_v [C, C]
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"{theirs}.{part}.{leaf}"] = chunk.flatten(1) if leaf == "weight" else chunk
        elif kind == "attention":
            out[f"{theirs}.{ATTENTION_NAMES[name]}.{leaf}"] = value.flatten(1) if value.ndim == 4 else value
        else:
            out[f"{theirs}.{rest}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers_state(
    theirs: Mapping[str, Tensor], target: Mapping[str, Tensor], model: Mapping[str, Any], where: str
) -> dict[str, Tensor]:
    """ddpmlab's state dict (the keys and shapes of ``target``, a freshly built U-Net's) from UNet2DModel weights
    ``theirs``; a tensor missing, left over or of another shape is a CheckpointError naming it."""
    theirs = {_modern(k): v for k, v in theirs.items()}
    pairs, out, used = _tensor_map(model), {}, set()

    def take(name: str) -> Tensor:
        if name not in theirs:
            raise CheckpointError(f"{where}: the weights have no {name}, which its config.json's network needs")
        used.add(name)
        return theirs[name]

    for key, ref in target.items():
        _, prefix, kind, rest = _split(key, pairs)
        name, _, leaf = rest.rpartition(".")
        if kind == "resnet":
            value = take(f"{prefix}.{RESNET_NAMES.get(name, name)}.{leaf}")
        elif kind == "attention" and name == "qkv":
            value = torch.cat([take(f"{prefix}.{p}.{leaf}") for p in ("to_q", "to_k", "to_v")])
        elif kind == "attention":
            value = take(f"{prefix}.{ATTENTION_NAMES[name]}.{leaf}")
        else:
            value = take(f"{prefix}.{rest}")
        if value.numel() != ref.numel():
            raise CheckpointError(
                f"{where}: {key} needs {tuple(ref.shape)} but the weights give {tuple(value.shape)}: the weights do "
                "not fit their config.json"
            )
        out[key] = value.reshape(ref.shape).to(ref.dtype)
    left = sorted(set(theirs) - used)
    if left:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        raise CheckpointError(f"{where}: weights the network of its config.json has no place for: {shown}")
    return out


def _modern(key: str) -> str:
    """A tensor name of diffusers' deprecated attention (``.query.weight``) in today's names (``.to_q.weight``)."""
    if ".attentions." not in key:
        return key
    head, name, leaf = key.rsplit(".", 2)
    return f"{head}.{DEPRECATED_ATTENTION.get(name, name)}.{leaf}"


# ---------------------------------------------------------------------------------------------- the schedule
def scheduler_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """DDPMScheduler's scheduler_config.json for a ddpmlab training config: its betas (by name where diffusers has
    the same schedule, else listed in trained_betas), prediction, variance and x0 clipping (of its sampler)."""
    from ddpmlab.diffusion import schedules

    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    schedule = dict(cfg["schedule"])
    name = schedule.pop("_target_").rsplit(".", 1)[-1]
    zero_snr = bool(schedule.pop("zero_terminal_snr", False))
    T = len(getattr(schedules, name)(**schedule))
    scale = 1000.0 / T  # ddpmlab's beta_start / beta_end are for T = 1000 (improved-diffusion's convention)
    named = {fn: key for key, (fn, _) in BETA_SCHEDULES.items()}
    fixed = BETA_SCHEDULES[named[name]][1] if name in named else {}
    betas: dict[str, Any] = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "trained_betas": None}
    if name in named and all(schedule.get(k, v) == v for k, v in fixed.items()):
        betas["beta_schedule"] = named[name]
        if name != "cosine_betas":  # (diffusers' cosine has no beta_start / beta_end)
            start, end = schedule.get("beta_start", 1e-4), schedule.get("beta_end", 0.02)
            betas.update(beta_start=scale * start, beta_end=scale * end)
    else:  # any other schedule, given one beta at a time (before the zero-SNR rescale, which diffusers redoes)
        betas["trained_betas"] = [float(b) for b in getattr(schedules, name)(**schedule)]
    sampler = cfg.get("sampler") or {}
    learned = bool((cfg.get("model") or {}).get("learn_sigma"))
    variance = sampler.get("variance", "auto") if sampler.get("algorithm", "ddpm") == "ddpm" else "auto"
    spacing = sampler.get("spacing", "leading")
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": T,
        **betas,
        "variance_type": "learned_range" if learned else ("fixed_large" if variance == "large" else "fixed_small"),
        "clip_sample": bool(sampler.get("clip_x0", True)),
        "clip_sample_range": 1.0,
        "prediction_type": PREDICTION_TYPES[cfg.get("prediction", "eps")],
        "thresholding": False,
        "timestep_spacing": spacing if spacing in SPACINGS else "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": zero_snr,
    }


def schedule_from_config(config: Mapping[str, Any], where: str) -> tuple[dict, str, dict]:
    """(ddpmlab's schedule section, prediction, sampler section) for a diffusers scheduler config; what ddpmlab
    cannot reproduce (dynamic thresholding, another clipping range, a variance it does not have) is refused."""
    c = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not str(k).startswith("_")}}
    cls = str(config.get("_class_name", "DDPMScheduler"))
    problems = []
    if c["thresholding"]:
        problems.append("thresholding=true (dynamic thresholding, Imagen's; ddpmlab clips x0 to [-1, 1])")
    if c["clip_sample"] and float(c["clip_sample_range"]) != 1.0:
        problems.append(f"clip_sample_range={c['clip_sample_range']} (ddpmlab clips x0 to [-1, 1])")
    predictions = {v: k for k, v in PREDICTION_TYPES.items()}
    if c["prediction_type"] not in predictions:
        problems.append(f"prediction_type={c['prediction_type']!r} (one of {', '.join(predictions)})")
    if c["variance_type"] not in (*VARIANCE_TYPES, "learned_range"):
        problems.append(
            f"variance_type={c['variance_type']!r} (ddpmlab has fixed_small, fixed_large and learned_range, iDDPM's)"
        )
    T = int(c["num_train_timesteps"])
    if c["trained_betas"] is not None:
        betas = [float(b) for b in c["trained_betas"]]
        schedule = {"_target_": "ddpmlab.diffusion.schedules.listed_betas", "betas": betas}
    elif c["beta_schedule"] in BETA_SCHEDULES:
        fn, fixed = BETA_SCHEDULES[c["beta_schedule"]]
        schedule = {"_target_": f"ddpmlab.diffusion.schedules.{fn}", "num_timesteps": T, **fixed}
        if fn != "cosine_betas":  # ddpmlab's beta_start / beta_end are for T = 1000, scaled by 1000 / T
            schedule.update(beta_start=float(c["beta_start"]) * T / 1000, beta_end=float(c["beta_end"]) * T / 1000)
    else:
        problems.append(f"beta_schedule={c['beta_schedule']!r} (one of {', '.join(BETA_SCHEDULES)} or trained_betas)")
    if problems:
        raise ConfigError(f"{where}: this {cls[:60]} has no ddpmlab equivalent: " + "; ".join(problems))
    schedule["zero_terminal_snr"] = bool(c["rescale_betas_zero_snr"])
    spacing = c["timestep_spacing"] if c["timestep_spacing"] in SPACINGS else "leading"
    clip = bool(c["clip_sample"])
    if cls == "DDIMScheduler":
        sampler = {"_target_": "ddpmlab.samplers.Sampler", "algorithm": "ddim", "num_steps": 50, "spacing": spacing,
                   "eta": 0.0, "clip_x0": clip}  # fmt: skip
    else:
        variance = "auto" if c["variance_type"] == "learned_range" else VARIANCE_TYPES[c["variance_type"]]
        sampler = {"_target_": "ddpmlab.samplers.Sampler", "algorithm": "ddpm", "num_steps": None, "spacing": spacing,
                   "variance": variance, "clip_x0": clip}  # fmt: skip
    return schedule, predictions[c["prediction_type"]], sampler


# ---------------------------------------------------------------------------------------------- folders
def _read_json(path: Path, where: str) -> dict[str, Any]:
    from ddpmlab.stored_config import check_plain, read_text

    try:
        config = json.loads(read_text(path, where))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:200]})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a diffusers config (a JSON {type(config).__name__}, not an object)")
    check_plain(config, where, path.name)
    return config


def _unet_weights(unet_dir: Path, where: str) -> dict[str, Tensor]:
    """The UNet's weights: safetensors, or else a .bin pickle read as tensors only (never anything it asks for)."""
    from ddpmlab.checkpoint import read_safetensors
    from ddpmlab.pretrained import read_state_dict

    if (unet_dir / UNET_WEIGHTS).is_file():
        return read_safetensors(unet_dir / UNET_WEIGHTS, "download it again")
    if (unet_dir / UNET_PICKLE).is_file():
        return read_state_dict(unet_dir / UNET_PICKLE, "UNet2DModel weights", CheckpointError)
    raise CheckpointError(f"{where}: no {UNET_WEIGHTS} (or {UNET_PICKLE}) in {unet_dir}")


def read_folder(folder: str | Path) -> tuple[DictConfig, dict[str, Tensor]]:
    """(a ddpmlab config for the DDPM in the diffusers folder, its UNet2DModel weights in diffusers' names).

    The network, betas, prediction, variance and clipping come from the folder's config.json and
    scheduler_config.json. What diffusers has no key for (the data, the training) comes from ddpmlab_config.yaml
    where ddpmlab wrote the folder; a folder from elsewhere gets a data section that names no dataset (evaluate.py
    data=<name> gives it one)."""
    from ddpmlab.stored_config import read_yaml

    folder = Path(str(folder)).expanduser()
    where = str(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(f"{where}: a diffusers pipeline folder needs unet/config.json (none here)")
    scheduler_file = next(
        (p for p in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json") if p.is_file()),
        None,
    )
    if scheduler_file is None:
        raise CheckpointError(
            f"{where}: no scheduler/scheduler_config.json: the betas, prediction and variance of the model are "
            "written there, and a U-Net alone does not say them"
        )
    stored = read_yaml(folder / DDPMLAB_CONFIG, where) if (folder / DDPMLAB_CONFIG).is_file() else None
    unet = _read_json(unet_dir / "config.json", where)
    null_label = stored is not None and bool((stored.get("model") or {}).get("num_classes"))
    model = unet_from_config(unet, f"{unet_dir / 'config.json'}", null_label=null_label)
    scheduler = _read_json(scheduler_file, where)
    schedule, prediction, sampler = schedule_from_config(scheduler, str(scheduler_file))
    learned = scheduler.get("variance_type") == "learned_range"
    if model["learn_sigma"] != learned:
        raise ConfigError(
            f"{where}: the U-Net gives {unet.get('out_channels')} channels for {unet.get('in_channels')} in, but "
            f"the scheduler's variance_type is {'learned_range' if learned else 'fixed'}: a learned variance "
            "(twice the channels) goes with learned_range, a fixed one with the same channels"
        )
    if stored is not None:
        cfg = OmegaConf.create(OmegaConf.to_container(stored, resolve=True))
        if cfg.get("stage") is not None:
            raise CheckpointError(f"{where}: its {DDPMLAB_CONFIG} is of stage={cfg.stage}; a diffusers folder holds "
                                  "a pixel-diffusion model")  # fmt: skip
        if _public(scheduler_config(cfg)) == _public(scheduler):
            schedule = OmegaConf.to_container(cfg.schedule)  # the same betas, as ddpmlab wrote them: exactly
        cfg.model, cfg.schedule, cfg.prediction = model, schedule, prediction
        cfg.sampler = cfg.get("sampler") or sampler
    else:
        cfg = OmegaConf.create({
            "model": model, "schedule": schedule, "prediction": prediction, "sampler": sampler,
            "data": {"_target_": "ddpmlab.data.DiffusionDataModule", "name": None, "channels": model["in_channels"],
                     "image_size": model["image_size"]},
            "p_uncond": 0.0,
        })  # fmt: skip
    return cfg, _unet_weights(unet_dir, where)


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


def load_folder(folder: str | Path, trusted_targets=()):
    """(the Denoiser of the diffusers folder in eval mode on the CPU, its ddpmlab config)."""
    from ddpmlab.checkpoint import load_weights
    from ddpmlab.stages import stage_of

    cfg, theirs = read_folder(folder)
    where = str(folder)
    denoiser = stage_of(cfg, where).build(cfg, trusted_targets, where)
    state = from_diffusers_state(theirs, denoiser.net.state_dict(), cfg.model, where)
    load_weights(denoiser.net, state, where, "the UNet its config.json describes")
    return denoiser.eval(), cfg


def write_folder(out: Path, cfg: DictConfig, state: Mapping[str, Tensor], card: str) -> None:
    """Write the diffusers folder of a pixel-diffusion model (``cfg`` its training config, ``state`` its U-Net's
    weights) into the empty folder ``out``."""
    from ddpmlab.checkpoint import safetensors_api

    unet = unet_config(cfg.model, "this model")
    scheduler = scheduler_config(cfg)
    (out / "unet").mkdir()
    (out / "scheduler").mkdir()
    (out / "unet" / "config.json").write_text(json.dumps(unet, indent=2) + "\n")
    tensors = to_diffusers_state(state, OmegaConf.to_container(cfg.model, resolve=True))
    safetensors_api().save_file(tensors, str(out / "unet" / UNET_WEIGHTS), metadata={"format": "pt"})
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / DDPMLAB_CONFIG).write_text(OmegaConf.to_yaml(cfg))
    (out / "README.md").write_text(card)
