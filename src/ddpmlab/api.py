"""The public surface: build a denoiser or training module from a config, load one from a checkpoint.

Notebooks, benchmarks, tests and the entry points in ``ddpmlab.cli`` all come through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpmlab.config import CONFIG_DIR, register_resolvers
from ddpmlab.diffusion import Denoiser, GaussianDiffusion
from ddpmlab.diffusion.parameterization import PREDICTIONS
from ddpmlab.errors import CheckpointError
from ddpmlab.stored_config import build_checked, check_plain, config_from, read_yaml

__all__ = [
    "CONFIG_DIR",
    "REBUILDABLE",
    "build_classifier",
    "build_denoiser",
    "build_module",
    "check_finite",
    "check_targets",
    "classifier_from_checkpoint",
    "denoiser_from_checkpoint",
    "load",
    "load_checkpoint",
    "load_export",
    "pick_device",
    "rebuild",
    "register_resolvers",
]


def _rebuildable() -> dict[str, frozenset[str]]:
    """The ``_target_`` names a checkpoint's config may use, per config section: ddpmlab's own networks,
    schedules, samplers and data modules, each by its public and its defining-module path."""
    import inspect

    from ddpmlab import networks, samplers
    from ddpmlab.data import DiffusionDataModule
    from ddpmlab.diffusion import schedules

    def names(public: str, obj) -> set[str]:
        return {f"{public}.{obj.__name__}", f"{obj.__module__}.{obj.__qualname__}"}

    nets = [getattr(networks, n) for n in networks.__all__]
    nets = [c for c in nets if inspect.isclass(c) and issubclass(c, torch.nn.Module)]
    betas = [f for n, f in vars(schedules).items() if n.endswith("_betas") and inspect.isfunction(f)]
    sets = {
        "model": set().union(*(names("ddpmlab.networks", c) for c in nets)),
        "schedule": set().union(*(names("ddpmlab.diffusion.schedules", f) for f in betas)),
        "sampler": names("ddpmlab.samplers", samplers.Sampler),
        "data": names("ddpmlab.data", DiffusionDataModule),
    }
    return {k: frozenset(v) for k, v in sets.items()}


REBUILDABLE: dict[str, frozenset[str]] = {}  # section -> allowed targets, filled on first use


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def check_targets(cfg: Any, section: str, trusted_targets=(), where: str = "checkpoint") -> dict:
    """``cfg`` (the ``section`` of a config read from a file) as a plain dict, if every ``_target_`` in it, at any
    depth, is one of ddpmlab's own for that section (or in ``trusted_targets``); else a CheckpointError naming it."""
    if not REBUILDABLE:
        REBUILDABLE.update(_rebuildable())
    allowed = REBUILDABLE.get(section, frozenset()) | frozenset(trusted_targets)
    plain = _plain(cfg)
    if not isinstance(plain, dict) or "_target_" not in plain:
        raise CheckpointError(
            f"{where}: the stored config has no {section} section to rebuild (got {str(plain)[:80]!r})"
        )

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and target not in allowed:
                raise CheckpointError(
                    f"{where}: refused to build {key}._target_={str(target)[:100]!r}: a stored config may only name "
                    f"ddpmlab's own {section} targets ({', '.join(sorted(allowed))}); do not use checkpoints from "
                    f"sources you do not trust (a config of your own: ddpmlab.load(path, trusted_targets=[...]))"
                )
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and "${" in node:  # stored configs are resolved: an interpolation is smuggled in
            raise CheckpointError(
                f"{where}: refused to build {section}: {key}={node[:100]!r} is an interpolation, "
                f"which a stored config never holds"
            )

    walk(plain, section)
    return plain


def rebuild(cfg: Any, section: str, trusted_targets=(), where: str = "checkpoint", **kwargs: Any) -> Any:
    """Instantiate ``cfg``, the ``section`` (model, schedule, sampler or data) of a config read from a file, after
    :func:`check_targets` has admitted every ``_target_`` in it. Nothing else named in a file is ever called."""
    return instantiate(check_targets(cfg, section, trusted_targets, where), **kwargs)


def build_denoiser(cfg: DictConfig, trusted: bool = True, trusted_targets=(), where: str = "checkpoint") -> Denoiser:
    """The network, the diffusion process and their contract, from the model / schedule / prediction config.

    ``trusted=False`` (a config read from a checkpoint): the model and schedule sections are both checked against
    ddpmlab's own targets (:func:`check_targets`) before either is built."""
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
    if cfg.get("stage") == "latent_diffusion":  # the U-Net on latents of a frozen first stage (ddpmlab.latent)
        from ddpmlab.latent import build_latent_denoiser

        return build_latent_denoiser(cfg, net, GaussianDiffusion(betas), where)
    return Denoiser(net, GaussianDiffusion(betas), cfg.prediction)


def build_module(cfg: DictConfig):
    """The training LightningModule for ``cfg`` (the composed ``train`` config)."""
    from ddpmlab.lit.module import DiffusionModule, optimizer_partial

    if is_classifier_config(cfg):  # experiment=classifier_digits: the noisy classifier of classifier guidance
        return build_classifier_module(cfg)
    if cfg.get("stage") == "autoencoder":  # a latent-diffusion first stage
        from ddpmlab.latent import build_autoencoder_module

        return build_autoencoder_module(cfg)
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
    )


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a ddpmlab checkpoint safely (weights_only) with a clear error for a missing or corrupt file.
    ``mmap``: map the tensors instead of reading them (to inspect a large checkpoint)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}; pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated file, not a torch file, unpickling refused
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence says what broke
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or "ddpmlab_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is not a ddpmlab training checkpoint (no ddpmlab_config / state_dict in it)")
    check_plain(ckpt["ddpmlab_config"], str(p))  # every reader of a checkpoint's config comes through here
    return ckpt


def denoiser_from_checkpoint(
    ckpt: dict[str, Any], ema: bool = True, trusted_targets=(), where: str = "checkpoint"
) -> tuple[Denoiser, DictConfig]:
    """Rebuild the denoiser from the config stored in the checkpoint and load its (EMA by default) weights.

    The stored config is data, not code: its model, schedule, sampler and data sections may name only ddpmlab's
    own targets (checked, all four, before anything is built: :func:`check_targets`). With EMA on, Lightning's
    WeightAveraging stores the average in ``state_dict`` and the raw weights in ``current_model_state``."""
    cfg = config_from(ckpt.get("ddpmlab_config"), where)
    try:
        for section in ("model", "schedule", "sampler", "data"):
            if section in cfg or section in ("model", "schedule"):
                check_targets(cfg.get(section), section, trusted_targets, where)
    except CheckpointError:
        raise
    except Exception as e:  # an interpolation that does not resolve, a value OmegaConf cannot hold
        raise CheckpointError(f"{where}: its stored config is broken ({type(e).__name__}: {str(e)[:200]})") from e
    denoiser = build_denoiser(cfg, trusted=False, trusted_targets=trusted_targets, where=where)
    key = "state_dict" if ema or "current_model_state" not in ckpt else "current_model_state"
    prefix = "denoiser."
    state = {k[len(prefix) :]: v for k, v in ckpt[key].items() if k.startswith(prefix)}
    check_finite(state, where)
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"the checkpoint's weights do not fit the network its config describes: {str(e)[:300]}"
        ) from e
    return denoiser.eval(), cfg


def check_finite(weights: dict[str, Any], where: str) -> None:
    """Refuse weights that hold a NaN or an infinity (a training that diverged wrote them): a model with them samples
    blank images without a word."""
    for name, w in weights.items():
        if isinstance(w, torch.Tensor) and w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise CheckpointError(
                f"{where}: the weight {name} is not finite (NaN or inf): the training that wrote it diverged; "
                "use a checkpoint from before it"
            )


def load(
    path: str | Path, ema: bool = True, device: str | torch.device = "cpu", trusted_targets=()
) -> tuple[Denoiser, DictConfig]:
    """``denoiser, cfg = ddpmlab.load("outputs/.../checkpoints/last.ckpt")``: the (EMA) denoiser in eval mode
    on ``device``, and the config it was trained with. ``path`` may also be a folder that ``export.py`` wrote.
    ``trusted_targets``: your own classes or functions that the stored config may name besides ddpmlab's (for a
    network you trained yourself)."""
    if Path(str(path)).expanduser().is_dir():
        denoiser, cfg = load_export(path, trusted_targets=trusted_targets)
    else:
        ckpt = load_checkpoint(path)
        denoiser, cfg = denoiser_from_checkpoint(ckpt, ema=ema, trusted_targets=trusted_targets, where=str(path))
    return denoiser.to(device), cfg


WEIGHTS_FILE = "model.safetensors"


def safetensors_api():
    try:
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError("exported models are safetensors files: pip install 'ddpmlab[export]'") from e
    return safetensors.torch


def load_export(folder: str | Path, trusted_targets=()) -> tuple[Denoiser, DictConfig]:
    """The denoiser of an exported folder (config.yaml + model.safetensors), in eval mode on the CPU. The stored
    config is a file like a checkpoint's: its targets go through the same allow-list."""
    folder = Path(str(folder)).expanduser()
    weights, config = folder / WEIGHTS_FILE, folder / "config.yaml"
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(
            f"{folder} is not an exported ddpmlab model (it needs {WEIGHTS_FILE} and config.yaml); "
            "write one with: python export.py ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    cfg = read_yaml(config, str(folder))
    denoiser = build_denoiser(cfg, trusted=False, trusted_targets=trusted_targets, where=str(folder))
    load_file = safetensors_api().load_file
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors' own error: a truncated file, a header that is not JSON
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); export it again"
        ) from e
    try:
        denoiser.net.load_state_dict(state)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{weights} does not fit the network config.yaml describes: {str(e)[:300]}") from e
    check_finite(denoiser.net.state_dict(), str(weights))
    return denoiser.eval(), cfg


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------- noisy classifiers (classifier guidance)
CLASSIFIER_TARGETS = ("ddpmlab.networks.NoisyClassifier", "ddpmlab.networks.classifier.NoisyClassifier")


def is_classifier_config(cfg: DictConfig) -> bool:
    return cfg.get("model", {}).get("_target_") in CLASSIFIER_TARGETS


def build_classifier(cfg: DictConfig, trusted: bool = True, where: str = "classifier.ckpt_path"):
    """(NoisyClassifier, GaussianDiffusion) from a classifier training config. The network is built by its own
    class from the config's keys, never by instantiating whatever target a file names; ``trusted=False`` (a config
    read from a checkpoint) checks the schedule's target against ddpmlab's own first."""
    from ddpmlab.networks.classifier import NoisyClassifier

    if not is_classifier_config(cfg):
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


def build_classifier_module(cfg: DictConfig):
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


def classifier_from_checkpoint(ckpt: dict[str, Any], where: str = "classifier.ckpt_path"):
    """(classifier in eval mode, its diffusion, its config) from a checkpoint of ``experiment=classifier_*``."""
    cfg = config_from(ckpt["ddpmlab_config"], where)
    if not is_classifier_config(cfg):
        raise CheckpointError(
            "classifier.ckpt_path is not a noisy-classifier checkpoint (train one with experiment=classifier_digits); "
            f"its model is {cfg.get('model', {}).get('_target_')}"
        )
    net, diffusion = build_classifier(cfg, trusted=False, where=where)
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    check_finite(state, "classifier checkpoint")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"the classifier's weights do not fit the network its config describes: {str(e)[:300]}"
        ) from e
    return net.eval(), diffusion, cfg
