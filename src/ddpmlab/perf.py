"""GPU performance levers, applied to a built module before ``trainer.fit`` and to a denoiser before
sampling. Each is a switch in ``conf/perf/``: ``auto`` turns it on where it pays (a CUDA device) and off
elsewhere, so the CPU path stays the plain fp32 eager one; ``true`` / ``false`` force it.

- ``compile``: ``net.compile()`` in place (``nn.Module.compile``), so ``state_dict`` keys stay clean (no
  ``_orig_mod.``) and checkpoints load into an uncompiled network. A deep copy (the EMA callback's) is not
  compiled: it runs its own weights eagerly. Inductor generates GroupNorm + SiLU (+ the time-embedding add)
  as one fused kernel, so there is no hand-written fused GroupNorm+SiLU.
- ``channels_last``: NHWC weights; cuDNN then runs every convolution in its fast tensor-core layout.
- ``fused_optimizer``: ``fused=True`` for an optimizer that has it (Adam, AdamW, SGD) when its config leaves
  ``fused`` unset: one kernel for the whole update instead of a dozen foreach passes.
- ``tf32``: TF32 tensor cores for the matmuls and convolutions that stay fp32.
- ``sync_free_logging``: ``train/loss`` leaves the progress bar, which reads it with ``.item()`` (a host sync)
  every step; the loggers still get it every ``trainer.log_every_n_steps``.

Elsewhere: bf16 autocast is the trainer's precision (``trainer=gpu_fast``); the data module's GPU-resident
path is ``data.on_device``; EMA updates are foreach and sync-free (``ddpmlab.lit.ema``); attention goes
through SDPA (``ddpmlab.networks.layers``).

Sampling (``perf.sampling``, shared by ``sample.py``, ``evaluate.py`` and the training callbacks) has its own
switches: ``compile`` (with CUDA graphs: ``compile_mode`` defaults to ``reduce-overhead`` on a GPU),
``channels_last``, ``tf32`` and ``precision`` (``bf16`` autocast for the network; ``auto``: bf16 on a GPU, fp32 on
the CPU). ``ddpmlab.samplers.generate`` applies them (:func:`sampling_levers`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from ddpmlab.errors import ConfigError

SWITCHES = ("compile", "channels_last", "fused_optimizer", "tf32", "sync_free_logging")
OPTIONS = ("compile_mode", "compile_backend")
SAMPLING_SWITCHES = ("compile", "channels_last", "tf32")
SAMPLING_OPTIONS = OPTIONS + ("precision",)
PRECISIONS = ("fp32", "bf16")


def resolve(name: str, value: Any, on_gpu: bool) -> bool:
    """A lever's switch (true, false or "auto") -> whether it is on for this device."""
    if value == "auto":
        return on_gpu
    if isinstance(value, bool):
        return value
    raise ConfigError(f"perf.{name}={value!r}: use true, false or auto (on for a CUDA device only)")


def _check_keys(perf: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(perf) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown perf setting(s) {unknown}; the levers are {list(allowed)}")


def use_tf32() -> None:
    torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
    torch.backends.cudnn.allow_tf32 = True  # and convolutions


def to_channels_last(net: nn.Module) -> None:
    # The weights alone decide: cuDNN runs a convolution in NHWC when its input or its weight is NHWC.
    net.to(memory_format=torch.channels_last)


def compile_in_place(net: nn.Module, mode: str | None = None, backend: str = "inductor") -> None:
    """``net.compile()``: the module keeps its identity and parameter names (checkpoints stay clean)."""
    net.compile(mode=mode, backend=backend)


def with_fused(optimizer_factory: Callable[..., torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer partial with ``fused=True`` when its class has a fused kernel and the config left it unset."""
    if not isinstance(optimizer_factory, functools.partial):
        return optimizer_factory
    if "fused" not in inspect.signature(optimizer_factory.func).parameters:
        return optimizer_factory
    if optimizer_factory.keywords.get("fused") is not None:  # the config decided
        return optimizer_factory
    return functools.partial(optimizer_factory, fused=True)


def apply_perf(module, device: torch.device | str, perf: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Apply the training levers in ``perf`` (the ``perf`` config) to a built DiffusionModule that will train on
    ``device``; return what is on. Call before ``trainer.fit`` (the EMA copy is taken at fit's setup)."""
    perf = dict(perf or {})
    sampling = perf.pop("sampling", None)
    _check_keys(perf, SWITCHES + OPTIONS)
    on_gpu = torch.device(device).type == "cuda"
    on = {name: resolve(name, perf.get(name, "auto"), on_gpu) for name in SWITCHES}
    if hasattr(module, "denoiser"):
        net = module.denoiser.net
    else:  # a ClassifierModule (net) or a first stage's AutoencoderModule (autoencoder)
        net = module.net if hasattr(module, "net") else module.autoencoder
    if on["tf32"]:
        use_tf32()
    if on["channels_last"]:
        to_channels_last(net)
    if on["compile"]:
        compile_in_place(net, perf.get("compile_mode"), perf.get("compile_backend") or "inductor")
    if on["fused_optimizer"]:
        module.optimizer_factory = with_fused(module.optimizer_factory)
    if on["sync_free_logging"]:
        module.loss_in_progress_bar = False
    if sampling is not None:  # what the sample-drawing callbacks pass to ddpmlab.samplers.generate
        _check_keys(sampling, SAMPLING_SWITCHES + SAMPLING_OPTIONS)
        module.sampling_perf = dict(sampling)
    return on


def prepare_sampling(net: nn.Module, device: torch.device | str, perf: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Levers for a sampling loop, applied in place to the network (``denoiser.net``); returns what is on. Unless
    ``compile_mode`` is given, a GPU compiles with ``reduce-overhead``: CUDA graphs replay each network call with
    one launch (each call starts a new graph iteration; the samplers never read a network output after the next
    call). Applying the same settings again is free; a network compiled already (for training) stays as it is."""
    perf = dict(perf or {})
    _check_keys(perf, SAMPLING_SWITCHES + SAMPLING_OPTIONS)
    on_gpu = torch.device(device).type == "cuda"
    on = {name: resolve(name, perf.get(name, "auto"), on_gpu) for name in SAMPLING_SWITCHES}
    on["precision"] = sampling_precision(perf.get("precision", "auto"), device)
    key = (str(torch.device(device)), tuple(sorted((k, str(v)) for k, v in perf.items())))
    if getattr(net, "_ddpmlab_sampling_levers", None) == key:
        return on
    if on["tf32"]:
        use_tf32()
    if on["channels_last"]:
        to_channels_last(net)
    if on["compile"] and getattr(net, "_compiled_call_impl", None) is None:
        mode = perf.get("compile_mode") or ("reduce-overhead" if on_gpu else None)
        compile_in_place(net, mode, perf.get("compile_backend") or "inductor")
    net._ddpmlab_sampling_levers = key
    return on


def sampling_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 on a CUDA device, fp32 elsewhere; fp32 / bf16 as given."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"perf.sampling.precision={precision!r}: choose auto, {' or '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bf16 autocast for the network (the Denoiser returns fp32, so sampler arithmetic stays fp32), or nothing."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: choose one of {PRECISIONS}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
