"""Runs whose processes a launcher started (torchrun, SLURM's srun): which rank this process is, and what the ranks
agree on through the launcher's rendezvous before and besides Lightning's own connection.

Lightning detects the launcher itself (its ``TorchElasticEnvironment`` and ``SLURMEnvironment``), connects the ranks
and starts no processes of its own. What it leaves to ddpmlab is here:

- the run directory: Hydra names it from each process's clock, and two nodes need not read the same second. Every
  rank takes rank 0's (:class:`RunDirAgreement`, a Hydra callback), and only rank 0 writes Hydra's ``.hydra/`` and
  job log into it;
- a process group for evaluate.py, whose sampling the ranks share out (:func:`process_group`);
- which rank died when a collective fails (:mod:`ddpmlab.callbacks.ranks`).

They meet in the store torch's own ``env://`` rendezvous uses: torchrun's agent store, or, under SLURM, a TCPStore on
rank 0 at MASTER_ADDR:MASTER_PORT, which ``init_process_group`` later shares (multi-tenant) rather than binding
the port a second time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from hydra.experimental.callback import Callback
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from omegaconf import open_dict, read_write

from ddpmlab.errors import ConfigError

JOIN_TIMEOUT_S = int(os.environ.get("DDPMLAB_JOIN_TIMEOUT", "600"))  # how long a rank waits for rank 0 to appear
_stores: dict[tuple[str, int], dist.TCPStore] = {}  # kept open: rank 0's may host the server init_process_group uses


@dataclass(frozen=True)
class Launch:
    """How a launcher started this process: ``launcher`` (torchrun, SLURM), the global ``rank`` of
    ``world_size`` and Lightning's environment, which knows the rendezvous address."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    environment: ClusterEnvironment

    @property
    def attempt(self) -> str:
        """Which start of the job this is: keys of an earlier start (a torchrun restart, a SLURM requeue that kept
        the store's host alive) are never read as this one's."""
        return os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"


def launch() -> Launch | None:
    """The launcher that started this process as one of several ranks; None for one process, or for the ranks
    Lightning's own launcher starts (it hands them the run directory on their command line)."""
    for name, env_class in (("torchrun", TorchElasticEnvironment), ("SLURM", SLURMEnvironment)):
        if env_class.detect():
            env = env_class()
            if env.world_size() > 1:
                return Launch(name, env.global_rank(), env.world_size(), env.local_rank(), env)
    return None


def store(run: Launch, timeout_s: float = JOIN_TIMEOUT_S) -> dist.TCPStore:
    """A client of the rendezvous store (rank 0 outside torchrun: its server), as torch's ``env://`` makes it."""
    host, port = run.environment.main_address, run.environment.main_port  # Lightning sets MASTER_ADDR/PORT too
    if (host, port) not in _stores:
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        try:
            _stores[host, port] = dist.TCPStore(
                host,
                port,
                is_master=run.rank == 0 and not agent,
                multi_tenant=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=timeout_s),
            )
        except (RuntimeError, dist.DistError) as e:
            what = "could not open it" if run.rank == 0 and not agent else "rank 0 never answered there"
            raise ConfigError(
                f"rank {run.rank} of {run.world_size} ({run.launcher}) waited for the rendezvous at {host}:{port} and "
                f"{what} ({first_line(e)}); check that rank 0 runs and that the port is free and reachable "
                "(torchrun --master-port, MASTER_PORT under SLURM)"
            ) from None
    return _stores[host, port]


def agree(run: Launch, key: str, value: str, timeout_s: float = JOIN_TIMEOUT_S) -> str:
    """Rank 0's ``value`` of ``key``, on every rank (rank 0 publishes it; the others wait for it)."""
    s = store(run, timeout_s)
    key = f"ddpmlab/{run.attempt}/{key}"
    if run.rank == 0:
        s.set(key, value)
        return value
    try:
        s.wait([key], timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistError):
        raise ConfigError(
            f"rank {run.rank} waited {timeout_s:.0f}s for rank 0 to name the run directory and heard nothing: start "
            f"rank 0 too (the same command on the node of rank 0), or raise DDPMLAB_JOIN_TIMEOUT"
        ) from None
    return s.get(key).decode()


class RunDirAgreement(Callback):
    """Hydra callback: under torchrun or SLURM, every rank writes into rank 0's run directory, named from rank 0's
    clock; the other ranks write no ``.hydra/`` and no job log there (as Lightning's own launcher does for the ranks
    it starts)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        run = launch()
        if run is None:
            return
        agreed = agree(run, "run_dir", os.path.abspath(str(config.hydra.run.dir)))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = agreed
            if run.rank != 0:
                config.hydra.output_subdir = None
                logging = config.hydra.job_logging
                if logging and "file" in (logging.get("handlers") or {}):
                    del logging.handlers["file"]
                    logging.root.handlers = [h for h in logging.root.handlers if h != "file"]


def process_group(backend: str | None = None) -> Launch | None:
    """Connect the ranks a launcher started (evaluate.py: no Lightning Trainer does it there); None for one process.
    ``backend``: nccl on GPUs, gloo on CPUs (the default: the device's)."""
    run = launch()
    if run is None:
        return None
    if not dist.is_initialized():
        env = run.environment
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, rank=run.rank, world_size=run.world_size)
    return run


def first_line(exc: BaseException) -> str:
    """``Type: the first line of its message`` (a collective's error runs to a page)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")[:300]
