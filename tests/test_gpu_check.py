"""bench/gpu_check.sh, the one-command GPU check, run as its CPU dry run (tiny sizes, no GPU, no download), so the
script keeps working between GPU runs; and bench/results_table.py, which turns GPU runs into the README's table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fixtures_data import make_idx_dataset

STEPS = [
    "setup",
    "env",
    "pytest_gpu",
    "train_cli",
    "loss_curve",
    "sample_cli",
    "evaluate_bpd",
    "train_throughput",
    "sample_throughput",
]


def gpu_check(out: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", *args],
        env=env,
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary


def results_table(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "results_table.py"), *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    """Every step runs for real on tiny sizes (IDX files in MNIST's format, unet_tiny) and reports its numbers."""
    make_idx_dataset(tmp_path / "data", "MNIST", n_train=256, n_val=32)
    proc, summary = gpu_check(tmp_path / "out", "--data-root", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = summary["steps"]
    assert list(steps) == STEPS
    expected = {name: "ok" for name in STEPS}
    expected["pytest_gpu"] = "ok" if torch.cuda.is_available() else "skipped"  # the GPU tests skip themselves
    assert {n: s["status"] for n, s in steps.items()} == expected, json.dumps(steps, indent=1)[:4000]
    assert summary["mode"] == "cpu" and summary["finished"] and summary["failed_steps"] == []
    assert summary["targets"] is None and summary["result_name"].endswith("-cpu")
    assert len(summary["commit"]) >= 40

    assert steps["env"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert steps["pytest_gpu"]["skipped"] >= 1 and steps["pytest_gpu"]["passed"] == 0
    assert steps["train_cli"]["steps"] == steps["train_cli"]["expected_steps"] == 20
    assert steps["train_cli"]["last_checkpoint"]
    curve = steps["loss_curve"]
    assert curve["falls"] and curve["last_third_mean"] < curve["first_third_mean"]
    # On a CPU both sample.py runs are fp32 eager: the same seed gives exactly the same samples.
    assert steps["sample_cli"]["num_samples"] == 16 and steps["sample_cli"]["shape"] == [28, 28, 1]
    assert steps["sample_cli"]["max_abs_diff"] == 0.0
    assert 0 < steps["evaluate_bpd"]["bpd"] < 20 and steps["evaluate_bpd"]["n"] == 4
    train, sample = steps["train_throughput"]["result"], steps["sample_throughput"]["result"]
    for part in ("trainer", "bare", "peer"):
        assert train[part]["img_per_s"] > 0
    assert sample["ddpmlab"]["img_per_s"] > 0 and sample["ddpmlab"]["finite"]
    assert set(os.listdir(tmp_path / "out")) == {
        "summary.json",
        "gpu_check.log",
        "metrics.csv",
        "train_grid.png",
        "sample_grid.png",
    }
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "===== pytest_gpu" in log and "===== evaluate_bpd" in log and "===== sample_throughput" in log

    # The same summary as a GPU run would write it goes into the results table with its numbers.
    summary["mode"] = "cuda"
    summary["steps"]["env"]["gpu"] = "NVIDIA H100 80GB HBM3"
    summary["result_name"] = summary["date"][:10] + "-h100-80gb-hbm3"
    (tmp_path / "gpu.json").write_text(json.dumps(summary))
    added = results_table(
        "--results",
        str(tmp_path / "results"),
        "--add",
        str(tmp_path / "gpu.json"),
        "--grid",
        str(tmp_path / "out" / "sample_grid.png"),
    )
    assert added.returncode == 0, added.stderr
    name = summary["result_name"]
    assert sorted(os.listdir(tmp_path / "results")) == [name + ".json", name + ".png"]
    rows = [line for line in added.stdout.splitlines() if line.startswith(f"| {summary['date'][:10]}")]
    assert len(rows) == 1 and "NVIDIA H100 80GB HBM3" in rows[0] and summary["commit"][:10] in rows[0]
    assert f"{train['trainer']['img_per_s']:,.0f}" in rows[0]
    assert ("9/9 ok" if torch.cuda.is_available() else "8/9 ok; skipped: pytest_gpu") in rows[0]


def test_failed_step_keeps_its_log_and_skips_what_needs_it(tmp_path):
    (tmp_path / "empty").mkdir()
    proc, summary = gpu_check(
        tmp_path / "out", "--data-root", str(tmp_path / "empty"), "--only", "train_cli,sample_cli", timeout=180
    )
    assert proc.returncode == 1, proc.stderr  # a step failed
    steps = summary["steps"]
    assert steps["setup"]["status"] == steps["env"]["status"] == "ok"  # always run
    assert steps["train_cli"]["status"] == "failed"
    assert any("no MNIST files" in line for line in steps["train_cli"]["log_tail"])
    assert steps["sample_cli"] == {"status": "skipped", "reason": "needs train_cli, which is failed"}
    assert steps["evaluate_bpd"]["reason"] == "not in --only"
    assert summary["failed_steps"] == ["train_cli"]


def test_spent_budget_skips_steps_and_still_writes_the_summary(tmp_path):
    proc, summary = gpu_check(tmp_path / "out", "--budget", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert summary["finished"]
    for name in STEPS:
        step = summary["steps"][name]
        assert step["status"] == "skipped", (name, step)
        assert step["reason"].startswith("budget spent") or step["reason"].startswith("needs "), (name, step)
    assert summary["steps"]["setup"]["reason"].startswith("budget spent")


def test_results_table_without_results_gives_the_call(tmp_path):
    proc = results_table("--results", str(tmp_path))
    assert proc.returncode == 0
    assert "has not been run on a GPU yet" in proc.stdout and "bash bench/gpu_check.sh" in proc.stdout
    cpu = {"check": "gpu_check", "mode": "cpu", "date": "2026-01-01T00:00:00Z", "steps": {}}
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    refused = results_table("--results", str(tmp_path / "results"), "--add", str(tmp_path / "cpu.json"))
    assert refused.returncode != 0 and "not the summary of a GPU run" in refused.stderr


def test_readme_performance_table_is_current():
    proc = results_table("--readme", str(REPO / "README.md"), "--check")
    assert proc.returncode == 0, proc.stdout


def test_finish_judges_the_speed_targets_of_a_gpu_run(tmp_path):
    steps = {name: {"status": "skipped", "reason": "not in --only"} for name in STEPS}
    steps["env"] = {"status": "ok", "gpu": "NVIDIA H100 80GB HBM3"}
    steps["train_throughput"] = {
        "status": "ok",
        "result": {"trainer": {"img_per_s": 6000.0}, "ratio": {"trainer_vs_peer": 1.5}},
    }
    steps["sample_throughput"] = {"status": "timeout"}
    summary = {"check": "gpu_check", "mode": "cuda", "date": "2026-01-02T03:04:05Z", "commit": "0" * 40, "steps": steps}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check_steps.py"),
            "finish",
            str(tmp_path / "summary.json"),
            "--elapsed",
            "500",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr  # sample_throughput timed out
    done = json.loads((tmp_path / "summary.json").read_text())
    targets = done["targets"]
    assert targets["train_img_per_s"] == {**targets["train_img_per_s"], "measured": 6000.0, "met": True}
    assert targets["train_vs_peer"]["met"] is False and targets["train_vs_peer"]["target"] == 2.0
    assert targets["sample_img_per_s"]["measured"] is None and targets["sample_img_per_s"]["met"] is None
    assert done["failed_steps"] == ["sample_throughput"] and done["finished"]
    assert "NVIDIA H100 80GB HBM3" in done["targets_note"]
