"""What the benchmark scripts share: composing the real configs, FLOP counting, timing, memory, the peer network.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the network
for one image, built on the meta device (no memory, no compute; SDPA there decomposes into the matmuls it does).
A training step costs 3 forwards (forward + backward ~ 2 forwards), the usual MFU convention.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ddpmlab.api import CONFIG_DIR

# Dense bf16 / TF32 tensor-core peaks in TFLOP/s (vendor data sheets, no sparsity). MFU uses the bf16 peak for
# bf16 runs and the TF32 one for fp32 runs (TF32 is on for fp32 matmuls when perf.tf32 is on).
PEAK_TFLOPS = {  # name fragment -> (bf16, tf32)
    "H200": (989.4, 494.7),
    "H100 PCIe": (756.0, 378.0),
    "H100 NVL": (835.5, 417.6),
    "H100": (989.4, 494.7),  # SXM and NVL
    "A100": (312.0, 156.0),
    "L40S": (362.1, 183.2),
    "L4": (121.0, 60.0),
}
TRAIN_FLOPS_PER_FORWARD = 3


def common_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument(
        "--model", default="unet_ddpm_cifar10", help="a conf/model option (default: DDPM CIFAR-10, 35.7M)"
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--compile", choices=("auto", "true", "false"), default="auto", help="auto: on for CUDA")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs, reduce-overhead"
    )
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto")
    parser.add_argument(
        "--no-peer", action="store_true", help="skip diffusers' UNet2DModel even when diffusers is installed"
    )
    parser.add_argument(
        "--peer-channels", default="128,256,256,256", help="UNet2DModel block_out_channels (DDPM CIFAR-10)"
    )
    parser.add_argument("--peer-groups", type=int, default=32, help="UNet2DModel norm_num_groups")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: from its name)"
    )
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for the train config (repeatable)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")


def switch(value: str) -> bool | str:
    return {"auto": "auto", "true": True, "false": False}[value]


def pick_device(name: str, cpu_threads: int | None = None) -> torch.device:
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name


def compose_train_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> DictConfig:
    """``conf/train.yaml`` as ``python train.py`` composes it, with the bench's model, shape and overrides."""
    overrides = [
        f"model={args.model}",
        f"data.image_size={args.image_size}",
        f"data.channels={args.channels}",
        f"data.batch_size={args.batch_size}",
        "data.num_classes=null",
        "logger=none",
        "schedule=linear",  # DDPM's (the peers are set up for it; the speed does not depend on it)
        f"paths.output_dir={tempfile.mkdtemp(prefix='ddpmlab-bench-')}",
        *extra,
        *args.override,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.perf.compile = switch(args.compile)
        cfg.perf.channels_last = switch(args.channels_last)
        cfg.perf.compile_mode = args.compile_mode
        cfg.perf.compile_backend = args.compile_backend
    return cfg


def forward_flops(make_net: Callable[[], nn.Module], shape: tuple[int, int, int], call: Callable | None = None) -> int:
    """FLOPs of one forward for one image of ``shape`` = (C, H, W), counted on the meta device."""
    with torch.device("meta"):
        net = make_net()
        x = torch.zeros((1, *shape))
        t = torch.zeros((1,), dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        (call or (lambda n, x, t: n(x, t)))(net, x, t)
    return counter.get_total_flops()


def params_millions(make_net: Callable[[], nn.Module]) -> float:
    with torch.device("meta"):
        return round(sum(p.numel() for p in make_net().parameters()) / 1e6, 3)


def peak_tflops(device: torch.device, precision: str, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, tf32) in PEAK_TFLOPS.items():
        if fragment in name:
            return bf16 if precision == "bf16" else tf32
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def free_memory(device: torch.device) -> None:
    """Between two measured paths: drop their tensors and compiled graphs, so each starts clean."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rate(images: int, seconds: float, calls: int, flops_per_image: float, peak: float | None, device) -> dict[str, Any]:
    """Throughput numbers for ``images`` produced in ``seconds`` by ``calls`` steps (or network calls)."""
    img_s = images / seconds
    achieved = img_s * flops_per_image / 1e12
    return {
        "img_per_s": round(img_s, 2),
        "step_ms": round(1e3 * seconds / calls, 3),
        "achieved_TFLOPs": float(f"{achieved:.4g}"),
        "mfu": float(f"{achieved / peak:.4g}") if peak else None,
        "peak_mem_GiB": peak_memory_gib(device),
        "seconds": round(seconds, 3),
    }


class Stopwatch:
    """Wall time between two points with the device drained at both (two syncs per measurement, none between)."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.stop = device, None, None

    def begin(self) -> None:
        synchronize(self.device)
        reset_peak_memory(self.device)
        self.start = time.perf_counter()

    def end(self) -> float:
        synchronize(self.device)
        self.stop = time.perf_counter()
        return self.stop - self.start


def profile(step: Callable[[], None], steps: int, device: torch.device, top: int = 15) -> dict[str, Any]:
    """torch.profiler over ``steps`` calls of ``step``: how busy the device is (kernel time / wall time; far below 1
    means launch- or host-bound) and the ops that take the most device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    watch = Stopwatch(device)
    with torch_profile(activities=activities) as prof:
        watch.begin()
        for _ in range(steps):
            step()
        wall_us = 1e6 * watch.end()
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy_us = sum(getattr(e, key) for e in events) if device.type == "cuda" else None
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_us / 1e3 / steps, 3),
        "device_busy_fraction": round(busy_us / wall_us, 3) if busy_us is not None else None,
        "top_ops": [
            {
                "name": e.key[:90],
                "self_ms_per_step": round(getattr(e, key) / 1e3 / steps, 3),
                "calls_per_step": e.count / steps,
            }
            for e in rows
        ],
    }


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


class PeerUNet(nn.Module):
    """diffusers' UNet2DModel in DDPM's CIFAR-10 configuration (google/ddpm-cifar10-32): four levels of
    ``channels``, two ResBlocks each, attention at the second level (16x16 for 32x32 images) and in the
    middle, dropout 0.1. ``forward(x, t)`` returns the tensor, like ddpmlab's UNet."""

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        channels: Sequence[int] = (128, 256, 256, 256),
        groups: int = 32,
    ):
        super().__init__()
        from diffusers import UNet2DModel

        levels = len(channels)
        down = ["AttnDownBlock2D" if i == 1 else "DownBlock2D" for i in range(levels)]
        up = ["AttnUpBlock2D" if i == levels - 2 else "UpBlock2D" for i in range(levels)]  # the mirror
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(channels),
            layers_per_block=2,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            attention_head_dim=None,
            norm_num_groups=groups,
            norm_eps=1e-6,
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            dropout=0.1,
        )
        self.in_channels, self.image_size = in_channels, image_size

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.unet(x, t).sample


def peer_factory(args: argparse.Namespace) -> Callable[[], PeerUNet]:
    channels = tuple(int(c) for c in args.peer_channels.split(","))
    return lambda: PeerUNet(args.image_size, args.channels, channels, args.peer_groups)


def ddpmlab_version() -> str:
    try:
        return importlib.metadata.version("ddpmlab")
    except importlib.metadata.PackageNotFoundError:  # on PYTHONPATH, not installed
        import ddpmlab

        return ddpmlab.__version__


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ddpmlab": ddpmlab_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if diffusers_available():
        import diffusers

        env["diffusers"] = diffusers.__version__
    return env


def emit(result: dict[str, Any], out: str | None) -> None:
    """The result as one JSON line on stdout (the last line), and in ``out`` if given."""
    text = json.dumps(result)
    if out:
        with open(out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    print(text, flush=True)


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's start-up banner and tips would interleave with the JSON on stdout."""
    import logging

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
