"""The first run a newcomer makes (``python train.py`` on the bundled 8x8 digits), side by side: today's
defaults, the previous defaults, and lucidrains' denoising-diffusion-pytorch on the same data and budget.

Each contestant trains, then draws 1,000 DDIM-50 samples (its own DDIM, eta = 0) from each of several sampling
seeds; the score is the Frechet distance between those samples and the reference digits in 64-d pixel space
(pixels in [0, 1]; lower is better), the median over the seeds with its range, beside the wall time of the
training as a user sees it (``python train.py``: start-up, validation, grids and checkpoints included). The reference
is half of the digits (odd indices: 898 images); both contestants train on all 1,797. Prints one JSON line per
contestant and writes them all to ``--out``.

    python bench/first_run.py                              # one after the other, each at its fastest thread count
    python bench/first_run.py --side-by-side               # all started together, one thread each
    python bench/first_run.py --only current peer --seeds 0 1 2 3 4
    python bench/first_run.py --only linear peer_every10    # the linear schedule; the peer's Trainer EMA

The peer is optional: ``pip install denoising-diffusion-pytorch==2.3.4`` in the environment that runs this
script; where it is not installed it is skipped with a message. It trains with the recipe of its README
(``Unet(dim=32, dim_mults=(1, 2, 2))``, gradient clipping at 1) at the budget of ddpmlab's previous defaults:
1,500 steps, batch 128, Adam 1e-3, T = 1000 linear, eps, and an EMA of decay 0.999 updated after every step with
ema-pytorch's own warm-up (``update_every=1``; contestant ``peer``): ddpmlab's EMA is updated every step too.
Its Trainer's default, ``update_every=10``, makes the average reach back over most of a 1,500-step run (roughly its
last 1,250 steps), a handicap at this budget; it is the second row, ``peer_every10``.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# The defaults before the first-run tuning, spelled out (the network is unet_small: 1.6M parameters).
PREVIOUS_DEFAULTS = [
    "schedule=linear",
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
NUM_SAMPLES = 1000


def real_digits() -> np.ndarray:
    from ddpmlab.data.datasets import load_digits

    images, _ = load_digits()
    return images.reshape(len(images), -1).double().numpy() / 255.0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the Gaussians fitted to two sets of rows
    (``ddpmlab.metrics.frechet``, stable where the covariances are singular: the digits' border pixels)."""
    from ddpmlab.metrics.frechet import frechet_distance as fd
    from ddpmlab.metrics.frechet import gaussian_stats

    return fd(*gaussian_stats(a), *gaussian_stats(b))


def ddim_samples_ddpmlab(run_dir: Path, seed: int) -> np.ndarray:
    from ddpmlab.api import load
    from ddpmlab.images import to_unit
    from ddpmlab.samplers import Sampler

    denoiser, _ = load(run_dir / "checkpoints" / "last.ckpt")
    sampler = Sampler("ddim", num_steps=50, spacing="leading", eta=0.0, clip_x0=True)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(NUM_SAMPLES, 1, 8, 8, generator=g)
    with torch.no_grad():
        x0 = sampler(denoiser, x_T, generator=g)
    return to_unit(x0).reshape(NUM_SAMPLES, -1).double().numpy()


def run_ddpmlab(name: str, overrides: list[str], workdir: Path, threads: int | None) -> subprocess.Popen:
    """Start ``python train.py`` (``threads``: OMP_NUM_THREADS; None: train.py measures its fastest)."""
    run_dir = workdir / name
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(workdir / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish_ddpmlab(name: str, overrides: list[str], workdir: Path, proc: subprocess.Popen, seconds: float, seeds):
    if proc.returncode:
        raise RuntimeError(f"{name}: train.py failed:\n{(workdir / f'{name}.log').read_text()[-3000:]}")
    from ddpmlab.api import load

    run_dir = workdir / name
    log = (workdir / f"{name}.log").read_text()
    threads = next((line.split()[-1] for line in log.splitlines() if "CPU threads" in line), "?")
    denoiser, _ = load(run_dir / "checkpoints" / "last.ckpt")
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    return {
        "name": name, "overrides": overrides, "params": sum(p.numel() for p in denoiser.net.parameters()),
        "train_seconds": round(seconds, 1), "threads": threads, "steps": metrics.get("step"),
        "samples": {seed: ddim_samples_ddpmlab(run_dir, seed) for seed in seeds},
    }  # fmt: skip


def peer_worker(out: str, every: int, steps: int, threads: int | None, seeds: list[int]) -> None:
    """Train the peer in this process and save its samples (``--worker``)."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    from ddpmlab.perf import choose_cpu_threads

    torch.manual_seed(0)
    model = Unet(dim=32, dim_mults=(1, 2, 2), channels=1)
    diffusion = GaussianDiffusion(
        model, image_size=8, timesteps=1000, sampling_timesteps=50, objective="pred_noise", beta_schedule="linear"
    )
    ema = EMA(diffusion, beta=0.999, update_every=every)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-3)
    data = torch.from_numpy(real_digits()).float().reshape(-1, 1, 8, 8)  # the peer normalises [0, 1] itself
    if threads:
        torch.set_num_threads(threads)
    else:
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
    samples = {}
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            x = torch.cat([ema.ema_model.sample(batch_size=500) for _ in range(NUM_SAMPLES // 500)])
        samples[str(seed)] = x.reshape(NUM_SAMPLES, -1).double().numpy()
    np.savez(out, **samples)
    Path(out + ".json").write_text(json.dumps({
        "params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
        "threads": threads, "steps": steps,
    }))  # fmt: skip


PEERS = {  # name: (ema update_every, what it is)
    "peer": (1, "denoising-diffusion-pytorch 2.3.4, Unet(dim=32, dim_mults=(1, 2, 2)), EMA 0.999 every step"),
    "peer_every10": (10, "denoising-diffusion-pytorch 2.3.4, the same, its Trainer's EMA update_every=10"),
}


def peer_installed() -> bool:
    try:
        import denoising_diffusion_pytorch  # noqa: F401
        import ema_pytorch  # noqa: F401
    except ImportError:
        print(
            "peer skipped: denoising-diffusion-pytorch is not installed "
            "(pip install denoising-diffusion-pytorch==2.3.4 to compare with it)",
            flush=True,
        )
        return False
    return True


def run_peer(name: str, workdir: Path, threads: int | None, seeds: list[int]) -> subprocess.Popen:
    out = str(workdir / f"{name}.npz")
    cmd = [sys.executable, __file__, "--worker", name, "--worker-out", out, "--seeds", *map(str, seeds)]
    if threads:
        cmd += ["--threads", str(threads)]
    log = open(workdir / f"{name}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish_peer(name: str, workdir: Path, proc: subprocess.Popen) -> dict:
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{(workdir / f'{name}.log').read_text()[-3000:]}")
    out = str(workdir / f"{name}.npz")
    info = json.loads(Path(out + ".json").read_text())
    with np.load(out) as f:
        samples = {int(k): f[k] for k in f.files}
    return {"name": name, "overrides": [PEERS[name][1]], **info, "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["current", "peer", "linear", "peer_every10", "previous"])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "first_run.json"))
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for an extra ddpmlab contestant 'trial'")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="sampling seeds (the median is reported)")
    ap.add_argument("--side-by-side", action="store_true", help="start every contestant together, one thread each")
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return peer_worker(args.worker_out, PEERS[args.worker][0], 1500, args.threads, args.seeds)
    reference = real_digits()[1::2]  # 898 digits
    names = [n for n in args.only if n not in PEERS or peer_installed()]
    threads = 1 if args.side_by_side else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        batches = [names] if args.side_by_side else [[n] for n in names]
        for batch in batches:
            started = {}
            for name in batch:
                overrides = {"current": [], "linear": ["schedule=linear"], "previous": PREVIOUS_DEFAULTS,
                             "trial": args.extra}.get(name)  # fmt: skip
                proc = (
                    run_peer(name, workdir, threads, args.seeds)
                    if name in PEERS
                    else run_ddpmlab(name, overrides, workdir, threads)
                )
                started[name] = (proc, time.perf_counter(), overrides)
            ended = {}
            while len(ended) < len(started):  # each contestant's own end, whichever finishes first
                for name, (proc, start, _) in started.items():
                    if name not in ended and proc.poll() is not None:
                        ended[name] = time.perf_counter() - start
                time.sleep(0.2)
            for name, (proc, _, overrides) in started.items():
                seconds = ended[name]
                row = (
                    finish_peer(name, workdir, proc)
                    if name in PEERS
                    else finish_ddpmlab(name, overrides, workdir, proc, seconds, args.seeds)
                )
                fds = [frechet_distance(row["samples"][seed], reference) for seed in args.seeds]
                row.pop("samples")
                row["fd_pixels"] = round(float(np.median(fds)), 4)
                row["fd_pixels_by_seed"] = [round(v, 4) for v in fds]
                rows.append(row)
                print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    result = {
        "command": "python bench/first_run.py " + " ".join(sys.argv[1:]),
        "commit": commit.strip(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "protocol": f"1,000 DDIM-50 samples per sampling seed {args.seeds}, Frechet distance in 64-d pixel space to "
        "the 898 digits of odd index, median over the seeds; "
        + ("all contestants started together, one thread each" if args.side_by_side else "one after the other"),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
