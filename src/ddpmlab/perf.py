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
- ``cpu_threads`` (CPU training only): ``auto`` times a training step at one thread and at torch's default
  (one per core) and keeps the faster; OpenMP's fork/join costs more than it brings for small networks
  (the digits U-Net trains faster on one thread than on two). A number sets it; null leaves torch's choice,
  and so does an ``OMP_NUM_THREADS`` in the environment (the user decided).

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
import os
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from ddpmlab.conditioning import placeholder
from ddpmlab.errors import ConfigError

SWITCHES = ("compile", "channels_last", "fused_optimizer", "tf32", "sync_free_logging")
OPTIONS = ("compile_mode", "compile_backend", "cpu_threads")
SAMPLING_SWITCHES = ("compile", "channels_last", "tf32")
SAMPLING_OPTIONS = OPTIONS + ("precision",)
PRECISIONS = ("fp32", "bf16")
Probe = Callable[[Any, int, tuple[int, ...]], tuple[Callable[[], None], list[nn.Parameter]]]


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


def choose_cpu_threads(step: Callable[[], Any], params, repeats: int = 2) -> int:
    """Time ``step`` (a forward and backward pass) at one thread and at torch's default thread count, set the
    faster one and return it. The global RNG is restored and the gradients of ``params`` cleared afterwards.
    A count whose first step already takes twice the best so far is dropped without more steps (where other
    processes hold the cores, a multi-threaded step can take seconds)."""
    params = list(params)
    default = torch.get_num_threads()
    timings = {}
    with torch.random.fork_rng(devices=[]):
        for n in sorted({1, default}):
            torch.set_num_threads(n)
            start = time.perf_counter()
            step()  # warm-up: allocator, OpenMP pool
            best = time.perf_counter() - start
            if timings and best > 2 * min(timings.values()):
                timings[n] = best
                continue
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - start)
            timings[n] = best
    for p in params:
        p.grad = None
    chosen = min(timings, key=timings.get)
    torch.set_num_threads(chosen)
    return chosen


FULL_BATCH_PROBE_SECONDS = 0.5  # auto times the whole training batch when one step of it is estimated below this


def set_cpu_threads(module, value: Any, batch_shape: tuple[int, ...] | None, probe: Probe | None = None) -> int:
    """``perf.cpu_threads`` for a module training on the CPU: a number, null (torch's choice) or auto (measured,
    unless ``OMP_NUM_THREADS`` is set); returns the thread count in force. ``probe(module, n, image_shape)``: a
    training step of the module to time (its stage's ``training_probe``; default: a DiffusionModule's)."""
    if value is None or (value == "auto" and ("OMP_NUM_THREADS" in os.environ or batch_shape is None)):
        return torch.get_num_threads()
    if value != "auto":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"perf.cpu_threads={value!r}: use auto (measured), a positive number or null")
        torch.set_num_threads(value)
        return value
    probe = probe if probe is not None else training_probe
    # The training batch where a step of it is cheap: whether threads pay depends on the work per step, and on
    # 32 small latents one thread wins where the batch of 128 trains 1.45x faster on two. Otherwise a slice of
    # 32, so that the probe stays short where other processes hold the cores (a multi-threaded step then takes
    # 10-20x longer).
    n = batch_shape[0]
    with torch.random.fork_rng(devices=[]):
        step, params = probe(module, min(n, 32), batch_shape[1:])
        if n > 32:
            step()  # warm-up
            start = time.perf_counter()
            step()
            if (time.perf_counter() - start) * n / 32 < FULL_BATCH_PROBE_SECONDS:
                step, params = probe(module, n, batch_shape[1:])
        for p in params:
            p.grad = None
        return choose_cpu_threads(step, params)


def training_probe(module, n: int, image_shape: tuple[int, ...]) -> tuple[Callable[[], None], list[nn.Parameter]]:
    """A forward and backward pass like one training step of a DiffusionModule on ``n`` random inputs, and the
    parameters it fills gradients of: its denoiser on x_t (latents for a latent denoiser). The other kinds of run
    declare theirs in :mod:`ddpmlab.stages`."""
    denoiser = module.denoiser
    x = torch.randn((n, *denoiser.sample_shape))
    t = torch.randint(0, denoiser.diffusion.T, (n,))
    cond = placeholder(denoiser, n)
    return lambda: denoiser(x, t, cond).eps_hat.square().mean().backward(), list(denoiser.parameters())


def sampling_cpu_threads(denoiser, device: torch.device | str, batch_size: int) -> int:
    """For sampling on the CPU: one thread or one per core, whichever runs the network's forward pass faster
    (timed on a slice of the batch), unless ``OMP_NUM_THREADS`` is set. Returns the count in force."""
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    x = torch.randn((min(batch_size, 32), *denoiser.sample_shape))  # x_t as it is sampled, non-square ones too
    t = torch.zeros(x.shape[0], dtype=torch.long)
    cond = placeholder(denoiser, x.shape[0])

    @torch.no_grad()
    def forward():
        denoiser(x, t, cond)

    return choose_cpu_threads(forward, [])


def apply_perf(
    module,
    device: torch.device | str,
    perf: Mapping[str, Any] | None = None,
    net: nn.Module | None = None,
    probe: Probe | None = None,
) -> dict[str, Any]:
    """Apply the training levers in ``perf`` (the ``perf`` config) to a built training module that will train on
    ``device``; return what is on. Call before ``trainer.fit`` (the EMA copy is taken at fit's setup). ``net``: the
    network the levers act on, ``probe``: a training step to time (the module's stage says both; by default a
    DiffusionModule's denoiser network and :func:`training_probe`)."""
    perf = dict(perf or {})
    sampling = perf.pop("sampling", None)
    _check_keys(perf, SWITCHES + OPTIONS)
    on_gpu = torch.device(device).type == "cuda"
    on = {name: resolve(name, perf.get(name, "auto"), on_gpu) for name in SWITCHES}
    net = net if net is not None else module.denoiser.net
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
    if torch.device(device).type == "cpu":
        data = (module.config or {}).get("data") or {}
        shape = (data.get("batch_size"), data.get("channels"), data.get("image_size"), data.get("image_size"))
        valid = all(isinstance(n, int) for n in shape)
        set_cpu_threads(module, perf.get("cpu_threads", "auto"), shape if valid else None, probe)
    return on


def prepare_sampling(
    net: nn.Module, device: torch.device | str, perf: Mapping[str, Any] | None = None
) -> dict[str, Any]:
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
