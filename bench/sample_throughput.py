"""Sampling throughput for any sampler and step count, printed as one JSON line:

  ddpmlab  ``build_denoiser`` from the composed config and ``Sampler`` from the sampler config, drawn by
           ``ddpmlab.samplers.generate`` (what sample.py, evaluate.py and the callbacks run) with the
           ``perf.sampling`` levers (channels_last, compile with CUDA graphs, TF32, bf16 for the network);
  peer     diffusers' ``UNet2DModel`` (DDPM CIFAR-10 configuration) driven by diffusers' ``DDIMScheduler`` over
           the same grid, with the same levers (DDIM only; when diffusers is installed).

Weights are random: the work per step does not depend on them.

    python bench/sample_throughput.py                          # DDIM, 50 steps, batch 256, bf16 + CUDA graphs on CUDA
    python bench/sample_throughput.py --sampler ddpm --num-steps 1000 --batch-size 128
    python bench/sample_throughput.py --model unet_tiny --image-size 8 --channels 1 --batch-size 4 \\
        --num-steps 3 --runs 1 --peer-channels 32,32 --peer-groups 8         # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C
from ddpmlab.api import build_denoiser
from ddpmlab.perf import autocast, prepare_sampling
from ddpmlab.samplers import generate


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p, batch_size=256)
    p.add_argument("--sampler", default="ddim", help="a conf/sampler option: ddim, ddpm, dpm_solver, ...")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=3, help="timed sampling runs (each: batch-size images, num-steps calls)")
    p.add_argument("--warmup-runs", type=int, default=1, help="untimed runs first (compilation, CUDA graph capture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-runs", type=int, default=0, help="after timing, profile this many ddpmlab sampling runs")
    return p.parse_args(argv)


def sampling_perf(args, precision: str | None = None) -> dict:
    """The ``perf.sampling`` config these arguments describe."""
    perf = {
        "compile": C.switch(args.compile),
        "channels_last": C.switch(args.channels_last),
        "compile_backend": args.compile_backend,
    }
    if precision is not None:
        perf["precision"] = precision
    if args.compile_mode is not None:  # else prepare_sampling's default: reduce-overhead (CUDA graphs) on a GPU
        perf["compile_mode"] = args.compile_mode
    return perf


def time_runs(run, args, device) -> tuple[float, torch.Tensor]:
    for _ in range(args.warmup_runs):
        run()
    watch = C.Stopwatch(device)
    watch.begin()
    for _ in range(args.runs):
        x0 = run()
    return watch.end(), x0


@torch.no_grad()
def ddpmlab_sampling(args, cfg, device, precision, flops_per_call, peak) -> tuple[dict, dict]:
    denoiser = build_denoiser(cfg).to(device).eval()
    perf = sampling_perf(args, precision)
    levers = prepare_sampling(denoiser.net, device, perf)  # what generate applies (again, for free) on each call
    sampler = instantiate(cfg.sampler)

    def run():
        return generate(denoiser, sampler, args.batch_size, seed=args.seed, batch_size=args.batch_size, perf=perf)

    seconds, x0 = time_runs(run, args, device)
    num_steps = sampler.num_evaluations(denoiser.diffusion)
    out = C.rate(args.batch_size * args.runs, seconds, args.runs * num_steps, flops_per_call * num_steps, peak, device)
    out.update(sampler=repr(sampler), network_calls_per_image=num_steps, finite=bool(torch.isfinite(x0).all()))
    if args.profile_runs:
        out["profile"] = C.profile(run, args.profile_runs, device)
    return out, levers


@torch.no_grad()
def peer_sampling(args, cfg, device, precision, flops_per_call, peak) -> dict:
    """diffusers' own DDIM loop (scheduler.step) over UNet2DModel, timesteps handed over as device tensors."""
    from diffusers import DDIMScheduler

    schedule = cfg.schedule
    if not schedule._target_.endswith("linear_betas"):
        raise SystemExit("the diffusers peer is set up for the linear schedule (schedule=linear)")
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule="linear",
        clip_sample=bool(cfg.sampler.get("clip_x0", True)),
        set_alpha_to_one=True,
        timestep_spacing=cfg.sampler.spacing
        if cfg.sampler.spacing in ("leading", "trailing", "linspace")
        else "leading",
    )
    scheduler.set_timesteps(args.num_steps)
    net = C.peer_factory(args)().to(device).eval()
    prepare_sampling(net, device, sampling_perf(args))
    t_batches = {
        int(t): torch.full((args.batch_size,), int(t), device=device, dtype=torch.long) for t in scheduler.timesteps
    }
    g = torch.Generator(device).manual_seed(args.seed)
    x_T = torch.randn((args.batch_size, args.channels, args.image_size, args.image_size), generator=g, device=device)

    def run():
        x = x_T
        for t in scheduler.timesteps:
            with autocast(device, precision):
                eps = net(x, t_batches[int(t)])
            x = scheduler.step(eps.float(), t, x, eta=float(cfg.sampler.get("eta", 0.0))).prev_sample
        return x

    seconds, x0 = time_runs(run, args, device)
    out = C.rate(
        args.batch_size * args.runs, seconds, args.runs * args.num_steps, flops_per_call * args.num_steps, peak, device
    )
    out.update(
        network="diffusers.UNet2DModel (DDPM CIFAR-10 config) + DDIMScheduler.step",
        finite=bool(torch.isfinite(x0).all()),
    )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = C.pick_device(args.device, args.cpu_threads)
    precision = C.pick_precision(args.precision, device)
    cfg = C.compose_train_config(args, [f"sampler={args.sampler}", f"sampler.num_steps={args.num_steps}"])
    torch.backends.cudnn.benchmark = device.type == "cuda"
    shape = (args.channels, args.image_size, args.image_size)
    peak = C.peak_tflops(device, precision, args.peak_tflops)
    run_peer = not args.no_peer and C.diffusers_available() and args.sampler == "ddim"

    fwd = {"ddpmlab": C.forward_flops(lambda: instantiate(cfg.model), shape)}
    if run_peer:
        fwd["peer"] = C.forward_flops(C.peer_factory(args), shape)
    result: dict = {
        "bench": "sample",
        "env": C.environment(device),
        "config": {
            "model": args.model,
            "image_shape": list(shape),
            "batch_size": args.batch_size,
            "precision": precision,
            "sampler": args.sampler,
            "num_steps": args.num_steps,
            "runs": args.runs,
            "warmup_runs": args.warmup_runs,
            "params_M": C.params_millions(lambda: instantiate(cfg.model)),
        },
        "flops": {
            "rule": "FlopCounterMode over one forward of one image (meta device); sampling = num_steps x forward",
            "forward_GFLOP_per_image": {k: round(v / 1e9, 4) for k, v in fwd.items()},
            "sample_GFLOP_per_image": {k: round(args.num_steps * v / 1e9, 4) for k, v in fwd.items()},
            "peak_TFLOPs": peak,
        },
    }
    result["ddpmlab"], result["levers"] = ddpmlab_sampling(args, cfg, device, precision, fwd["ddpmlab"], peak)
    C.free_memory(device)
    if run_peer:
        result["peer"] = peer_sampling(args, cfg, device, precision, fwd["peer"], peak)
        result["ratio"] = {"ddpmlab_vs_peer": round(result["ddpmlab"]["img_per_s"] / result["peer"]["img_per_s"], 3)}
        C.free_memory(device)
    C.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
