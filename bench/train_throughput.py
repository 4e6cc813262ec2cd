"""Training throughput, measured three ways in one run and printed as one JSON line:

  trainer  the real path: ``build_module`` from the composed train config, the perf levers (``apply_perf``),
           a Lightning Trainer from the trainer config (``gpu_fast`` on CUDA) with the EMA callback, batches
           from the data module's GPU-resident ``DeviceLoader`` over synthetic uint8 images (``--data config``:
           the configured data module instead);
  bare     a plain PyTorch loop that calls the module's own ``training_step`` (t / eps draw, objective), its
           optimizer, clipping and the EMA callback's own update: the difference to ``trainer`` is Lightning's
           overhead;
  peer     the same bare loop over diffusers' ``UNet2DModel`` in DDPM's CIFAR-10 configuration, with the
           same levers (when diffusers is installed).

    python bench/train_throughput.py                    # DDPM CIFAR-10 U-Net, 32x32x3, batch 128, bf16 on CUDA
    python bench/train_throughput.py --model unet_tiny --image-size 8 --channels 1 --batch-size 8 \\
        --steps 3 --warmup 1 --peer-channels 32,32 --peer-groups 8     # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C
from ddpmlab.api import build_module
from ddpmlab.data.device_loader import DeviceLoader
from ddpmlab.diffusion import Denoiser, GaussianDiffusion
from ddpmlab.lit.module import DiffusionModule, optimizer_partial
from ddpmlab.perf import apply_perf, autocast

PATHS = ("trainer", "bare", "peer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p, batch_size=128)
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps per path")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--paths", default=",".join(PATHS), help="which of trainer,bare,peer to time")
    p.add_argument(
        "--trainer-preset", default="auto", help="conf/trainer option (auto: gpu_fast on CUDA, default on CPU)"
    )
    p.add_argument("--data", choices=("synthetic", "config"), default="synthetic")
    p.add_argument(
        "--num-images", type=int, default=None, help="synthetic images held on the device (default 50,000 on CUDA)"
    )
    p.add_argument("--progress-bar", action="store_true", help="keep Lightning's progress bar in the trainer path")
    p.add_argument(
        "--profile-steps", type=int, default=0, help="after timing, profile this many bare-loop steps (top kernels)"
    )
    return p.parse_args(argv)


def synthetic_loader(args, device: torch.device) -> DeviceLoader:
    """CIFAR-10-shaped uint8 images on the device, served like the data module's GPU path (shuffle, flips)."""
    n = args.num_images or (50_000 if device.type == "cuda" else 4 * args.batch_size)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, args.channels, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
    return DeviceLoader(
        images,
        torch.zeros(n, dtype=torch.long),
        args.batch_size,
        shuffle=True,
        random_flip=True,
        drop_last=True,
        device=device,
    )


def forever(loader):
    while True:
        yield from loader


class Measure(pl.Callback):
    """Times the steps after ``warmup`` (goes after the EMA callback, so its update is inside the window)."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.watch, self.seconds, self.peak = warmup, steps, C.Stopwatch(device), None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.watch.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup + self.steps:
            self.seconds = self.watch.end()
            self.peak = C.peak_memory_gib(self.watch.device)


def trainer_path(args, cfg, device, precision, flops, peak) -> tuple[dict, dict]:
    pl.seed_everything(cfg.seed, verbose=False)
    module = build_module(cfg)
    levers = apply_perf(module, device, cfg.perf)
    measure = Measure(args.warmup, args.steps, device)
    callbacks = [instantiate(cfg.ema), measure] if cfg.get("ema") else [measure]
    with C.quiet_lightning():
        trainer = instantiate(
            cfg.trainer,
            accelerator=device.type,
            precision="bf16-mixed" if precision == "bf16" else "32-true",
            max_steps=args.warmup + args.steps,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=args.progress_bar,
            enable_model_summary=False,
            callbacks=callbacks,
            logger=False,
        )
        if args.data == "config":
            trainer.fit(module, datamodule=instantiate(cfg.data))
        else:
            trainer.fit(module, train_dataloaders=synthetic_loader(args, device))
    out = C.rate(args.batch_size * args.steps, measure.seconds, args.steps, flops, peak, device)
    out["peak_mem_GiB"] = measure.peak
    out["ema"] = bool(cfg.get("ema"))
    return out, levers


def bare_loop(args, module: DiffusionModule, cfg, device, precision, flops, peak) -> dict:
    """The training step without Lightning's loop: the module's own ``training_step`` (its t / eps draw, labels and
    objective), its optimizer, clipping, and the EMA callback's own update, over the same data path."""
    module = module.to(device).train()
    module.on_train_start()  # the module's noise generator, as at the start of fit
    optimizer = module.build_optimizer()
    params = [p for p in module.denoiser.parameters() if p.requires_grad]
    clip = cfg.trainer.gradient_clip_val
    ema = instantiate(cfg.ema) if cfg.get("ema") else None
    if ema is not None:
        ema.setup(None, module, "fit")  # the averaged copy, as the Trainer path's callback makes it
    batches = forever(synthetic_loader(args, device))
    steps_done = 0

    def step() -> None:
        nonlocal steps_done
        with autocast(device, precision):
            loss = module.training_step(next(batches), steps_done)["loss"]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and ema.should_update(step_idx=steps_done):
            ema._update(module)
        steps_done += 1

    with warnings.catch_warnings():  # training_step's self.log has no Trainer to log to here: it says so
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for _ in range(args.warmup):
            step()
        watch = C.Stopwatch(device)
        watch.begin()
        for _ in range(args.steps):
            step()
        seconds = watch.end()
        out = C.rate(args.batch_size * args.steps, seconds, args.steps, flops, peak, device)
        out["ema"] = ema is not None
        if args.profile_steps:
            out["profile"] = C.profile(step, args.profile_steps, device)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = C.pick_device(args.device, args.cpu_threads)
    precision = C.pick_precision(args.precision, device)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        raise SystemExit(f"--paths: unknown {sorted(unknown)}; choose from {PATHS}")
    if "peer" in paths and (args.no_peer or not C.diffusers_available()):
        paths.remove("peer")
    preset = (
        args.trainer_preset if args.trainer_preset != "auto" else ("gpu_fast" if device.type == "cuda" else "default")
    )
    cfg = C.compose_train_config(args, [f"trainer={preset}"])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as trainer=gpu_fast sets it, for the bare loops too
    shape = (args.channels, args.image_size, args.image_size)
    peak = C.peak_tflops(device, precision, args.peak_tflops)

    fwd = {"ddpmlab": C.forward_flops(lambda: instantiate(cfg.model), shape)}
    if "peer" in paths:
        fwd["peer"] = C.forward_flops(C.peer_factory(args), shape)
    train_flops = {k: C.TRAIN_FLOPS_PER_FORWARD * v for k, v in fwd.items()}

    result: dict = {
        "bench": "train",
        "env": C.environment(device),
        "config": {
            "model": args.model,
            "image_shape": list(shape),
            "batch_size": args.batch_size,
            "precision": precision,
            "trainer_preset": preset,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "data": "config" if args.data == "config" else "synthetic uint8 on the device (DeviceLoader)",
            "params_M": C.params_millions(lambda: instantiate(cfg.model)),
        },
        "flops": {
            "rule": "FlopCounterMode over one forward of one image (meta device); training step = 3 x forward",
            "forward_GFLOP_per_image": {k: round(v / 1e9, 4) for k, v in fwd.items()},
            "train_GFLOP_per_image": {k: round(v / 1e9, 4) for k, v in train_flops.items()},
            "peak_TFLOPs": peak,
        },
    }
    if "trainer" in paths:
        result["trainer"], result["levers"] = trainer_path(args, cfg, device, precision, train_flops["ddpmlab"], peak)
        C.free_memory(device)
    if "bare" in paths:
        module = build_module(cfg)
        result["levers"] = apply_perf(module, device, cfg.perf)
        result["bare"] = bare_loop(args, module, cfg, device, precision, train_flops["ddpmlab"], peak)
        del module
        C.free_memory(device)
    if "peer" in paths:
        peer = DiffusionModule(
            Denoiser(C.peer_factory(args)(), GaussianDiffusion(instantiate(cfg.schedule))),
            instantiate(cfg.objective),
            optimizer_partial(cfg.optimizer),
        )
        apply_perf(peer, device, cfg.perf)
        result["peer"] = bare_loop(args, peer, cfg, device, precision, train_flops["peer"], peak)
        result["peer"]["network"] = "diffusers.UNet2DModel (DDPM CIFAR-10 config), same bare loop and levers"
        del peer
        C.free_memory(device)
    result["ratio"] = {
        f"{a}_vs_{b}": round(result[a]["img_per_s"] / result[b]["img_per_s"], 3)
        for a, b in (("trainer", "peer"), ("bare", "peer"), ("trainer", "bare"))
        if a in result and b in result
    }
    C.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
