"""The cost of one training image: latent against pixel diffusion at MNIST size, the same U-Net width, one run.

    python bench/latent_vs_pixel.py [--ae-ckpt <autoencoder run>/checkpoints/last.ckpt] [--batch-size 128] \
        [--steps 4] [--out bench/results/latent_vs_pixel.json]

Three training steps of the same U-Net (experiment=ldm_mnist's: base 32, channel_mult [1, 2, 2], one res block per
level, attention in the middle block only), timed side by side:
- pixel: x0 [B,1,32,32] (MNIST resized to 32x32);
- latent, encoded once: z [B,c,8,8] already on the device (``first_stage.encode=once``; the encoding pass over the
  split is timed separately, per image);
- latent, encoded per batch: the first stage's encoder on every batch, then the step (``first_stage.encode=per_batch``).
FLOPs are counted (FlopCounterMode on the meta device); seconds are wall time of full Adam steps. The first stage is
the experiment=autoencoder_mnist architecture, random weights unless --ae-ckpt is given (the cost is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.latent import LatentDenoiser
from ddpmlab.diffusion.parameterization import Denoiser
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.networks import UNet
from ddpmlab.networks.autoencoder import Autoencoder
from ddpmlab.objectives.losses import SimpleLoss


def unet(in_channels: int, size: int, width: int) -> UNet:
    return UNet(in_channels, None, size, width, (1, 2, 2), 1, (), 0.0, 4, 32)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_steps(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ae-ckpt", default=None)
    ap.add_argument("--width", type=int, default=32, help="U-Net base_channels, the same for both")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    B = args.batch_size
    if args.ae_ckpt:
        from ddpmlab.stages import load_first_stage

        first_stage, _ = load_first_stage(args.ae_ckpt)
    else:
        first_stage = Autoencoder(1, 32, 16, (1, 2, 2), 1, 2, "kl", num_groups=8, mid_attention=True).eval()
    diffusion = GaussianDiffusion(linear_betas(1000))
    loss_fn = SimpleLoss()
    x0 = torch.rand(B, 1, 32, 32) * 2 - 1
    results = {}
    pixel = Denoiser(unet(1, 32, args.width), diffusion)
    c = first_stage.latent_channels
    latent = LatentDenoiser(unet(c, 8, args.width), diffusion, first_stage, scale_factor=1.0)

    def step_fn(denoiser, batch):
        params = [p for p in denoiser.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-4)

        def step():
            x = batch()
            t = torch.randint(0, 1000, (x.shape[0],))
            loss = loss_fn(denoiser, x, t, torch.randn_like(x)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    with torch.no_grad():
        z0 = latent.encode(x0)
    cases = {
        "pixel_1x32x32": (pixel, lambda: x0),
        f"latent_{c}x8x8_encoded_once": (latent, lambda: z0),
        f"latent_{c}x8x8_encoded_per_batch": (latent, lambda: latent.encode(x0)),
    }
    for name, (denoiser, batch) in cases.items():
        step = step_fn(denoiser, batch)
        shape = x0.shape[1:] if denoiser is pixel else z0.shape[1:]
        f = flops(lambda net=denoiser.net, shape=shape: net(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long)))
        seconds = time_steps(step, args.steps)
        results[name] = {
            "ms_per_image": round(1000 * seconds / B, 3),
            "img_per_s": round(B / seconds, 1),
            "unet_forward_mflop_per_image": round(f / 1e6, 1),
        }
    with torch.no_grad():
        enc = time_steps(lambda: latent.moments(x0), args.steps) / B
        enc_flops = flops(lambda: latent.moments(x0[:1]))
    results["encode_once_pass"] = {
        "ms_per_image": round(1000 * enc, 3),
        "encoder_mflop_per_image": round(enc_flops / 1e6, 1),
        "seconds_for_60k_mnist": round(60000 * enc, 1),
    }
    ratio = results["pixel_1x32x32"]["ms_per_image"] / results[f"latent_{c}x8x8_encoded_once"]["ms_per_image"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    out = {
        "benchmark": "latent_vs_pixel",
        "batch_size": B,
        "unet_width": args.width,
        "steps": args.steps,
        "results": results,
        "pixel_over_latent_cost": round(ratio, 1),
        "env": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_1min": round(os.getloadavg()[0], 1),
            "commit": commit,
        },
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
