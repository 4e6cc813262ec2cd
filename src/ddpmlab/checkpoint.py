"""Reading and checking what training wrote: checkpoints (``torch.load(weights_only=True)``), exported folders'
safetensors weights, the ``_target_`` allow-list of a stored config, and first-stage autoencoders (a ddpmlab
first stage from its stored config, or a diffusers ``AutoencoderKL`` folder).

Low level: this module imports the errors, the stored-config bounds and the networks, nothing above them (the
stages decide what each kind of checkpoint holds and call these)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ddpmlab.errors import CheckpointError
from ddpmlab.networks.autoencoder import Autoencoder, DiffusersAutoencoderKL
from ddpmlab.stored_config import build_checked, check_plain, read_text

WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------- files
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


def weights(ckpt: dict[str, Any], prefix: str, ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (``denoiser.``, ``net.``, ``autoencoder.``) of a checkpoint, the prefix cut.
    With EMA on, Lightning's WeightAveraging stores the average in ``state_dict`` and the raw weights in
    ``current_model_state``; ``ema=False`` reads the raw ones where there are any."""
    key = "state_dict" if ema or "current_model_state" not in ckpt else "current_model_state"
    return {k[len(prefix) :]: v for k, v in ckpt[key].items() if k.startswith(prefix)}


def check_finite(weights: dict[str, Any], where: str) -> None:
    """Refuse weights that hold a NaN or an infinity (a training that diverged wrote them): a model with them samples
    blank images without a word."""
    for name, w in weights.items():
        if isinstance(w, torch.Tensor) and w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise CheckpointError(
                f"{where}: the weight {name} is not finite (NaN or inf): the training that wrote it diverged; "
                "use a checkpoint from before it"
            )


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """``module.load_state_dict(state)`` after :func:`check_finite`; weights that do not fit are a CheckpointError."""
    check_finite(state, where)
    try:
        module.load_state_dict(state)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{where}: the weights do not fit {what}: {str(e)[:300]}") from e


def safetensors_api():
    try:
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError("exported models are safetensors files: pip install 'ddpmlab[export]'") from e
    return safetensors.torch


def read_safetensors(path: Path, again: str = "export it again") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (safetensors executes nothing when read)."""
    try:
        return safetensors_api().load_file(str(path))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own error: a truncated file, a header that is not JSON
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); {again}"
        ) from e


# ---------------------------------------------------------------------------------------------- allow-list
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


# ---------------------------------------------------------------------------------------------- first stages
# The only classes a stored first_stage.net config may build (nothing read from a file picks a class freely).
# ddpmlab.latent.DiffusersAutoencoderKL: where the class lived before, as checkpoints written then name it.
FIRST_STAGES = {
    "ddpmlab.networks.autoencoder.Autoencoder": Autoencoder,
    "ddpmlab.networks.autoencoder.DiffusersAutoencoderKL": DiffusersAutoencoderKL,
    "ddpmlab.latent.DiffusersAutoencoderKL": DiffusersAutoencoderKL,
}


def build_first_stage(net_cfg: DictConfig | dict | None, where: str = "checkpoint") -> nn.Module:
    """The first stage's architecture (random weights) from its ``first_stage.net`` config, as stored in the
    checkpoint or folder ``where``: a key its class does not take is a CheckpointError, not a TypeError."""
    spec = OmegaConf.to_container(net_cfg, resolve=True) if isinstance(net_cfg, DictConfig) else net_cfg
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: its first_stage.net is not a config (a {type(spec).__name__})")
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if target not in FIRST_STAGES:
        raise CheckpointError(
            f"{where}: first_stage.net._target_={str(target)[:100]!r} is not a first stage; one of "
            f"{sorted(FIRST_STAGES)}"
        )
    return build_checked(FIRST_STAGES[target], spec, where, "first_stage.net config")


def load_diffusers_autoencoder(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """diffusers' AutoencoderKL from a local folder: its config.json and safetensors weights only (pickled .bin
    weights could run code when read)."""
    cfg_file, weights_file = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise CheckpointError(
            f"first_stage.ckpt_path={folder} is a folder but not a diffusers AutoencoderKL: it needs config.json and "
            "diffusion_pytorch_model.safetensors (e.g. the vae/ folder of a Stable Diffusion download)"
        )
    where = f"first_stage.ckpt_path={folder}"
    try:
        config = json.loads(read_text(cfg_file, where))
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; nesting deeper than json allows
        raise CheckpointError(f"{cfg_file} is not valid JSON ({str(e)[:200]}); download the VAE folder again") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file} is not a diffusers config (a JSON {type(config).__name__}, not an object)")
    check_plain(config, where, "config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{folder} holds a diffusers {str(config['_class_name'])[:60]}, not an AutoencoderKL")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not str(k).startswith("_")}
    first_stage = build_checked(DiffusersAutoencoderKL, {"config": config}, where, "config.json")
    state = read_safetensors(weights_file, "download it again")
    try:
        first_stage.vae.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_file}: the weights do not fit its config.json: {str(e)[:200]}") from e
    return first_stage.eval(), {"_target_": "ddpmlab.networks.autoencoder.DiffusersAutoencoderKL", "config": config}
