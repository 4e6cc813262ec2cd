"""Training: ``train(cfg)`` builds the objects a composed ``train`` config describes and fits them.

``python train.py`` (``ddpmlab.cli.train``) is this function behind Hydra; tests and notebooks call it with a
config composed by ``hydra.compose``. Resuming (``resume_path``, ``check_resume``, ``wandb_resume``) and the
requeue hand-off (``defer_requeue``) live here too."""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from ddpmlab.callbacks.checkpoint import AtomicCheckpointIO
from ddpmlab.callbacks.finite import FiniteGuard
from ddpmlab.callbacks.ranks import Layout, RankFailedError, Ranks, check_layout
from ddpmlab.callbacks.run_lock import check_resume_source, hold, starts_the_run
from ddpmlab.checkpoint import load_checkpoint
from ddpmlab.console import apply_extras, final_summary
from ddpmlab.distributed import first_line
from ddpmlab.errors import CheckpointError, NotWritableError
from ddpmlab.fileio import write_atomic
from ddpmlab.lit.module import check_compatible
from ddpmlab.perf import apply_perf
from ddpmlab.stages import Stage, stage_of
from ddpmlab.validate import check_train_config


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model as ``cfg`` describes; return the final metrics. The CLI and the tests both call this.

    Everything that can fail on bad input fails before ``trainer.fit`` and writes nothing (but the run directory's
    lock, past the config check): the config values, the data files, the checkpoint to resume from (it exists,
    loads safely and fits the config). Another process training in the run directory is refused."""
    start = time.perf_counter()
    check_train_config(cfg)
    stage = stage_of(cfg)
    cfg, prepared = stage.prepare(cfg)  # latent diffusion: the first stage's checkpoint fixes the U-Net's input
    run_dir = Path(cfg.trainer.get("default_root_dir") or cfg.paths.output_dir)
    with hold(run_dir):  # one training at a time in a run directory, from choosing the checkpoint to resume on
        return _train(cfg, run_dir, stage, prepared, start)


def _train(cfg: DictConfig, run_dir: Path, stage: Stage, prepared, start: float) -> dict[str, float]:
    apply_extras(cfg, run_dir)  # warning filters, the config tree
    ckpt_path = resume_path(cfg, run_dir)
    if ckpt_path is not None:
        if starts_the_run():  # the other ranks of a DDP run find the directory held by their rank 0
            check_resume_source(ckpt_path)
        check_resume(ckpt_path, cfg)
    check_writable(run_dir, cfg, resuming=ckpt_path is not None)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    if not cfg.data.get("download"):  # fail on missing or corrupt data now, before any callback writes a checkpoint
        datamodule.setup("fit")
    module = stage.build_module(cfg)
    datamodule = stage.setup_data(cfg, module, datamodule, prepared)
    # First, so that a diverged step stops training before any other callback acts on its weights.
    # The ranks' agreement (config, layout) and their last words; it must see a failure before anything saves.
    ranks = Ranks(cfg.data.batch_size)
    callbacks = [FiniteGuard(), ranks, *(instantiate(c) for c in (cfg.get("callbacks") or {}).values())]
    if cfg.get("ema"):
        callbacks.append(instantiate(cfg.ema))
    loggers = [instantiate(c, **wandb_resume(c, run_dir, ckpt_path)) for c in (cfg.get("logger") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:  # LearningRateMonitor refuses a trainer with no logger; nothing to monitor into anyway
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = [AtomicCheckpointIO()]  # checkpoints written atomically in their own directory
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    if ckpt_path is not None:  # a resume onto another layout continues exactly, or is refused with the reason
        saved = load_checkpoint(ckpt_path, mmap=True).get("ddpmlab_layout")
        change = check_layout(saved, Layout.of(trainer, cfg.data.batch_size), ckpt_path, cfg.get("allow_layout_change"))
        if change:
            rank_zero_warn(f"ddpmlab: {change}")
    # GPU levers; on the CPU, the thread count
    apply_perf(module, trainer.strategy.root_device, cfg.get("perf"), stage.trained_net(module), stage.training_probe)
    if trainer.strategy.root_device.type == "cpu" and trainer.is_global_zero:
        print(f"CPU threads: {torch.get_num_threads()}", flush=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(module.config)
    requeue = defer_requeue()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning stopped at a step boundary and OnExceptionCheckpoint saved there
        if trainer.is_global_zero:
            print(
                f"stopped by SIGTERM at step {trainer.global_step}; continue with: python train.py "
                f"ckpt_path=last hydra.run.dir={run_dir} (plus this run's overrides)",
                flush=True,
            )
        requeue()
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as e:
        if trainer.world_size > 1 and not ranks.joined and isinstance(e, dist.DistError):
            env = trainer.strategy.cluster_environment
            raise RankFailedError(
                f"the {trainer.world_size} ranks did not all join at {env.main_address}:{env.main_port} "
                f"({first_line(e)}): start the same command on every node, check that each reaches that address "
                "and port (a port in use: pick another), or wait longer: trainer.strategy.timeout.seconds=<s>"
            ) from None
        if ranks.failure is None:
            raise
        furthest = furthest_checkpoint(run_dir)
        where = (
            f"the last checkpoint, {furthest[1]} (step {furthest[0]}), resumes: run the same command again with "
            f"ckpt_path=last hydra.run.dir={run_dir}"
            if furthest
            else "no checkpoint was written: start again"
        )
        raise RankFailedError(f"{ranks.failure}; {where}") from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)  # what a sweep summary reads
        write_atomic(run_dir / "final_metrics.json", json.dumps({"step": trainer.global_step, **metrics}, indent=2))
        seconds = time.perf_counter() - start
        next_command = functools.partial(stage.next_command, cfg=cfg)
        print(final_summary(trainer.global_step, seconds, metrics, last_checkpoint(trainer), next_command))
        print(f"run directory: {trainer.default_root_dir}")
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers) and trainer.is_global_zero:
        import wandb

        wandb.finish()  # the next job of a multirun (same process) starts its own W&B run
    return metrics


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The checkpoint the run ended with (``last.ckpt``), if it wrote one."""
    for cb in trainer.checkpoint_callbacks:
        if cb.dirpath and (Path(cb.dirpath) / "last.ckpt").is_file():
            return Path(cb.dirpath) / "last.ckpt"
    return None


def defer_requeue():
    """A job's requeue signal would requeue it and exit at once, wherever training is: submitit's (USR2) in a
    submitit job, SLURM's (USR1: ``#SBATCH --signal=USR1@120``, Lightning's requeue signal) in a job submitted by
    hand. Turn it into a SIGTERM, so that Lightning stops every rank at the next step boundary and saves
    on_exception.ckpt, and return a function that then requeues: submitit's own handler (requeue, exit), or rank 0's
    ``scontrol requeue <job id>``. Installed before Lightning's, so Lightning's own SLURM handler, which saves from
    inside the signal handler wherever the ranks are, stays out."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        signum = getattr(signal, f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}", None)
        handler = signal.getsignal(signum) if signum else None
        if not callable(handler):
            return lambda: None
        then = functools.partial(handler, signum, None)
    elif SLURMEnvironment.detect():
        signum, then = signal.SIGUSR1, scontrol_requeue
    else:
        return lambda: None
    received = []

    def to_sigterm(sig, frame):
        received.append(sig)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signum, to_sigterm)
    return lambda: then() if received else None


def scontrol_requeue() -> None:
    """Requeue this SLURM job (rank 0; the others only stop): it starts again with the same command."""
    if rank_zero_only.rank != 0:
        return
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        error = done.stderr.strip() if done.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        error = str(e)
    print(f"requeue of SLURM job {job}: " + (f"failed ({error})" if error else "done"), flush=True)


def checkpoint_step(path: Path) -> int | None:
    """The global step of a complete checkpoint file (read safely, tensors memory-mapped, not loaded); None for a
    file that is truncated, empty or not a Lightning checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return step if isinstance(step, int) and "state_dict" in ckpt else None


def resume_path(cfg: DictConfig, run_dir: str | Path) -> str | None:
    """``ckpt_path`` as given. ``last`` or null: of every checkpoint in the run directory (``last.ckpt``,
    ``on_exception.ckpt``, ``step_*.ckpt``), the complete one with the highest global step -- so a requeued or
    restarted job that reuses its run directory continues from its furthest point, whichever file holds it.
    Of equal steps, last.ckpt, else the newest. Unreadable files are skipped with a warning. ``last`` with no
    checkpoint is an error; null starts afresh."""
    if cfg.get("ckpt_path") and cfg.ckpt_path != "last":
        return str(cfg.ckpt_path)
    # Lightning itself falls back to "last" when OnExceptionCheckpoint is present, and says so loudly.
    warnings.filterwarnings("ignore", message=r".*ckpt_path=None.*was called without a model")
    warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available")
    furthest = furthest_checkpoint(run_dir)
    if furthest:
        return str(furthest[1])
    folder = Path(run_dir) / "checkpoints"
    if cfg.get("ckpt_path") == "last":
        raise CheckpointError(
            f"ckpt_path=last: no complete checkpoint (last.ckpt, on_exception.ckpt, step_*.ckpt) in {folder}; pass "
            "the run directory to continue as hydra.run.dir=<run dir>, or a file as ckpt_path=<path>"
        )
    return None


def furthest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """(global step, path) of the complete checkpoint in ``<run_dir>/checkpoints`` with the highest step; of equal
    steps last.ckpt, else the newest file. Unreadable files are skipped with a warning."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    for p in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        step = checkpoint_step(p)
        if step is None:
            rank_zero_warn(f"ddpmlab: skipping {p} when choosing where to resume: not a complete checkpoint")
            continue
        found.append((step, p.name == "last.ckpt", p.stat().st_mtime, p))
    return (max(found)[0], max(found)[-1]) if found else None


def check_resume(ckpt_path: str, cfg: DictConfig) -> None:
    """Refuse, before anything is built or written, a checkpoint that is missing, unreadable, not a training
    checkpoint or trained with another network or schedule."""
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    missing = [k for k in ("global_step", "optimizer_states", "loops") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{ckpt_path} cannot resume a training: it has no {', '.join(missing)} (a weights-only "
            f"export?); train afresh, or pass the run's last.ckpt"
        )
    saved, current = ckpt["ddpmlab_config"], OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(saved, dict):  # load_checkpoint has bounded it; a string or a list is no config either
        raise CheckpointError(f"{ckpt_path}: its ddpmlab_config is not a config (a {type(saved).__name__})")
    stage, saved_stage = stage_of(cfg), stage_of(saved, ckpt_path)
    if saved_stage is not stage:
        raise CheckpointError(
            f"{ckpt_path} was written by a {saved_stage.title} run, this run is {stage.title}: resume with the "
            "experiment that wrote it, or start afresh"
        )
    try:
        check_compatible(saved, current)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt_path}: {e}") from None
    stage.check_resume(saved, current, ckpt_path)


def check_writable(run_dir: Path, cfg: DictConfig, resuming: bool = False) -> None:
    """Refuse, before the first step, a directory the run must create files in but cannot (read-only, another
    user's): the checkpoint directories (every save creates a temporary file there), and the run directory of a
    run that starts afresh (a resumed one may only rewrite the files it already holds there). Each is probed by
    creating and removing a file in it, or in the nearest folder above it that exists (where it will be made)."""
    dirs = {} if resuming else {Path(run_dir): "its logs and metrics"}
    for c in (cfg.get("callbacks") or {}).values():
        if isinstance(c, DictConfig) and c.get("dirpath"):
            dirs.setdefault(Path(c.dirpath), "its checkpoints")
    for folder, what in dirs.items():
        probe = folder.expanduser().absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            raise NotWritableError(
                f"cannot write in {probe} ({e.strerror or type(e).__name__}), where this run keeps {what}: make it "
                "writable, or run in another directory (hydra.run.dir=<dir>)"
            ) from e


def wandb_resume(logger_cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> dict:
    """A W&B logger's run id: the one of the run that wrote the checkpoint we resume from, so a resumed
    training continues the same W&B run; else a new one. Kept in ``<run dir>/wandb_run_id``."""
    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger") or logger_cfg.get("id"):
        return {}
    ids = [Path(ckpt_path).parent.parent / "wandb_run_id", run_dir / "wandb_run_id"] if ckpt_path else []
    run_id = next((f.read_text().strip() for f in ids if f.is_file()), None) or secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "wandb_run_id", run_id)
    return {"id": run_id, "resume": "allow"}
