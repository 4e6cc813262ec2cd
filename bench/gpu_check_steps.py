"""What ``bench/gpu_check.sh`` computes between its steps, and its JSON summary.

Each subcommand reads what a step left behind (a run directory, a JUnit file, a benchmark's JSON), writes the
step's numbers to a small JSON file and exits 0 (ok), 1 (failed) or 3 (skipped: nothing to check here, e.g.
every GPU test skipped on a CPU). ``record`` merges a step into the summary after every step, so a run cut off
by its time limit still leaves every finished step's result. Only the standard library is imported at the top:
``record`` runs between steps and must not cost an import of torch.

    python bench/gpu_check_steps.py show SUMMARY.json      # the summary as a short table
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# The order gpu_check.sh runs them in (most important first, so a cut-off run keeps what matters most).
STEPS = (
    "setup",
    "env",
    "pytest_gpu",
    "train_cli",
    "loss_curve",
    "sample_cli",
    "evaluate_bpd",
    "train_throughput",
    "sample_throughput",
)
OK, FAILED, SKIPPED = 0, 1, 3
# Speed targets for the 35.7M DDPM CIFAR-10 U-Net on one H100, bf16 (bench/README.md).
TARGETS = {
    "train_img_per_s": ("train_throughput", ("trainer", "img_per_s"), 5500.0, "Trainer path with EMA, batch 128"),
    "train_vs_peer": ("train_throughput", ("ratio", "trainer_vs_peer"), 2.0, "Trainer path / diffusers peer"),
    "sample_img_per_s": ("sample_throughput", ("ddpmlab", "img_per_s"), 650.0, "DDIM-50, batch 256"),
    "sample_vs_peer": ("sample_throughput", ("ratio", "ddpmlab_vs_peer"), 2.0, "DDIM-50 / diffusers peer"),
}
# bf16 network against the fp32 eager one, same x_T, DDIM (deterministic): mean |difference| on [0, 1].
SAMPLE_MEAN_ABS_TOL = 0.02


def write_json(path: str | Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def dig(data: dict, keys: tuple[str, ...]):
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("nvidia", "")).strip("-") or "unknown"


def result_name(summary: dict) -> str:
    gpu = dig(summary, ("steps", "env", "gpu")) if summary.get("mode") == "cuda" else "cpu"
    return f"{summary['date'][:10]}-{slug(gpu or 'unknown-gpu')}"


def commit_of(repo: Path) -> str:
    """The commit the check measures: git's, where the checkout has its history, else the stamp that
    bench/prepare_device.sh wrote (the GPU machine gets the working tree without .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=repo, timeout=10).returncode
            return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = repo / ".gpu_check" / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


# ----------------------------------------------------------------------------------------------- the summary
def cmd_init(a) -> int:
    summary = {
        "check": "gpu_check",
        "mode": a.mode,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit_of(Path(a.repo)),
        "budget_s": a.budget,
        "command": a.command,
        "finished": False,
        "steps": {name: {"status": "pending"} for name in STEPS},
    }
    summary["result_name"] = result_name(summary)
    write_json(a.summary, summary)
    return OK


def cmd_record(a) -> int:
    summary = read_json(a.summary)
    step = {"status": a.status}
    if a.seconds is not None:
        step["seconds"] = round(a.seconds, 1)
    if a.reason:
        step["reason"] = a.reason
    if a.detail and Path(a.detail).is_file():
        step.update(read_json(a.detail))
        step["status"] = a.status  # the runner's verdict (e.g. timeout) wins over the detail's
    if a.status in ("failed", "timeout") and a.log and Path(a.log).is_file():
        with open(a.log, errors="replace") as f:
            f.seek(a.log_offset)
            step["log_tail"] = f.read().splitlines()[-30:]
    summary["steps"][a.name] = step
    summary["result_name"] = result_name(summary)
    write_json(a.summary, summary)
    return OK


def cmd_finish(a) -> int:
    summary = read_json(a.summary)
    steps = summary["steps"]
    summary["elapsed_s"] = round(a.elapsed, 1)
    summary["result_name"] = result_name(summary)
    summary["finished"] = True  # the run reached its end (a run cut off keeps False)
    summary["failed_steps"] = [name for name, s in steps.items() if s["status"] not in ("ok", "skipped")]
    if summary["mode"] == "cuda":
        targets = {}
        for key, (step, path, target, what) in TARGETS.items():
            measured = dig(steps.get(step, {}), ("result", *path))
            targets[key] = {
                "what": what,
                "target": target,
                "measured": measured,
                "met": None if measured is None else measured >= target,
            }
        summary["targets"] = targets
        summary["targets_note"] = "targets are set for an H100 (SXM, bf16); the GPU is " + str(
            dig(steps, ("env", "gpu"))
        )
    else:
        summary["targets"] = None
        summary["targets_note"] = "CPU dry run: tiny sizes, the speed targets do not apply"
    write_json(a.summary, summary)
    print(show(summary))
    return FAILED if summary["failed_steps"] else OK


def show(summary: dict) -> str:
    lines = [
        f"gpu_check ({summary['mode']}) {summary['date']} commit {summary['commit']}: "
        f"{'finished' if summary.get('finished') else 'CUT OFF'} in {summary.get('elapsed_s')} s, "
        f"failed: {summary.get('failed_steps')}"
    ]
    for name, s in summary["steps"].items():
        extra = s.get("reason") or s.get("headline") or ""
        lines.append(f"  {name:<18} {s['status']:<8} {str(s.get('seconds', '')):>7}  {extra}")
    for key, t in (summary.get("targets") or {}).items():
        lines.append(f"  target {key:<18} {t['measured']} (>= {t['target']}): {t['met']}")
    lines.append(f"  result name: {summary.get('result_name')}")
    return "\n".join(lines)


def cmd_show(a) -> int:
    print(show(read_json(a.summary)))
    return OK


# ------------------------------------------------------------------------------------------------- the steps
def cmd_env(a) -> int:
    import importlib.metadata as md
    import platform

    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    for package in ("lightning", "hydra-core", "omegaconf", "torchmetrics", "diffusers", "torch-fidelity", "ddpmlab"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_GiB=round(props.total_memory / 2**30, 1),
        )
        query = "driver_version,clocks.max.sm,clocks.sm,temperature.gpu,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
        if smi.returncode == 0:
            values = [v.strip() for v in smi.stdout.splitlines()[0].split(",")]
            env.update(
                dict(
                    zip(("driver", "sm_clock_max", "sm_clock_now", "temperature", "power_limit"), values, strict=False)
                )
            )
    env["headline"] = f"{env.get('gpu', 'cpu')}, torch {env['torch']}, CUDA {env['cuda']}, driver {env.get('driver')}"
    write_json(a.out, env)
    print(json.dumps(env))
    if a.mode == "cuda" and not env["cuda_available"]:
        print("no CUDA device is visible: run the dry run with --cpu on a machine without a GPU", file=sys.stderr)
        return FAILED
    return OK


def cmd_levers(a) -> int:
    """Hydra overrides that force every perf lever on (or off) in conf/<config>.yaml's ``perf`` section, read
    from the composed config (so a lever added there is covered); none when the config has no ``perf``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        from ddpmlab.config import CONFIG_DIR  # without torch: this runs between steps
    except ImportError:
        from ddpmlab.api import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=a.config)
    overrides = []

    def force(section, prefix: str) -> None:  # perf and its nested sections (perf.sampling)
        for key, value in (section or {}).items():
            if key == "precision":
                overrides.append(f"{prefix}.precision={'bf16' if a.state == 'on' else 'fp32'}")
            elif hasattr(value, "items"):
                force(value, f"{prefix}.{key}")
            elif value in ("auto", True, False):
                overrides.append(f"{prefix}.{key}={'true' if a.state == 'on' else 'false'}")

    force(cfg.get("perf"), "perf")
    if "precision" in cfg and a.config != "train":  # a sampling precision outside perf
        overrides.append(f"precision={'bf16' if a.state == 'on' else 'fp32'}")
    print("\n".join(overrides))
    return OK


def cmd_pytest(a) -> int:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if Path(a.junit).is_file():
        for suite in ET.parse(a.junit).getroot().iter("testsuite"):
            tests = int(suite.get("tests", 0))
            for k in ("failures", "errors", "skipped"):
                counts["failed" if k == "failures" else k] += int(suite.get(k, 0))
            counts["passed"] += tests - sum(int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
    detail = {**counts, "pytest_exit": a.rc, "headline": ", ".join(f"{v} {k}" for k, v in counts.items() if v)}
    write_json(a.out, detail)
    if a.rc not in (0, 5) or counts["failed"] or counts["errors"]:
        return FAILED
    return OK if counts["passed"] else SKIPPED


def cmd_train_cli(a) -> int:
    run = Path(a.run_dir)
    final = read_json(run / "final_metrics.json") if (run / "final_metrics.json").is_file() else {}
    rows = list(csv.DictReader(open(run / "metrics.csv"))) if (run / "metrics.csv").is_file() else []
    rates = [float(r["train/img_per_sec"]) for r in rows if r.get("train/img_per_sec")]
    detail = {
        "steps": final.get("step"),
        "expected_steps": a.max_steps,
        "val_loss": final.get("val/loss"),
        "last_checkpoint": (run / "checkpoints" / "last.ckpt").is_file(),
        "img_per_s_logged": round(rates[-1], 1) if rates else None,
        "overrides": a.overrides.split() if a.overrides else [],
    }
    detail["headline"] = f"{detail['steps']} steps, val/loss {detail['val_loss']}, {detail['img_per_s_logged']} img/s"
    write_json(a.out, detail)
    finite = math.isfinite(detail["val_loss"] if detail["val_loss"] is not None else math.nan)
    good = detail["steps"] == a.max_steps and detail["last_checkpoint"] and finite
    return OK if good else FAILED


def cmd_loss_curve(a) -> int:
    """The training loss falls: the mean of the last third of the logged values is below the first third's."""
    rows = list(csv.DictReader(open(a.metrics)))
    losses = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    third = max(1, len(losses) // 3)
    first = sum(v for _, v in losses[:third]) / third if losses else math.nan
    last = sum(v for _, v in losses[-third:]) / third if losses else math.nan
    every = max(1, len(losses) // 20)
    detail = {
        "logged_values": len(losses),
        "first_third_mean": round(first, 5),
        "last_third_mean": round(last, 5),
        "ratio": round(last / first, 4) if first else None,
        "falls": bool(math.isfinite(last) and len(losses) >= 3 and last < first),
        "curve": [[s, round(v, 5)] for s, v in losses[::every]],
    }
    detail["headline"] = f"train/loss {detail['first_third_mean']} -> {detail['last_third_mean']}"
    write_json(a.out, detail)
    return OK if detail["falls"] else FAILED


def cmd_compare(a) -> int:
    """Samples of the fast path against the fp32 eager ones (same checkpoint, seed and sampler)."""
    import numpy as np

    fast = np.load(Path(a.fast) / "samples.npz")["images"].astype(np.float64) / 255
    eager = np.load(Path(a.eager) / "samples.npz")["images"].astype(np.float64) / 255
    diff = np.abs(fast - eager)
    detail = {
        "cli_fast_path": a.cli_fast_path,
        "num_samples": int(fast.shape[0]),
        "shape": list(fast.shape[1:]),
        "max_abs_diff": round(float(diff.max()), 5),
        "mean_abs_diff": round(float(diff.mean()), 6),
        "frac_pixels_over_0.1": round(float((diff > 0.1).mean()), 6),
        "tolerance": f"mean |fast - fp32 eager| on [0, 1] <= {SAMPLE_MEAN_ABS_TOL}",
        "fast_overrides": a.fast_overrides.split() if a.fast_overrides else [],
        "eager_overrides": a.eager_overrides.split() if a.eager_overrides else [],
    }
    within = detail["mean_abs_diff"] <= SAMPLE_MEAN_ABS_TOL
    detail["headline"] = f"max |diff| {detail['max_abs_diff']}, mean {detail['mean_abs_diff']} on [0, 1]"
    if a.mode == "cuda" and not a.cli_fast_path:
        detail["reason"] = "sample.py has no fast sampling path (sample.yaml has no perf section): both runs were eager"
        within = False
    write_json(a.out, detail)
    return OK if within else FAILED


def cmd_bpd(a) -> int:
    metrics = read_json(a.metrics)
    bpd = metrics.get("bpd", {})
    value = bpd.get("value")
    detail = {
        "bpd": value,
        "stderr": bpd.get("stderr"),
        "n": bpd.get("n"),
        "seconds_in_evaluate": bpd.get("seconds"),
        "timesteps_per_image": dig(bpd, ("protocol", "timesteps_per_image")),
        "headline": f"{value} bits/dim on {bpd.get('n')} images",
    }
    write_json(a.out, detail)
    return OK if value is not None and math.isfinite(value) and value > 0 else FAILED


def cmd_speed(a) -> int:
    """The benchmark's JSON (profile tables left out), with a headline."""
    result = read_json(a.result)
    for part in result.values():
        if isinstance(part, dict):
            part.pop("profile", None)
    paths = ("trainer", "bare", "peer") if result.get("bench") == "train" else ("ddpmlab", "peer")
    rates = {p: dig(result, (p, "img_per_s")) for p in paths if p in result}
    finite = all(dig(result, (p, "finite")) is not False for p in paths)
    detail = {"result": result, "headline": ", ".join(f"{p} {v} img/s" for p, v in rates.items())}
    write_json(a.out, detail)
    return OK if rates and all(v and v > 0 for v in rates.values()) and finite else FAILED


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init")
    s.add_argument("summary")
    s.add_argument("--mode", choices=("cuda", "cpu"), required=True)
    s.add_argument("--repo", default=".")
    s.add_argument("--budget", type=float, required=True)
    s.add_argument("--command", default="")
    s = sub.add_parser("record")
    s.add_argument("summary")
    s.add_argument("--name", choices=STEPS, required=True)
    s.add_argument("--status", choices=("pending", "running", "ok", "failed", "timeout", "skipped"), required=True)
    s.add_argument("--seconds", type=float)
    s.add_argument("--reason")
    s.add_argument("--detail")
    s.add_argument("--log")
    s.add_argument("--log-offset", type=int, default=0)
    s = sub.add_parser("finish")
    s.add_argument("summary")
    s.add_argument("--elapsed", type=float, required=True)
    s = sub.add_parser("show")
    s.add_argument("summary")
    s = sub.add_parser("env")
    s.add_argument("--mode", choices=("cuda", "cpu"), required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("levers")
    s.add_argument("--config", choices=("train", "sample", "evaluate"), required=True)
    s.add_argument("--state", choices=("on", "off"), required=True)
    s = sub.add_parser("pytest")
    s.add_argument("--junit", required=True)
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("train-cli")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--max-steps", type=int, required=True)
    s.add_argument("--overrides", default="")
    s.add_argument("--out", required=True)
    s = sub.add_parser("loss-curve")
    s.add_argument("--metrics", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("compare")
    s.add_argument("--fast", required=True)
    s.add_argument("--eager", required=True)
    s.add_argument("--mode", choices=("cuda", "cpu"), required=True)
    s.add_argument("--cli-fast-path", type=lambda v: v == "1", required=True)
    s.add_argument("--fast-overrides", default="")
    s.add_argument("--eager-overrides", default="")
    s.add_argument("--out", required=True)
    s = sub.add_parser("bpd")
    s.add_argument("--metrics", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--result", required=True)
    s.add_argument("--out", required=True)
    a = p.parse_args(argv)
    return globals()["cmd_" + a.cmd.replace("-", "_")](a)


if __name__ == "__main__":
    sys.exit(main())
