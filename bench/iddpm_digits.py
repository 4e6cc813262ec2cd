"""Improved DDPM and classifier guidance, measured on scikit-learn's bundled 8x8 digits (CPU-sized).

    python bench/iddpm_digits.py --steps 800 --out outputs/iddpm_digits [--num-samples 1000]

1. Trains three unet_small models with the same step budget (linear schedule, T = 1000): objective=simple
   (fixed variance), objective=hybrid and objective=vlb (both model.learn_sigma=true; vlb with the importance
   sampler), and the noisy classifier (experiment=classifier_digits). A run directory that already holds
   checkpoints/last.ckpt is reused, so the script can be re-run to redo only the measurements.
2. bits/dim of each model from evaluate.py (the validation split, ``--bpd-stride``; variance auto: learned for
   the learned-sigma models, beta for the fixed one).
3. Frechet distance in pixel space (64-d, images in [0, 1] after uint8 quantisation) of ``--num-samples``
   ancestral samples to all 1,797 real digits, at 25 / 50 / 100 respaced steps: learned variance (hybrid, vlb)
   beside fixed small / large variances (simple; hybrid forced to fixed). The floor: the same count of real
   digits drawn with replacement (mean of 5 draws) against all of them.
4. Classifier guidance of the simple model at s in {0, 1, 3, 10} (ancestral, Algorithm 1, and DDIM, Algorithm 2),
   labels cycling 0..9: agreement with an RBF-SVM trained on the real training split (its accuracy on the
   held-out split is reported), and the within-class pixel std (mean over classes and pixels).
Prints one JSON line; ``--json FILE`` also writes it. Sample grids (first 100 samples) go to <out>/grids/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ddpmlab.api import classifier_from_checkpoint, load, load_checkpoint  # noqa: E402
from ddpmlab.data.datasets import load_digits  # noqa: E402
from ddpmlab.images import save_grid, to_model_range, to_uint8, to_unit  # noqa: E402
from ddpmlab.samplers import Sampler  # noqa: E402
from ddpmlab.samplers.classifier_guidance import ClassifierGuidedDenoiser  # noqa: E402

RUNS = {
    "simple": ["objective=simple", "model.learn_sigma=false"],
    "hybrid": ["objective=hybrid", "model.learn_sigma=true"],
    "vlb": ["objective=vlb", "model.learn_sigma=true"],
}


def run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(REPO / script), *args]
    print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def train_all(out: Path, steps: int, classifier_steps: int) -> None:
    every = [f"trainer.val_check_interval={steps // 2}", f"callbacks.checkpoint.every_n_train_steps={steps // 2}",
             f"callbacks.sample_grid.every_n_steps={steps // 2}"]  # fmt: skip
    for name, over in RUNS.items():
        if not (out / name / "checkpoints" / "last.ckpt").is_file():
            run("train.py", *over, "schedule=linear", f"trainer.max_steps={steps}", *every,
                "trainer.enable_progress_bar=false", f"hydra.run.dir={out / name}")  # fmt: skip
    if not (out / "classifier" / "checkpoints" / "last.ckpt").is_file():
        run("train.py", "experiment=classifier_digits", "schedule=linear", f"trainer.max_steps={classifier_steps}",
            f"trainer.val_check_interval={classifier_steps // 2}", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={out / 'classifier'}")  # fmt: skip


def bpd(out: Path, stride: int) -> dict:
    result = {}
    for name in RUNS:
        ev = out / "eval" / name
        if not (ev / "metrics.json").is_file():  # reused when present, as the checkpoints are
            run(
                "evaluate.py",
                f"ckpt_path={out / name / 'checkpoints' / 'last.ckpt'}",
                f"bpd.stride={stride}",
                f"hydra.run.dir={ev}",
            )
        m = json.loads((ev / "metrics.json").read_text())["bpd"]
        result[name] = {
            "bpd": round(m["value"], 4),
            "stderr": round(m["stderr"], 4),
            "terms": m["terms"],
            "variance": m["protocol"]["variance"],
            "n": m["n"],
        }
    result["protocol"] = f"evaluate.py bpd.stride={stride}: validation split (180 images), stratified t, EMA weights"
    return result


def pixels(images: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] in [-1, 1] -> [N, C*H*W] float64 in [0, 1], quantised to uint8 as saved samples are."""
    return to_uint8(images).double().flatten(1).numpy() / 255.0


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), via the eigenvalues of S_a S_b (real, >= 0)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def draw(denoiser, sampler: Sampler, n: int, seed: int, labels: torch.Tensor | None = None, batch: int = 500):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo in range(0, n, batch):
        m = min(batch, n - lo)
        x_T = torch.randn(m, 1, 8, 8, generator=g)
        cond = None if labels is None else labels[lo : lo + m]
        out.append(sampler(denoiser, x_T, generator=g, cond=cond))
    return torch.cat(out)


def fd_table(out: Path, real: np.ndarray, n: int, steps_list: list[int], cases: list[str]) -> dict:
    rng = np.random.default_rng(0)
    floor = [frechet(real[rng.integers(0, len(real), n)], real) for _ in range(5)]
    result = {"real_vs_real_floor": round(float(np.mean(floor)), 3), "num_samples": n,
              "reference": f"all {len(real)} digits"}  # fmt: skip
    for name, variance in (case.split("/") for case in cases):
        denoiser, _ = load(out / name / "checkpoints" / "last.ckpt")
        for steps in steps_list:
            start = time.perf_counter()
            images = draw(denoiser, Sampler("ddpm", steps, "leading", variance=variance), n, seed=1)
            key = f"{name}/{variance}/{steps}"
            result[key] = round(frechet(pixels(images), real), 3)
            print(f"FD {key}: {result[key]} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
            if steps == 50:
                save_grid(to_unit(images[:100]), out / "grids" / f"{name}_{variance}_{steps}.png", nrow=10)
    return result


def guidance_table(out: Path, n: int, scales: list[float], steps: int, algorithms: list[str]) -> dict:
    from sklearn.svm import SVC

    images, labels = load_digits()  # uint8 [N,1,8,8], as the data module holds them
    x = images.double().flatten(1).numpy() / 255.0
    y = labels.numpy()
    perm = np.random.default_rng(0).permutation(len(y))
    train_idx, test_idx = perm[: len(y) - 300], perm[len(y) - 300 :]
    svm = SVC(kernel="rbf", C=10.0, gamma="scale").fit(x[train_idx], y[train_idx])
    result = {
        "svm_heldout_accuracy": round(float((svm.predict(x[test_idx]) == y[test_idx]).mean()), 4),
        "real_within_class_std": round(within_class_std(x, y), 4),
        "num_samples": n,
        "steps": steps,
    }
    denoiser, _ = load(out / "simple" / "checkpoints" / "last.ckpt")
    classifier, _, ccfg = classifier_from_checkpoint(load_checkpoint(out / "classifier" / "checkpoints" / "last.ckpt"))
    want = torch.arange(10).repeat(n // 10 + 1)[:n]
    for algorithm in algorithms:
        for s in scales:
            start = time.perf_counter()
            guided = ClassifierGuidedDenoiser(denoiser, classifier, s)
            samples = pixels(draw(guided, Sampler(algorithm, steps, "leading"), n, seed=2, labels=want))
            agree = float((svm.predict(samples) == want.numpy()).mean())
            key = f"{algorithm}/s={s:g}"
            spread = within_class_std(samples, want.numpy())
            result[key] = {"agreement": round(agree, 4), "within_class_std": round(spread, 4)}
            print(f"guidance {key}: {result[key]} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
            order = np.argsort(want.numpy()[:100], kind="stable")
            shown = torch.from_numpy(samples[:100][order]).float().view(-1, 1, 8, 8)  # one column per class
            save_grid(shown, out / "grids" / f"guided_{algorithm}_s{s:g}.png", nrow=10)
    return result


def within_class_std(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([x[y == k].std(0).mean() for k in np.unique(y)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "iddpm_digits")
    p.add_argument("--steps", type=int, default=400, help="training steps of each diffusion model")
    p.add_argument("--classifier-steps", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--bpd-stride", type=int, default=10)
    p.add_argument("--fd-steps", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--fd-cases", nargs="+", default=["simple/small", "simple/large", "hybrid/learned", "hybrid/small",
                   "vlb/learned"], help="model/variance pairs")  # fmt: skip
    p.add_argument("--guidance-algorithms", nargs="+", default=["ddpm", "ddim"])
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    p.add_argument("--guidance-steps", type=int, default=50)
    p.add_argument("--parts", default="train,bpd,fd,guidance")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    result = {"steps": args.steps, "classifier_steps": args.classifier_steps, "model": "unet_small",
              "schedule": "linear, T=1000", "command": " ".join(sys.argv)}  # fmt: skip
    if "train" in parts:
        train_all(args.out, args.steps, args.classifier_steps)
    if "bpd" in parts:
        result["bpd"] = bpd(args.out, args.bpd_stride)
    if "fd" in parts:
        real = pixels(to_model_range(load_digits()[0]))
        result["frechet_pixels"] = fd_table(args.out, real, args.num_samples, args.fd_steps, args.fd_cases)
    if "guidance" in parts:
        result["classifier_guidance"] = guidance_table(
            args.out, args.num_samples, args.scales, args.guidance_steps, args.guidance_algorithms
        )
    print(json.dumps(result))
    if args.json:  # parts run one after another accumulate in one file
        merged = json.loads(args.json.read_text()) if args.json.is_file() else {}
        commands = merged.get("command", [])
        for key, value in result.items():
            both = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if both else value
        merged["command"] = [*([commands] if isinstance(commands, str) else commands), result["command"]]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
