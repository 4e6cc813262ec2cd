"""Stages: one declared entry per kind of run, chosen once from a config (:func:`stage_of`).

    pixel diffusion    (no ``stage`` key)             the Denoiser on images (DDPM)
    latent diffusion   (``stage: latent_diffusion``)  the Denoiser on z = s * E(x) of a frozen first stage (LDM)
    first stage        (``stage: autoencoder``)       the autoencoder latent diffusion runs on (LDM's KL / VQ-reg)
    noisy classifier   (``model: noisy_classifier``)  p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol)

Each stage says what builds its training module and its data, which network the performance levers act on and how
a training step of it is timed, what its checkpoint holds and how its model is rebuilt from a checkpoint or from an
exported folder, what an export holds, and the command its closing lines suggest next. Training, loading,
exporting and sampling dispatch through it; nothing else asks what kind a config or a module is.

An export holds the stage's whole model (``export_state``): a latent-diffusion export carries its first stage's
weights and the scale factor s beside the U-Net, and its ``config.yaml`` the first stage's architecture
(``first_stage.net``), so that ``ddpmlab.load(folder)`` needs nothing outside the folder.
"""

from __future__ import annotations

import re
import shlex
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from ddpmlab.checkpoint import (
    build_first_stage,
    check_targets,
    load_checkpoint,
    load_diffusers_autoencoder,
    load_weights,
    weights,
)
from ddpmlab.conditioning import make_task
from ddpmlab.console import sample_command
from ddpmlab.diffusion import Denoiser, GaussianDiffusion
from ddpmlab.diffusion.latent import LatentDenoiser
from ddpmlab.diffusion.parameterization import PREDICTIONS
from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.perf import training_probe
from ddpmlab.stored_config import build_checked, config_from

CLASSIFIER_TARGETS = ("ddpmlab.networks.NoisyClassifier", "ddpmlab.networks.classifier.NoisyClassifier")


class Stage:
    """One kind of run. ``key``: its value of the config's ``stage`` key; ``title``: its name in model cards and
    messages; ``prefix``: where its model's weights sit in a training checkpoint's state_dict."""

    key: str | None
    title: str
    prefix: str
    draws_samples = False  # its model is a Denoiser that sample.py and evaluate.py draw from
    pixel_space = False  # that Denoiser works on pixels: bits/dim of pixels (DDPM eq. 5) is defined, masks are

    def denoiser(self, cfg: DictConfig, net: nn.Module, diffusion: GaussianDiffusion, where: str) -> Denoiser:
        """The Denoiser contract over the network and diffusion of the config's model and schedule sections (what
        :func:`build_denoiser` returns; a latent denoiser adds its first stage)."""
        return Denoiser(net, diffusion, cfg.prediction)

    # ---- training
    def prepare(self, cfg: DictConfig) -> tuple[DictConfig, Any]:
        """Before anything is written: what the config needs from outside it (a latent run's first stage)."""
        return cfg, None

    def build_module(self, cfg: DictConfig):
        raise NotImplementedError

    def setup_data(self, cfg: DictConfig, module, datamodule, prepared: Any):
        """The data module training feeds ``module`` from (``prepared``: what :meth:`prepare` returned)."""
        return datamodule

    def check_resume(self, saved: dict, current: dict, where: str) -> None:
        """Refuse a checkpoint this run cannot continue beyond what ``lit.module.check_compatible`` compares."""

    def trained_net(self, module) -> nn.Module:
        """The network the performance levers (channels_last, compile) act on."""
        raise NotImplementedError

    def training_probe(self, module, n: int, image_shape: tuple[int, ...]):
        """(step, parameters): a forward and backward pass like one training step on ``n`` random inputs, for
        ``perf.cpu_threads=auto`` to time."""
        raise NotImplementedError

    def next_command(self, ckpt: str | Path, cfg: DictConfig | None = None) -> str:
        """The closing line that says what to do with the checkpoint the run wrote (``cfg``: the run's config)."""
        raise NotImplementedError

    # ---- loading and exporting
    def build(self, cfg: DictConfig, trusted_targets=(), where: str = "checkpoint") -> nn.Module:
        """The model a stored config describes, with random weights; every target it names checked first."""
        raise NotImplementedError

    def from_checkpoint(self, ckpt: dict, cfg: DictConfig, ema: bool = True, trusted_targets=(), where="checkpoint"):
        model = self.build(cfg, trusted_targets, where)
        load_weights(model, weights(ckpt, self.prefix, ema), where, f"the {self.title} its config describes")
        return model.eval()

    def export_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The tensors an export's model.safetensors holds: everything :meth:`load_state` needs."""
        return model.state_dict()

    def load_state(self, model: nn.Module, state: dict[str, Tensor], where: str) -> None:
        load_weights(model, state, where, f"the {self.title} config.yaml describes")

    def card_rows(self, cfg: DictConfig) -> list[str]:
        """The model card's table rows below ``stage`` and ``data``."""
        return []

    def usage(self, cfg: DictConfig) -> list[str]:
        """The model card's code lines after ``model, cfg = ddpmlab.load('<this folder>')``."""
        return []


# ---------------------------------------------------------------------------------------------- diffusion
def build_denoiser(cfg: DictConfig, trusted: bool = True, trusted_targets=(), where: str = "checkpoint") -> Denoiser:
    """The network, the diffusion process and their contract, from the model / schedule / prediction config (and,
    for latent diffusion, the first stage's ``first_stage.net``).

    ``trusted=False`` (a config read from a checkpoint): the model and schedule sections are both checked against
    ddpmlab's own targets (:func:`ddpmlab.checkpoint.check_targets`) before either is built."""
    if trusted:
        net, betas = instantiate(cfg.model), instantiate(cfg.schedule)
    else:
        model, schedule = (check_targets(cfg.get(s), s, trusted_targets, where) for s in ("model", "schedule"))
        if cfg.get("prediction") not in PREDICTIONS:
            raise CheckpointError(
                f"{where}: its stored prediction={cfg.get('prediction')!r} is not one of {', '.join(PREDICTIONS)}"
            )
        try:
            net, betas = instantiate(model), instantiate(schedule)
        except Exception as e:  # a key the class does not take, a value of the wrong type
            cause = e.__cause__ or e  # Hydra wraps what the constructor raised
            raise CheckpointError(
                f"{where}: its stored model or schedule config does not build ({type(cause).__name__}: "
                f"{str(cause)[:200]})"
            ) from e
    return stage_of(cfg, where).denoiser(cfg, net, GaussianDiffusion(betas), where)


class PixelDiffusion(Stage):
    key, title, prefix = None, "pixel diffusion", "denoiser."
    draws_samples = pixel_space = True

    def build_module(self, cfg: DictConfig):
        from ddpmlab.lit.module import DiffusionModule, optimizer_partial

        return DiffusionModule(
            denoiser=build_denoiser(cfg),
            objective=instantiate(cfg.objective),
            optimizer=optimizer_partial(cfg.optimizer),
            lr_warmup_steps=cfg.optimizer.get("lr_warmup_steps", 0),
            lr_schedule=cfg.optimizer.get("lr_schedule", "constant"),
            sampler=instantiate(cfg.sampler),
            p_uncond=cfg.p_uncond,
            seed=cfg.seed,
            config=OmegaConf.to_container(cfg, resolve=True),
            task=make_task(cfg.get("task")),
            data_channels=cfg.data.channels,
        )

    def prepare(self, cfg: DictConfig) -> tuple[DictConfig, Any]:
        return prepare_text(cfg), None

    def setup_data(self, cfg: DictConfig, module, datamodule, prepared: Any):
        if module.text:  # the captions of each split, tokenized once
            datamodule.setup("fit")
            module.set_captions(datamodule.train_set, datamodule.val_set)
        return datamodule

    def trained_net(self, module) -> nn.Module:
        return module.denoiser.net

    # ---- inpainting (RePaint)
    def image_shape(self, denoiser: Denoiser, cfg: DictConfig) -> tuple[int, int, int]:
        """(C, H, W) of the images the model completes."""
        return denoiser.sample_shape

    def known_region(self, denoiser: Denoiser, x0: Tensor, keep: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """An image x0 [1,C,H,W] and its mask keep [H,W] (1 = known) as the sampler sees them."""
        return x0, keep

    def training_probe(self, module, n: int, image_shape: tuple[int, ...]):
        return training_probe(module, n, image_shape)

    def next_command(self, ckpt: str | Path, cfg: DictConfig | None = None) -> str:
        given = " cond.index=0 num_samples=8" if cfg is not None and cfg.get("task") else ""  # its input, too
        if cfg is not None and text_encoder_of(cfg):  # a caption of its data, guided as its grids were
            given = f" {prompt_argument(example_prompt(cfg, read_data=True) or PROMPT_PLACEHOLDER)} num_samples=16"
            w = OmegaConf.select(cfg, "callbacks.sample_grid.guidance", default=None) or 3
            given += f" guidance={w:g}" if float(cfg.get("p_uncond") or 0) > 0 else ""
        return f"sample with: {sample_command(ckpt)}{given}"

    def build(self, cfg: DictConfig, trusted_targets=(), where: str = "checkpoint") -> Denoiser:
        try:
            for section in ("model", "schedule", "sampler", "data"):
                if section in cfg or section in ("model", "schedule"):
                    check_targets(cfg.get(section), section, trusted_targets, where)
        except CheckpointError:
            raise
        except Exception as e:  # an interpolation that does not resolve, a value OmegaConf cannot hold
            raise CheckpointError(f"{where}: its stored config is broken ({type(e).__name__}: {str(e)[:200]})") from e
        return build_denoiser(cfg, trusted=False, trusted_targets=trusted_targets, where=where)

    def export_state(self, model: Denoiser) -> dict[str, Tensor]:
        return model.net.state_dict()  # the network alone: the diffusion's tables follow from config.yaml

    def load_state(self, model: Denoiser, state: dict[str, Tensor], where: str) -> None:
        load_weights(model.net, state, where, "the network config.yaml describes")

    def card_rows(self, cfg: DictConfig) -> list[str]:
        m, s = cfg.model, cfg.schedule
        schedule = ", ".join(f"{k}={v}" for k, v in s.items() if k != "_target_")
        net = (
            f"{m._target_.rsplit('.', 1)[-1]}: base_channels={m.base_channels}, channel_mult={list(m.channel_mult)}, "
            f"num_res_blocks={m.num_res_blocks}, attention at {list(m.attn_resolutions)}, dropout={m.dropout}"
        )
        return [
            f"| schedule | {s._target_.rsplit('.', 1)[-1]} ({schedule}) |",
            f"| prediction, objective | {cfg.prediction}, {cfg.objective._target_.rsplit('.', 1)[-1]} |",
            f"| network | {net} |",
            f"| class-conditional | {'yes, ' + str(m.num_classes) + ' classes' if m.get('num_classes') else 'no'} |",
            *condition_rows(cfg),
            *text_rows(cfg),
        ]

    def usage(self, cfg: DictConfig) -> list[str]:
        from ddpmlab.networks.unet import image_hw

        shape = f"{cfg.model.in_channels}, {', '.join(map(str, image_hw(cfg.model.image_size)))}"
        cond, given = condition_usage(cfg) if cfg.get("task") else text_usage(cfg)
        return [
            f"x_T = torch.randn(16, {shape})",
            *cond,
            f"x0 = Sampler('ddim', num_steps=50)(denoiser, x_T{given})   # in [-1, 1]",
        ]


def prepare_text(cfg: DictConfig) -> DictConfig:
    """A text model's config completed from outside it: the learned encoder's vocabulary, built from the training
    captions (once: a resumed run rebuilds the same one and is compared with the checkpoint's), and a CLIP
    encoder's width, read from its folder's config.json."""
    text = cfg.get("text_encoder")
    if not text:
        return cfg
    if text.get("_target_", "").endswith("TransformerTextEncoder") and text.get("vocab") is None:
        from ddpmlab.text import WordTokenizer

        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        captions = getattr(datamodule.train_set, "captions", None)
        if captions is None:
            raise ConfigError(
                f"text_encoder=learned needs captions to learn from, and data={cfg.data.name} has none: use "
                "data=digit_pairs, or data=captioned_folder (a .txt caption beside each image)"
            )
        with open_dict(cfg):
            cfg.text_encoder.vocab = WordTokenizer.build_vocab(c for item in captions for c in item)
    return cfg


def condition_rows(cfg: DictConfig) -> list[str]:
    """The model card's row for an image condition (a model trained on an image task), else none."""
    task, d = cfg.get("task"), cfg.data
    if not task:
        return []
    if task.name == "sr":
        low = d.image_size // task.factor
        what = f"x{task.factor} super-resolution: the {low}x{low} low-resolution image"
    else:
        what = "inpainting: the masked image and its mask"
    return [
        f"| image condition | task={task.name}, {what}, resized to x_t's size and concatenated with it "
        f"(cond_channels={cfg.model.cond_channels}); condition dropout p_uncond={cfg.get('p_uncond', 0)} |"
    ]


def condition_usage(cfg: DictConfig) -> tuple[list[str], str]:
    """(the model card's lines that build a condition, the sampler's argument) for an image-conditioned model."""
    task, d = cfg.get("task"), cfg.data
    if not task:
        return [], ""
    if task.name == "sr":
        low = d.image_size // task.factor
        image = f"lowres = torch.zeros(16, {d.channels}, {low}, {low})   # your {low}x{low} inputs in [-1, 1]"
        build = "cond = Cond(image=lowres)"
    else:
        image = f"x, keep = torch.zeros(16, {d.channels}, {d.image_size}, {d.image_size}), torch.ones(16, 1, "
        image += f"{d.image_size}, {d.image_size})   # your images in [-1, 1], 1 = known pixel"
        build = "cond = Cond(image=torch.cat([x * keep, keep], dim=1))"
    return ["from ddpmlab.conditioning import Cond", image, build], ", cond=cond"


# ---- text
PROMPT_PLACEHOLDER = "<a caption in the words of its training captions>"


def text_encoder_of(cfg: DictConfig):
    """The text encoder's config of a model (its network's ``text_encoder``), or None for a model without text."""
    return (cfg.get("model") or {}).get("text_encoder") or None


def example_prompt(cfg: DictConfig, read_data: bool = False) -> str | None:
    """A prompt a text model of ``cfg`` knows the words of: "a 4 left of a 9" on the digit pairs (a fixed example,
    written by their own caption template); elsewhere, with ``read_data``, the canonical caption of the first
    training item (the data is read again: where it cannot be, None); else None."""
    data = cfg.get("data") or {}
    if data.get("name") == "digit_pairs":
        from ddpmlab.data.captions import pair_captions

        return pair_captions(4, 9)[0]
    if not read_data:
        return None
    try:
        datamodule = instantiate(data)
        datamodule.setup("fit")
        captions = getattr(datamodule.train_set, "captions", None)
    except (ConfigError, OSError):  # moved or deleted since training: a placeholder says what to give
        return None
    return captions[0][0] if captions else None


def prompt_argument(prompt: str) -> str:
    """``prompt=<prompt>`` as a shell and Hydra read it: plain words in double quotes for the shell alone; anything
    else (a comma would make Hydra sweep over it) quoted for Hydra, then for the shell."""
    if re.fullmatch(r"[\w ]*", prompt) and prompt.strip() == prompt:
        return f'prompt="{prompt}"'
    escaped = prompt.replace("\\", "\\\\").replace('"', '\\"')
    return shlex.quote(f'prompt="{escaped}"')


def text_rows(cfg: DictConfig) -> list[str]:
    """The model card's rows for a text-conditioned model: its encoder and where the U-Net reads it."""
    enc, m = text_encoder_of(cfg), cfg.model
    if not enc:
        return []
    if enc._target_.rsplit(".", 1)[-1] == "CLIPTextEncoder":
        context = f"{enc.max_length} tokens" if enc.get("max_length") else "the model's positions (77 for CLIP)"
        encoder = (
            f"CLIP text Transformer (Radford et al. 2021), frozen, read from {enc.path} (layer {enc.get('layer')}); "
            f"CLIP's byte-level BPE tokenizer (no word is unknown), context {context}"
        )
    else:
        encoder = (
            f"learned Transformer encoder{' pooled to one vector' if enc.get('pooled') else ''}, trained with the "
            f"U-Net: word-level vocabulary of {len(enc.vocab or [])} words (+ padding and unknown), context "
            f"{enc.max_length} words, width {enc.dim}, {enc.depth} layers of {enc.heads} heads"
        )
    if enc.get("pooled"):
        reads = "one vector (the mean over the caption) added to the time embedding; no cross-attention"
    else:
        width = m.get("context_dim") or enc.get("dim") or "the encoder's width"
        reads = (
            f"cross-attention (SpatialTransformer, LDM) at feature heights {list(m.get('context_resolutions') or [])} "
            f"and in the middle, context_dim {width}"
            f"{', a learned embedding of each position on the image tokens' if m.get('context_positions') else ''}"
        )
    return [
        f"| text encoder | {encoder} |",
        f"| text condition | {reads}; condition dropout p_uncond={cfg.get('p_uncond', 0)} (the empty caption is the "
        f"null of classifier-free guidance) |",
    ]


def text_usage(cfg: DictConfig) -> tuple[list[str], str]:
    """(the model card's lines that build a text condition and guide it, the sampler's argument), else none."""
    if not text_encoder_of(cfg):
        return [], ""
    prompt = example_prompt(cfg) or PROMPT_PLACEHOLDER
    lines = [
        "from ddpmlab.conditioning import text_cond",
        f"cond = text_cond(denoiser, [{prompt!r}] * 16)   # a caption per sample, in the words it was trained on",
    ]
    if float(cfg.get("p_uncond") or 0) > 0:
        lines = [
            "from ddpmlab.samplers import GuidedDenoiser",
            *lines,
            "denoiser = GuidedDenoiser(denoiser, 3.0)   # classifier-free guidance, w = 3, against the empty caption",
        ]
    return lines, ", cond=cond"


class LatentDiffusion(PixelDiffusion):
    """The U-Net on latents of a frozen first stage read from ``first_stage.ckpt_path``. Its checkpoint holds the
    first stage's weights (``denoiser.first_stage.*``), its architecture (``first_stage.net`` in the stored config)
    and the scale factor s (buffer ``denoiser.scale_factor``): sampling needs nothing else."""

    key, title = "latent_diffusion", "latent diffusion"
    pixel_space = False  # a bound on continuous latents says nothing in bits per pixel (LDM reports none)

    def denoiser(self, cfg: DictConfig, net: nn.Module, diffusion: GaussianDiffusion, where: str) -> LatentDenoiser:
        net_cfg = cfg.first_stage.get("net") if isinstance(cfg.get("first_stage"), DictConfig) else None
        return LatentDenoiser(net, diffusion, build_first_stage(net_cfg, where), cfg.prediction)

    def prepare(self, cfg: DictConfig) -> tuple[DictConfig, nn.Module]:
        if cfg.get("text_encoder"):
            raise ConfigError(
                "text conditioning is built for pixel diffusion: a latent run (first_stage=...) does not carry "
                "captions; drop text_encoder=..., or train on pixels"
            )
        """Read the first stage from ``first_stage.ckpt_path``, check it against the data, put its architecture
        into ``cfg.first_stage.net`` and the latent shape into ``cfg.model``."""
        from ddpmlab.data.latent import ENCODE_MODES

        path = cfg.first_stage.get("ckpt_path") if cfg.get("first_stage") else None
        if not path:
            raise ConfigError(
                "latent diffusion needs a trained first stage: first_stage.ckpt_path=<autoencoder run dir>/"
                "checkpoints/last.ckpt (train one with: python train.py experiment=autoencoder_mnist)"
            )
        if cfg.first_stage.get("encode", "auto") not in ENCODE_MODES:
            raise ConfigError(f"first_stage.encode={cfg.first_stage.encode!r}: choose one of {list(ENCODE_MODES)}")
        first_stage, net_cfg = load_first_stage(path)
        size, channels = cfg.data.image_size, cfg.data.channels
        fixed = getattr(first_stage, "image_size", None)
        if first_stage.in_channels != channels or (fixed is not None and fixed != size) or size % first_stage.factor:
            raise CheckpointError(
                f"the first stage in {path} takes {first_stage.in_channels}-channel {fixed or 'any multiple of '}"
                f"{'' if fixed else first_stage.factor}x{fixed or ''} images, but this run's data are {channels}-"
                f"channel {size}x{size}: use the data settings the autoencoder was trained with (data.image_size, "
                "data.channels)"
            )
        with open_dict(cfg):
            cfg.first_stage.net = net_cfg
            cfg.model.in_channels = first_stage.latent_channels
            cfg.model.image_size = size // first_stage.factor
        return cfg, first_stage

    def setup_data(self, cfg: DictConfig, module, datamodule, prepared: nn.Module):
        """Put the trained first stage into the module's denoiser, fit the scale factor s = 1 / std on
        ``first_stage.scale_images`` training latents (LDM; a resumed run restores the stored s instead), and wrap
        the data so that batches are latents."""
        from ddpmlab.data.latent import LatentDataModule, encode_mode, encode_split

        denoiser: LatentDenoiser = module.denoiser
        denoiser.first_stage.load_state_dict(prepared.state_dict())
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # the frozen first stage, by design
        datamodule.setup("fit")
        mean, std = encode_split(
            denoiser, datamodule.train_set, torch.device("cpu"), limit=cfg.first_stage.get("scale_images", 4096)
        )
        g = torch.Generator().manual_seed(cfg.seed)
        scale = denoiser.fit_scale_factor(mean + std * torch.randn(mean.shape, generator=g))
        mode = encode_mode(cfg, len(datamodule.train_set))
        print(
            f"latent diffusion: first stage f={prepared.factor}, latents {tuple(mean.shape[1:])}, "
            f"scale factor 1/std = {scale:.4f}, encoding {mode}",
            flush=True,
        )
        return LatentDataModule(datamodule, denoiser, mode, seed=cfg.seed, task=module.task)

    def image_shape(self, denoiser: LatentDenoiser, cfg: DictConfig) -> tuple[int, int, int]:
        d = cfg.data
        return d.channels, d.image_size, d.image_size  # the pixels its first stage decodes to

    def known_region(self, denoiser: LatentDenoiser, x0: Tensor, keep: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """RePaint on z = s E(x): the image encoded (its posterior sample seeded by ``seed``), and the mask pooled to
        latent size, where a latent is known only where every pixel of its f x f block is."""
        device = next(denoiser.parameters()).device
        with torch.no_grad():
            z0 = denoiser.encode(x0.to(device), generator=torch.Generator(device).manual_seed(seed))
        f = keep.shape[0] // denoiser.sample_shape[1]  # H // h
        return z0, -torch.nn.functional.max_pool2d(-keep[None, None].float(), f)[0, 0]

    def check_resume(self, saved: dict, current: dict, where: str) -> None:
        from ddpmlab.lit.module import _differences

        saved_fs = saved.get("first_stage")
        saved_net = saved_fs.get("net") if isinstance(saved_fs, dict) else None
        if saved_net != current["first_stage"]["net"]:  # the U-Net was trained on latents of one first stage
            diff = _differences(saved_net, current["first_stage"]["net"], "first_stage.net")
            raise CheckpointError(
                f"{where} was trained on latents of another first stage ({'; '.join(diff[:3])[:300]}); resume "
                f"with the first_stage.ckpt_path it was trained with, or start afresh in a new run directory"
            )

    def export_state(self, model: LatentDenoiser) -> dict[str, Tensor]:
        # The U-Net (net.*), the first stage (first_stage.*) and s (scale_factor); not the diffusion's tables.
        return {k: v for k, v in model.state_dict().items() if not k.startswith("diffusion.")}

    def load_state(self, model: LatentDenoiser, state: dict[str, Tensor], where: str) -> None:
        tables = {f"diffusion.{k}": v for k, v in model.diffusion.state_dict().items()}
        load_weights(model, {**state, **tables}, where, "the U-Net and first stage config.yaml describes")

    def card_rows(self, cfg: DictConfig) -> list[str]:
        net = cfg.first_stage.net
        fields = ", ".join(f"{k}={v}" for k, v in net.items() if k not in ("_target_", "config"))
        first = f"{net._target_.rsplit('.', 1)[-1]}{': ' + fields if fields else ''}"
        return [
            f"| first stage | {first} (frozen; its weights and the scale factor are in this folder) |",
            *condition_rows(cfg),
        ]

    def usage(self, cfg: DictConfig) -> list[str]:
        shape = f"{cfg.model.in_channels}, {cfg.model.image_size}, {cfg.model.image_size}"
        cond, given = condition_usage(cfg)
        return [
            f"z_T = torch.randn(16, {shape})   # latents",
            *cond,
            f"z0 = Sampler('ddim', num_steps=50)(denoiser, z_T{given})",
            "x0 = denoiser.decode(z0)   # pixels, about [-1, 1]",
        ]


# ---------------------------------------------------------------------------------------------- first stage
class FirstStage(Stage):
    """LDM's autoencoder, trained with its own module (two optimizers); its model is the autoencoder alone."""

    key, title, prefix = "autoencoder", "first stage (autoencoder)", "autoencoder."

    def build_module(self, cfg: DictConfig):
        from ddpmlab.lit.autoencoder import AutoencoderModule
        from ddpmlab.lit.module import optimizer_partial
        from ddpmlab.metrics.lpips import lpips
        from ddpmlab.networks.autoencoder import PatchDiscriminator

        # Lightning warns that manual optimisation saves the state after the step: that is the state at global_step.
        warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization")
        if cfg.trainer.get("gradient_clip_val"):
            raise ConfigError(
                "the autoencoder clips its own gradients (two optimizers, manual optimisation): set "
                "trainer.gradient_clip_val=null and first_stage.gradient_clip_val=<value> instead"
            )
        loss = cfg.first_stage.loss
        autoencoder = instantiate(cfg.first_stage.net)
        discriminator = None
        if loss.get("disc_start") is not None:
            discriminator = PatchDiscriminator(
                autoencoder.in_channels, 64, loss.get("disc_layers", 2), cfg.first_stage.net.get("num_groups", 32)
            )
        return AutoencoderModule(
            autoencoder=autoencoder,
            optimizer=optimizer_partial(cfg.optimizer),
            reconstruction=loss.reconstruction,
            reg_weight=loss.reg_weight,
            perceptual=lpips(autoencoder.in_channels) if loss.get("perceptual_weight") else None,
            perceptual_weight=loss.get("perceptual_weight") or 0.0,
            discriminator=discriminator,
            disc_start=loss.get("disc_start") or 0,
            disc_weight=loss.get("disc_weight", 0.5),
            gradient_clip_val=cfg.first_stage.get("gradient_clip_val"),
            config=OmegaConf.to_container(cfg, resolve=True),
        )

    def trained_net(self, module) -> nn.Module:
        return module.autoencoder

    def training_probe(self, module, n: int, image_shape: tuple[int, ...]):
        ae, x = module.autoencoder, torch.randn((n, *image_shape))

        def step() -> None:
            was_training = ae.training
            ae.eval()  # a VQ codebook's EMA update must not see the random probe
            try:
                ae(x)[0].square().mean().backward()
            finally:
                ae.train(was_training)

        return step, list(ae.parameters())

    def next_command(self, ckpt: str | Path, cfg: DictConfig | None = None) -> str:
        return (
            "train a latent diffusion model on it with: python train.py experiment=ldm_mnist "
            f"first_stage.ckpt_path={shlex.quote(str(ckpt))} (plus this run's data keys)"
        )

    def build(self, cfg: DictConfig, trusted_targets=(), where: str = "checkpoint") -> nn.Module:
        first_stage = cfg.get("first_stage")
        return build_first_stage(first_stage.get("net") if isinstance(first_stage, DictConfig) else None, where)

    def card_rows(self, cfg: DictConfig) -> list[str]:
        net = cfg.first_stage.net
        fields = ", ".join(f"{k}={v}" for k, v in net.items() if k != "_target_")
        return [f"| network | {net._target_.rsplit('.', 1)[-1]}: {fields} |"]

    def usage(self, cfg: DictConfig) -> list[str]:
        d = cfg.data
        return [
            f"x = torch.rand(16, {d.channels}, {d.image_size}, {d.image_size}) * 2 - 1   # images in [-1, 1]",
            "x_hat = model.decode(model.encode(x, sample=False))",
        ]


def load_first_stage(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained first stage in eval mode and its ``first_stage.net`` config, from a ddpmlab autoencoder
    checkpoint (.ckpt) or a folder in diffusers' AutoencoderKL format (config.json + safetensors weights)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return load_diffusers_autoencoder(p)
    if not p.is_file():
        raise CheckpointError(
            f"first_stage.ckpt_path={p} does not exist; pass a first-stage checkpoint "
            "(<autoencoder run dir>/checkpoints/last.ckpt) or a diffusers AutoencoderKL folder"
        )
    ckpt = load_checkpoint(p)  # its config: plain data of bounded size (ddpmlab.stored_config)
    saved = ckpt["ddpmlab_config"] if isinstance(ckpt["ddpmlab_config"], dict) else {}
    net_cfg = (saved.get("first_stage") if isinstance(saved.get("first_stage"), dict) else {}).get("net")
    stage = STAGES.get(saved.get("stage"))
    if stage is not FIRST_STAGE or not isinstance(net_cfg, dict):
        raise CheckpointError(
            f"first_stage.ckpt_path={p} is not an autoencoder checkpoint (it was written by a "
            f"{stage.title if stage else str(saved.get('stage'))[:40]} run); train a first stage with: "
            "python train.py experiment=autoencoder_mnist"
        )
    where = f"first_stage.ckpt_path={p}"
    first_stage = FIRST_STAGE.from_checkpoint(ckpt, OmegaConf.create({"first_stage": {"net": net_cfg}}), where=where)
    return first_stage, dict(net_cfg)


# ---------------------------------------------------------------------------------------------- classifier
def build_classifier(cfg: DictConfig, trusted: bool = True, where: str = "classifier.ckpt_path"):
    """(NoisyClassifier, GaussianDiffusion) from a classifier training config. The network is built by its own
    class from the config's keys, never by instantiating whatever target a file names; ``trusted=False`` (a config
    read from a checkpoint) checks the schedule's target against ddpmlab's own first."""
    from ddpmlab.networks.classifier import NoisyClassifier

    if stage_of(cfg, where) is not CLASSIFIER:
        raise CheckpointError(f"not a noisy-classifier config: model._target_ = {cfg.get('model', {}).get('_target_')}")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    if trusted:
        return NoisyClassifier(**kwargs), GaussianDiffusion(instantiate(cfg.schedule))
    net = build_checked(NoisyClassifier, kwargs, where, "model config")
    schedule = check_targets(cfg.get("schedule"), "schedule", where=where)
    try:
        return net, GaussianDiffusion(instantiate(schedule))
    except Exception as e:  # a key the schedule function does not take, a value it refuses
        cause = e.__cause__ or e
        raise CheckpointError(
            f"{where}: its stored schedule config does not build ({type(cause).__name__}: {str(cause)[:200]})"
        ) from e


def classifier_from_checkpoint(ckpt: dict[str, Any], where: str = "classifier.ckpt_path"):
    """(classifier in eval mode, its diffusion, its config) from a checkpoint of ``experiment=classifier_*``."""
    cfg = config_from(ckpt["ddpmlab_config"], where)
    if stage_of(cfg, where) is not CLASSIFIER:
        raise CheckpointError(
            "classifier.ckpt_path is not a noisy-classifier checkpoint (train one with experiment=classifier_digits); "
            f"its model is {cfg.get('model', {}).get('_target_')}"
        )
    net, diffusion = build_classifier(cfg, trusted=False, where=where)
    load_weights(net, weights(ckpt, "net."), "classifier checkpoint", "the network its config describes")
    return net.eval(), diffusion, cfg


class NoisyClassifierStage(Stage):
    """p_phi(y | x_t, t), trained on x_t ~ q(x_t | x_0); its model is the network (its diffusion follows from the
    stored schedule)."""

    key, title, prefix = None, "noisy classifier", "net."

    def build_module(self, cfg: DictConfig):
        from ddpmlab.lit.classifier import ClassifierModule
        from ddpmlab.lit.module import optimizer_partial

        net, diffusion = build_classifier(cfg)
        return ClassifierModule(
            net,
            diffusion,
            optimizer_partial(cfg.optimizer),
            seed=cfg.seed,
            config=OmegaConf.to_container(cfg, resolve=True),
        )

    def trained_net(self, module) -> nn.Module:
        return module.net

    def training_probe(self, module, n: int, image_shape: tuple[int, ...]):
        x, t = torch.randn((n, *image_shape)), torch.randint(0, module.diffusion.T, (n,))
        return lambda: module.net(x, t).logsumexp(-1).mean().backward(), list(module.net.parameters())

    def next_command(self, ckpt: str | Path, cfg: DictConfig | None = None) -> str:
        return (
            "guide a diffusion model with it: python sample.py ckpt_path=<diffusion ckpt> "
            f"classifier.ckpt_path={shlex.quote(str(ckpt))}"
        )

    def build(self, cfg: DictConfig, trusted_targets=(), where: str = "checkpoint") -> nn.Module:
        return build_classifier(cfg, trusted=False, where=where)[0]

    def card_rows(self, cfg: DictConfig) -> list[str]:
        s, m = cfg.schedule, cfg.model
        schedule = ", ".join(f"{k}={v}" for k, v in s.items() if k != "_target_")
        fields = ", ".join(f"{k}={v}" for k, v in m.items() if k != "_target_")
        return [
            f"| schedule | {s._target_.rsplit('.', 1)[-1]} ({schedule}) |",
            f"| network | NoisyClassifier: {fields} |",
        ]

    def usage(self, cfg: DictConfig) -> list[str]:
        m = cfg.model
        return [
            f"x_t = torch.randn(16, {m.in_channels}, {m.image_size}, {m.image_size})",
            "logits = model(x_t, torch.zeros(16, dtype=torch.long))   # p(y | x_t, t = 0) up to softmax",
        ]


# ---------------------------------------------------------------------------------------------- the registry
PIXEL, LATENT, FIRST_STAGE, CLASSIFIER = PixelDiffusion(), LatentDiffusion(), FirstStage(), NoisyClassifierStage()
STAGES: dict[str | None, Stage] = {s.key: s for s in (PIXEL, LATENT, FIRST_STAGE)}  # by the config's stage key


def stage_of(cfg: Mapping | DictConfig, where: str | None = None) -> Stage:
    """The stage a config (composed, or read from a file ``where``) runs: a noisy classifier by its model's target,
    the others by the ``stage`` key (absent: pixel diffusion)."""
    model = cfg.get("model")
    if isinstance(model, Mapping) and model.get("_target_") in CLASSIFIER_TARGETS:
        return CLASSIFIER
    key = cfg.get("stage")
    if key not in STAGES:
        known = ", ".join(str(k) for k in STAGES if k)
        message = (
            f"stage={str(key)[:40]!r} is not a kind of run ddpmlab knows: leave it out (pixel diffusion) or use {known}"
        )
        raise CheckpointError(f"{where}: its {message}") if where else ConfigError(message)
    return STAGES[key]


def load_model(
    ckpt: dict[str, Any], ema: bool = True, trusted_targets=(), where: str = "checkpoint"
) -> tuple[nn.Module, DictConfig, Stage]:
    """The model of a training checkpoint (in eval mode), its config and its stage."""
    cfg = config_from(ckpt.get("ddpmlab_config"), where)
    stage = stage_of(cfg, where)
    return stage.from_checkpoint(ckpt, cfg, ema, trusted_targets, where), cfg, stage
