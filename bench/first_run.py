"""The first run a newcomer makes (``python train.py`` on the bundled 8x8 digits), side by side: today's
defaults, the previous defaults, and lucidrains' denoising-diffusion-pytorch on the same data and budget.

Each contestant trains, then draws 1,000 DDIM-50 samples (its own DDIM, eta = 0); the score is the Frechet
distance between those samples and the 1,797 real digits in 64-d pixel space (pixels in [0, 1]; lower is better),
beside the wall time of the training as a user sees it (``python train.py``: start-up, validation, grids and
checkpoints included). Prints one JSON line per contestant and writes them all to ``--out``.

    python bench/first_run.py                        # all three, one after the other (about 25 minutes, 2 cores)
    python bench/first_run.py --only current peer    # a subset

The peer is optional: ``pip install denoising-diffusion-pytorch==2.3.4`` in the environment that runs this
script; where it is not installed it is skipped with a message. The peer trains with the recipe of its README
(``Unet(dim=32, dim_mults=(1, 2, 2))``, its Trainer's EMA updated every 10 steps, gradient clipping at 1), at
the budget of ddpmlab's previous defaults: 1,500 steps, batch 128, Adam 1e-3, EMA 0.999, T = 1000 linear, eps.
Every contestant runs at the CPU thread count ddpmlab measures as fastest for it (``ddpmlab.perf``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# The defaults before the first-run tuning, spelled out (the network is unet_small: 1.6M parameters).
PREVIOUS_DEFAULTS = [
    "model=unet_small",
    "model.dropout=0.1",
    "trainer.max_steps=1500",
    "optimizer=adam",
    "optimizer.lr=1e-3",
    "optimizer.lr_schedule=constant",
    "optimizer.lr_warmup_steps=0",
    "ema.decay=0.999",
    "ema.warmup=true",
]
NUM_SAMPLES, SAMPLE_SEED = 1000, 0


def real_digits() -> np.ndarray:
    from ddpmlab.data.datasets import load_digits

    images, _ = load_digits()
    return images.reshape(len(images), -1).double().numpy() / 255.0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the Gaussians fitted to two sets of rows."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def run_ddpmlab(name: str, overrides: list[str], workdir: Path) -> dict:
    from ddpmlab.api import load
    from ddpmlab.images import to_unit
    from ddpmlab.samplers import Sampler

    run_dir = workdir / name
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let train.py choose the threads
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{name}: train.py failed:\n{proc.stderr[-3000:]}")
    threads = next((line.split()[-1] for line in proc.stdout.splitlines() if "CPU threads" in line), "?")
    denoiser, cfg = load(run_dir / "checkpoints" / "last.ckpt")
    params = sum(p.numel() for p in denoiser.net.parameters())
    sampler = Sampler("ddim", num_steps=50, spacing="leading", eta=0.0, clip_x0=True)
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    x_T = torch.randn(NUM_SAMPLES, 1, 8, 8, generator=g)
    with torch.no_grad():
        x0 = sampler(denoiser, x_T, generator=g)
    samples = to_unit(x0).reshape(NUM_SAMPLES, -1).double().numpy()
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    return {
        "name": name,
        "overrides": overrides,
        "params": params,
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "steps": metrics.get("step"),
        "samples": samples,
    }


def run_peer(workdir: Path, steps: int = 1500) -> dict | None:
    try:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA
    except ImportError:
        print(
            "peer skipped: denoising-diffusion-pytorch is not installed "
            "(pip install denoising-diffusion-pytorch==2.3.4 to compare with it)",
            flush=True,
        )
        return None
    from ddpmlab.perf import choose_cpu_threads

    torch.manual_seed(0)
    model = Unet(dim=32, dim_mults=(1, 2, 2), channels=1)
    diffusion = GaussianDiffusion(
        model, image_size=8, timesteps=1000, sampling_timesteps=50, objective="pred_noise", beta_schedule="linear"
    )
    ema = EMA(diffusion, beta=0.999, update_every=10)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-3)
    data = torch.from_numpy(real_digits()).float().reshape(-1, 1, 8, 8)  # the peer normalises [0, 1] itself
    threads = choose_cpu_threads(lambda: diffusion(data[:128]).backward(), model.parameters())
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + 128 > len(order):
            order, pos = torch.randperm(len(data), generator=g), 0
        loss = diffusion(data[order[pos : pos + 128]])
        pos += 128
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        ema.update()
    seconds = time.perf_counter() - start
    ema.ema_model.eval()
    with torch.no_grad():
        samples = torch.cat([ema.ema_model.sample(batch_size=500) for _ in range(NUM_SAMPLES // 500)])
    return {
        "name": "peer",
        "overrides": ["denoising-diffusion-pytorch 2.3.4, Unet(dim=32, dim_mults=(1, 2, 2))"],
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "steps": steps,
        "samples": samples.reshape(NUM_SAMPLES, -1).double().numpy(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["current", "previous", "peer"])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "first_run.json"))
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for an extra ddpmlab contestant 'trial'")
    args = ap.parse_args()
    real = real_digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.only:
            if name == "peer":
                row = run_peer(workdir)
            elif name == "trial":
                row = run_ddpmlab("trial", args.extra, workdir)
            else:
                row = run_ddpmlab(name, [] if name == "current" else PREVIOUS_DEFAULTS, workdir)
            if row is None:
                continue
            row["fd_pixels"] = round(frechet_distance(row.pop("samples"), real), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    result = {
        "command": "python bench/first_run.py " + " ".join(sys.argv[1:]),
        "commit": commit.strip(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
