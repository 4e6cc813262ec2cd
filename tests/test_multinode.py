"""Multi-node training and evaluation, simulated on one machine as Lightning's own tests do: two torchrun "nodes" on
localhost (static and c10d rendezvous), two processes given the environment of a 2-node SLURM allocation (what
``srun`` sets; Lightning's SLURMEnvironment reads it), gloo on the CPU.

- 2 nodes x 1 process, 1 node x 2 processes and 1 process accumulating 2 micro-batches train on the same items with
  the same noise: the same loss for every micro-batch, the same weights, grids, FID and step count;
- the run directory Hydra names from each process's clock is rank 0's on every rank;
- a requeue signal on a SLURM job saves at a step boundary, requeues, and the second start continues exactly;
- a rank that dies stops the others within seconds with one line naming it; its last checkpoint resumes, on another
  layout where that continues exactly, and a layout that would not is refused with the reason;
- ranks started with different configs are refused, both values shown;
- evaluate.py metrics=[fid] across 2 nodes draws each sample once and gives the one-process value;
- the submitit launcher's local executor runs a 2-job sweep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_cfg
from ddpmlab.errors import CheckpointError
from ddpmlab.training import train

pytestmark = pytest.mark.ddp
TESTS = Path(__file__).parent
TIMEOUT = 150  # seconds for any one multi-process run: a hang fails the test

# 8 optimizer steps of the tiny U-Net; a grid, a checkpoint and a validation every 4
RUN = [
    "model=unet_tiny", "schedule.num_timesteps=50", "data.batch_size=16", "trainer.max_steps=8",
    "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "extras.print_config=false",
    "callbacks.checkpoint.every_n_train_steps=4", "callbacks.sample_grid.every_n_steps=4",
    "callbacks.sample_grid.num_samples=4", "callbacks.sample_grid.num_steps=5",
    "callbacks.denoising_chain.num_images=2",
]  # fmt: skip
DDP = ["trainer=ddp", "trainer.accelerator=cpu"]


def losses(out: Path) -> list[str]:
    """Each rank records the loss of every micro-batch it trains (ddp_helpers.RecordLosses) in ``out``."""
    return ["+callbacks.losses._target_=ddp_helpers.RecordLosses", f"+callbacks.losses.out={out}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **extra}


def torchrun(node_rank: int, port: int, c10d: bool = False) -> list[str]:
    """One "node" of a 2-node torchrun, one process each, on localhost."""
    where = (
        ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=multinode-test"]
        if c10d
        else [f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]
    )
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", *where]


def slurm(rank: int, port: int, **extra: str) -> dict[str, str]:
    """What srun sets for task ``rank`` of a 2-node x 1-task allocation (MASTER_PORT: a free port, where Lightning
    would derive one from the job id)."""
    return env(
        SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(rank), SLURM_LOCALID="0",
        SLURM_NODEID=str(rank), SLURM_JOB_ID="4242", SLURM_JOB_NAME="train", SLURM_NODELIST="localhost",
        MASTER_PORT=str(port), **extra,
    )  # fmt: skip


def launch(commands: list[tuple[list[str], dict]], cwd: Path) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, e in commands
    ]


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """(exit status, output) of each process; every one is killed at the deadline, and the test fails."""
    deadline, results = time.monotonic() + timeout, []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        outs = []
        for p in procs:
            p.kill()
            outs.append(p.communicate()[0][-2000:])
        pytest.fail(f"a multi-process run hung for {timeout}s:\n" + "\n---\n".join(outs))
    return results


def script(name: str) -> list[str]:
    return [str(TESTS / "ddp_run.py"), str(REPO / name)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    return max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"])


def record(tmp: Path, name: str, value) -> None:
    """The numbers a test measured, printed (pytest -s) and kept beside its runs."""
    print(f"{name}: {value}")
    with open(tmp / "measured.jsonl", "a") as f:
        f.write(json.dumps({name: value}) + "\n")


# ------------------------------------------------------------------ the layout does not change the run
def test_two_nodes_one_node_of_two_and_one_process_accumulating_two_train_the_same_run(tmp_path):
    fid = [
        "callbacks=fid", "+callbacks.fid.feature._target_=test_fid.TinyFeatures", "callbacks.fid.every_n_steps=8",
        "callbacks.fid.num_samples=8", "callbacks.fid.batch_size=4", "callbacks.fid.num_steps=2",
        "callbacks.fid.num_real=200", "callbacks.fid.cache_dir=null",
    ]  # fmt: skip
    runs = {name: tmp_path / name for name in ("2x1", "1x2", "1x1")}
    for run in runs.values():
        run.mkdir()
    port = free_port()
    # two torchrun nodes, rank 1 a second late; no hydra.run.dir: Hydra names it from each process's clock
    two_nodes = [
        (torchrun(r, port) + script("train.py") + DDP + ["trainer.devices=1", "trainer.num_nodes=2", *RUN, *fid,
         *losses(tmp_path / "2x1-losses")], env(DDPMLAB_TEST_LATE="1"))
        for r in range(2)
    ]  # fmt: skip
    results = finish(launch(two_nodes, runs["2x1"]))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    [run_2x1] = (runs["2x1"] / "outputs" / "train").iterdir()  # one run directory, rank 0's
    assert sorted(p.name for p in run_2x1.glob("*.log")) == ["train.log"]  # rank 1 kept no job log of its own
    one_node = [sys.executable, str(REPO / "train.py"), *DDP, "trainer.devices=2", *RUN, *fid]
    one_node += losses(tmp_path / "1x2-losses")
    one_process = [sys.executable, str(REPO / "train.py"), "trainer.accumulate_grad_batches=2", *RUN, *fid]
    one_process += losses(tmp_path / "1x1-losses")
    outs = {}
    for cmd, run in ((one_node, runs["1x2"]), (one_process, runs["1x1"])):
        [(rc, outs[run.name])] = finish(launch([(cmd + [f"hydra.run.dir={run}"], env())], tmp_path))
        assert rc == 0, outs[run.name][-3000:]
    # Lightning's own launcher started the second process of 1x2; rank 0 alone wrote the checkpoints
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in outs["1x2"]
    for d in (run_2x1, runs["1x2"]):
        saved = sorted(p.name for p in (d / "checkpoints").iterdir())
        assert saved == ["last.ckpt", "step_0000008.ckpt"]  # the step-4 checkpoint was replaced (save_top_k 1)
        assert json.loads((d / "final_metrics.json").read_text())["step"] == 8
    dirs = {"2x1": run_2x1, "1x2": runs["1x2"], "1x1": runs["1x1"]}
    layouts = {name: json.loads((d / "layout.json").read_text()) for name, d in dirs.items()}
    assert all(len(v) == 1 and v[0]["global_batch"] == 32 for v in layouts.values())
    assert [(v[0]["nodes"], v[0]["devices"], v[0]["accumulate"]) for v in layouts.values()] == [
        (2, 1, 1), (1, 2, 1), (1, 1, 2)
    ]  # fmt: skip
    assert "layout: global batch 32 = data.batch_size 16 x 1 device x 2 nodes x accumulate 1" in results[0][1]
    # the same loss for every micro-batch of every step: the same items met the same noise
    per_batch = {}
    for name in dirs:
        merged = {}
        for f in sorted((tmp_path / f"{name}-losses").glob("losses*.json")):
            merged.update(json.loads(f.read_text()))
        per_batch[name] = merged
    assert len(per_batch["1x1"]) == 16 and per_batch["2x1"] == per_batch["1x2"] == per_batch["1x1"]
    ckpts = {name: weights(d) for name, d in dirs.items()}
    assert {c["global_step"] for c in ckpts.values()} == {8}
    assert all(c["ddpmlab_layout"]["global_batch"] == 32 for c in ckpts.values())
    # 2x1 and 1x2 run the same code on the same ranks: equal bit for bit. One process accumulating sums
    # (g0/2 + g1/2) where DDP averages (g0 + g1)/2: the same in floating point for 2 micro-batches, within rounding
    # (1e-6 of weights of order 1) for other counts.
    diffs = {"2x1 vs 1x2": max_difference(ckpts["2x1"], ckpts["1x2"]), "2x1 vs 1x1": max_difference(ckpts["2x1"], ckpts["1x1"])}  # fmt: skip  # noqa: E501
    record(tmp_path, "largest weight difference", diffs)
    assert diffs["2x1 vs 1x2"] == 0.0 and diffs["2x1 vs 1x1"] <= 1e-6
    grids = {name: (d / "grids" / "step_0000008.png").read_bytes() for name, d in dirs.items()}
    assert grids["2x1"] == grids["1x2"] == grids["1x1"]
    fids = {name: json.loads((d / "final_metrics.json").read_text())["val/fid"] for name, d in dirs.items()}
    record(tmp_path, "FID callback", fids)
    assert fids["2x1"] == pytest.approx(fids["1x1"], rel=1e-4) and fids["1x2"] == pytest.approx(fids["1x1"], rel=1e-4)


# ------------------------------------------------------------------ SLURM: requeue after pre-emption
def test_a_slurm_job_signalled_for_requeue_saves_requeues_and_its_second_start_continues_exactly(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')  # SLURM's, as far as a job sees it
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "outputs" / "train" / "job_4242"  # an sbatch script's hydra.run.dir, from SLURM_JOB_ID
    args = [*DDP, "trainer.devices=1", "trainer.num_nodes=2", *RUN, "callbacks.checkpoint.every_n_train_steps=3"]
    args += ["callbacks.sample_grid.every_n_steps=0", "trainer.val_check_interval=100000", f"hydra.run.dir={run}"]
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    port = free_port()
    first = launch(
        [([sys.executable, str(REPO / "train.py"), *args, "trainer.max_steps=100000"], slurm(r, port, PATH=path))
         for r in range(2)], tmp_path
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while not list((run / "checkpoints").glob("step_*.ckpt")) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in first), first[0].communicate()[0][-3000:]
        time.sleep(0.2)
    for p in first:  # what SLURM sends every task before the time limit (#SBATCH --signal=USR1@120)
        p.send_signal(signal.SIGUSR1)
    results = finish(first)
    assert [rc for rc, _ in results] == [128 + signal.SIGTERM] * 2, results[0][1][-3000:] + results[1][1][-3000:]
    saved = torch.load(run / "checkpoints" / "on_exception.ckpt", weights_only=True)["global_step"]
    assert saved >= 3 and f"stopped by SIGTERM at step {saved}" in results[0][1]
    assert calls.read_text().split("\n") == ["requeue 4242", ""]  # rank 0 requeued the job, once
    rows = (run / "metrics.csv").read_text().splitlines()
    # the second start: the same command (SLURM requeues it with the same arguments), three steps more
    port = free_port()
    second = [
        ([sys.executable, str(REPO / "train.py"), *args, f"trainer.max_steps={saved + 3}"],
         slurm(r, port, PATH=path, SLURM_RESTART_COUNT="1"))
        for r in range(2)
    ]  # fmt: skip
    results = finish(launch(second, tmp_path))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    resumed = weights(run)
    record(tmp_path, "requeue: steps before and after", [saved, resumed["global_step"]])
    assert resumed["global_step"] == saved + 3
    assert (run / "metrics.csv").read_text().splitlines()[: len(rows)] == rows  # its history kept
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()
    # it continued exactly: what one process (accumulating the same global batch) trains straight through
    reference = tmp_path / "straight"
    cmd = [sys.executable, str(REPO / "train.py"), *RUN, "trainer.accumulate_grad_batches=2"]
    cmd += [f"trainer.max_steps={saved + 3}", "callbacks.sample_grid.every_n_steps=0", f"hydra.run.dir={reference}"]
    [(rc, out)] = finish(launch([(cmd, env())], tmp_path))
    assert rc == 0, out[-3000:]
    difference = max_difference(resumed, weights(reference))
    record(tmp_path, "requeued vs straight, largest weight difference", difference)
    assert difference == 0.0


# ------------------------------------------------------------------ a rank that dies
def test_a_rank_that_dies_stops_the_others_in_seconds_and_its_last_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    when = tmp_path / "killed_at"
    args = [*DDP, "trainer.devices=1", "trainer.num_nodes=2", *RUN, "trainer.max_steps=100"]
    args += [
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.every_n_steps=0",
        f"hydra.run.dir={run}",
    ]
    args += ["+callbacks.kill._target_=ddp_helpers.KillAt", "+callbacks.kill.step=5", f"+callbacks.kill.when={when}"]
    port = free_port()
    nodes = launch([(torchrun(r, port, c10d=True) + script("train.py") + args, env()) for r in range(2)], tmp_path)
    (rc0, out0), (rc1, out1) = finish(nodes)
    stopped = time.time()  # the test noticed rank 0's node end: an upper bound on when it stopped
    assert rc1 != 0 and "exitcode  : -9" in out1  # torchrun's report of the killed rank
    errors = [line for line in out0.splitlines() if line.startswith("ddpmlab: error:")]
    record(tmp_path, "rank 0's line", errors)
    assert rc0 != 0 and len(errors) == 1, out0[-3000:]
    assert "at step 5, rank 1 died without a word" in errors[0] and "rank 0 stopped with it" in errors[0]
    assert f"{run}/checkpoints/last.ckpt (step 4)" in errors[0] and "ckpt_path=last" in errors[0]
    seconds = stopped - float(when.read_text())
    record(tmp_path, "seconds from the kill until the other rank's node had stopped", round(seconds, 1))
    assert seconds < 30
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()  # nothing half-saved beside the last one
    # onto one process without accumulation: another global batch, refused with the reason and how to keep it
    with pytest.raises(CheckpointError, match=r"trainer.accumulate_grad_batches=2, or pass allow_layout_change=true"):
        train(compose_cfg("train", [*RUN, "trainer.max_steps=6", "ckpt_path=last"], run))
    # onto one process accumulating 2: the same global batch of the same micro-batches, so it continues exactly
    cmd = [sys.executable, str(REPO / "train.py"), *RUN, "trainer.accumulate_grad_batches=2", "trainer.max_steps=6"]
    [(rc, out)] = finish(launch([(cmd + ["callbacks.sample_grid.every_n_steps=0", f"hydra.run.dir={run}"], env())], tmp_path))  # fmt: skip  # noqa: E501
    assert rc == 0, out[-3000:]
    assert weights(run)["global_step"] == 6
    assert [e["from_step"] for e in json.loads((run / "layout.json").read_text())] == [0, 4]


def test_ranks_started_with_different_configs_are_refused_with_both_values(tmp_path):
    port = free_port()
    nodes = [
        (torchrun(r, port) + script("train.py") + DDP + ["trainer.devices=1", "trainer.num_nodes=2", *RUN,
         f"data.batch_size={16 - 8 * r}", f"hydra.run.dir={tmp_path / 'run'}"], env())
        for r in range(2)
    ]  # fmt: skip
    for rc, out in finish(launch(nodes, tmp_path)):
        assert rc != 0
        assert "ddpmlab: error: rank 1 was started with another config than rank 0 (data.batch_size=16 on rank 0, " \
            "8 on rank 1)" in out  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ evaluation across nodes
def test_evaluate_fid_across_two_nodes_draws_each_sample_once_and_equals_one_process(tmp_path, tiny_ckpt):
    from ddpmlab.evaluation import evaluate
    from test_fid import register_tiny_fidelity_extractor

    over = [
        f"ckpt_path={tiny_ckpt}", "metrics=[fid]", "batch_size=4", "fid.num_samples=20", "fid.num_real=100",
        "fid.num_steps=3", "fid.kid_subsets=5", "fid.feature_extractor=tiny-test", "fid.feature_layer=feat",
        "fid.feature_layer_isc=logits", "fid.cache_dir=null",
    ]  # fmt: skip
    port = free_port()
    record_dir = tmp_path / "drawn"
    record_dir.mkdir()
    nodes = [
        (torchrun(r, port) + script("evaluate.py") + over + [f"hydra.run.dir={tmp_path / 'two'}"],
         env(DDPMLAB_TEST_RECORD=str(record_dir)))
        for r in range(2)
    ]  # fmt: skip
    results = finish(launch(nodes, tmp_path))
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    drawn = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert drawn == [[[0, 4], [1, 4], [2, 4]], [[3, 4], [4, 4]]]  # five chunks of 4, each drawn once
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["fid"]
    register_tiny_fidelity_extractor()
    one = evaluate(compose_cfg("evaluate", over, tmp_path / "one"), tmp_path / "one")["fid"]
    record(tmp_path, "evaluate.py FID, 2 nodes vs 1 process", [two["fid"], one["fid"]])
    for key in ("fid", "kid", "is"):
        assert two[key] == pytest.approx(one[key], rel=1e-5)
    assert two["protocol"]["devices"] == 2


# ------------------------------------------------------------------ a sweep through the submitit launcher
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=submitit_local", "seed=0,1", *RUN]
    cmd += ["trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=0", "trainer.val_check_interval=3"]
    cmd += [f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=3"]
    [(rc, out)] = finish(launch([(cmd, env())], tmp_path))
    assert rc == 0, out[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "final_metrics.json").read_text())["step"] == 3
    assert (sweep / "summary.csv").read_text().count("\n") == 3  # a header and a row per job
