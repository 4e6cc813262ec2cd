"""What the ranks of a multi-process run agree on, and what they say when one of them dies.

:class:`Ranks` (added by ``train()`` to every run):

- at setup, under DDP, every rank's config is compared with rank 0's: ranks started with different overrides are
  refused, the differing keys shown with both values;
- at the start, rank 0 prints the layout -- the global batch (``data.batch_size`` x devices x nodes x accumulation)
  and the learning-rate schedule, stepped once per optimizer step whatever the layout -- and stores it with the run
  (``<run dir>/layout.json``, one entry per start, and every checkpoint's ``ddpmlab_layout``), so that a resume onto
  another layout is checked (``check_layout``);
- a SIGTERM (pre-emption, a time limit, a requeue signal turned into one) that reaches any rank stops every rank
  at the same step boundary: each rank only notes it, and after every step the ranks agree (one all-reduce) whether
  any of them got one. Lightning's own handler broadcasts from inside the signal handler, wherever each rank is in
  its collectives, and can deadlock two ranks signalled at slightly different moments;
- when a collective fails because a rank is gone, the ranks still alive name it: each rank that fails on its own
  leaves its reason in the rendezvous store, each survivor leaves its name; the ranks that left neither within
  ``GRACE_S`` died without a word (killed, out of memory, their node lost).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ddpmlab.distributed import first_line
from ddpmlab.errors import CheckpointError, ConfigError
from ddpmlab.fileio import write_atomic

GRACE_S = 3.0  # how long a survivor waits for the other ranks to say whether they are alive
LAYOUT_FILE = "layout.json"


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's global batch is made: ``batch_size`` per micro-batch, on ``devices`` x ``nodes``
    processes, each accumulating ``accumulate`` micro-batches."""

    batch_size: int
    devices: int
    nodes: int
    accumulate: int

    @classmethod
    def of(cls, trainer: pl.Trainer, batch_size: int) -> Layout:
        return cls(batch_size, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.micro_batches

    @property
    def micro_batches(self) -> int:
        return self.devices * self.nodes * self.accumulate

    def __str__(self) -> str:
        devices = f"{self.devices} device{'s' * (self.devices != 1)}"
        return (
            f"global batch {self.global_batch} = data.batch_size {self.batch_size} x {devices} x {self.nodes} "
            f"node{'s' * (self.nodes != 1)} x accumulate {self.accumulate}"
        )


def lr_schedule(config: dict) -> str:
    """The learning-rate schedule a run's config asks for, in words."""
    opt, trainer = config.get("optimizer") or {}, config.get("trainer") or {}
    name = str(opt.get("_target_", "?")).rsplit(".", 1)[-1]
    warmup, schedule, max_steps = opt.get("lr_warmup_steps") or 0, opt.get("lr_schedule"), trainer.get("max_steps")
    parts = [f"learning rate {opt.get('lr')} ({name})"]
    if warmup:
        parts.append(f"linear warm-up over {warmup} steps")
    parts.append(f"cosine to 0 at step {max_steps}" if schedule == "cosine" else "then constant")
    return ", ".join(parts) + "; stepped once per optimizer step"


def check_layout(saved: dict | None, layout: Layout, ckpt_path: str, allow_change: bool) -> str | None:
    """Refuse a resume onto a layout that would not continue the run exactly: another global batch, or the same one
    made of micro-batches of another size (their noise is drawn per micro-batch, data/order.py). Returns a warning
    when ``allow_change`` lets it through; None when it continues exactly (or the checkpoint predates layouts)."""
    if not isinstance(saved, dict):
        return None
    try:
        before = Layout(**{k: int(saved[k]) for k in ("batch_size", "devices", "nodes", "accumulate")})
    except (KeyError, TypeError, ValueError):
        return None
    if (before.batch_size, before.micro_batches) == (layout.batch_size, layout.micro_batches):
        return None
    what = "global batch" if before.global_batch != layout.global_batch else "micro-batch size"
    change = f"{ckpt_path} was trained with {before}; this run has {layout}"
    if allow_change:
        return f"{change}: continuing with another {what}, which is not the run it would have been"
    need = before.micro_batches // (layout.devices * layout.nodes)
    keep = (
        f"trainer.accumulate_grad_batches={need}"
        if need * layout.devices * layout.nodes == before.micro_batches
        else f"devices x nodes x accumulate = {before.micro_batches}"
    )
    raise CheckpointError(
        f"{change}: the {what} would change, so it would not continue the run exactly. Keep data.batch_size="
        f"{before.batch_size} with {keep}, or pass allow_layout_change=true to continue differently"
    )


class RankFailedError(ConfigError):
    """Another rank of a multi-process run died or failed; this one stopped with it."""


class Ranks(pl.Callback):
    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.layout: Layout | None = None
        self.failure: str | None = None  # set on a survivor: which rank died, and why where it said
        self._store: dist.Store | None = None
        self._prefix = ""
        self._sigterm = False
        self.joined = False  # every rank reached setup: the process group is complete

    # ------------------------------------------------------------------ start
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layout = Layout.of(trainer, self.batch_size)
        self.joined = trainer.world_size < 2 or not dist.is_initialized()
        if self.joined:
            return
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
        self._prefix = f"ddpmlab/{attempt}/ranks/"
        try:  # the rendezvous store every launcher leaves at MASTER_ADDR:MASTER_PORT
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            self._store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
        except (KeyError, ValueError, RuntimeError, dist.DistError):
            self._store = None  # no names on failure, nothing else lost
        configs: list[Any] = [None] * trainer.world_size
        mine = {**(getattr(pl_module, "config", None) or {}), "run directory": str(trainer.default_root_dir)}
        dist.all_gather_object(configs, mine)
        self.joined = True
        for rank, theirs in enumerate(configs):
            differences = _differences(configs[0], theirs, "", rank)
            if differences:
                shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
                raise ConfigError(
                    f"rank {rank} was started with another config than rank 0 ({shown}); start every rank with the "
                    "same command and overrides"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_sigterm)  # in place of Lightning's (restored at its teardown)
        if not trainer.is_global_zero or self.layout is None:
            return
        schedule = lr_schedule(getattr(pl_module, "config", None) or {})
        print(f"layout: {self.layout}; {schedule}", flush=True)
        path = Path(trainer.default_root_dir) / LAYOUT_FILE
        try:
            history = json.loads(path.read_text()) if path.is_file() else []
        except (OSError, ValueError):
            history = []
        history = history if isinstance(history, list) else []
        entry = {"from_step": trainer.global_step, **self.stored(), "lr_schedule": schedule}
        write_atomic(path, json.dumps([*history, entry], indent=2) + "\n")

    def _note_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.world_size < 2:
            return
        flag = torch.tensor([float(self._sigterm)], device=trainer.strategy.root_device)
        if trainer.strategy.reduce(flag, reduce_op="max").item():
            trainer._signal_connector.received_sigterm = True  # Lightning stops every rank after this batch

    def stored(self) -> dict[str, int]:
        assert self.layout is not None
        return {**asdict(self.layout), "global_batch": self.layout.global_batch}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.layout is not None:
            checkpoint["ddpmlab_layout"] = self.stored()

    # ------------------------------------------------------------------ failure
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._store is None or isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return  # a SIGTERM stops every rank at one step boundary (Lightning broadcasts it): nobody died
        rank = trainer.global_rank
        if not collective_failure(exception):  # this rank's own failure: say why, for the others to print
            self._say(f"failed/{rank}", first_line(exception))
            return
        step = trainer.global_step
        self._say(f"alive/{rank}", "1")
        deadline, others = time.monotonic() + GRACE_S, [r for r in range(trainer.world_size) if r != rank]
        heard: dict[int, str] = {}
        while True:
            try:
                for r in others:
                    if r not in heard and self._store.check([self._prefix + f"failed/{r}"]):
                        heard[r] = f"failed ({self._store.get(self._prefix + f'failed/{r}').decode()})"
                    elif r not in heard and self._store.check([self._prefix + f"alive/{r}"]):
                        heard[r] = "alive"
            except (RuntimeError, dist.DistError):  # the store went with the rank that hosted it
                heard[0] = "gone (it hosted the rendezvous store)"
                break
            if len(heard) == len(others) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        failed = {r: v for r, v in heard.items() if v != "alive"}
        silent = [r for r in others if r not in heard]
        parts = [f"rank {r} {v}" for r, v in sorted(failed.items())]
        if silent:
            ranks = ", ".join(map(str, silent))
            parts.append(
                f"rank{'s' * (len(silent) > 1)} {ranks} died without a word (killed, out of memory, or its node lost)"
            )
        self.failure = f"at step {step}, {', '.join(parts) or 'another rank stopped'}; rank {rank} stopped with it"

    def _say(self, key: str, value: str) -> None:
        try:
            self._store.set(self._prefix + key, value)
        except (RuntimeError, dist.DistError):
            pass


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer is gone (gloo: its connection closed; NCCL: its
    watchdog's time-out), rather than this rank's own error."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Timed out")
    )


def _differences(a: Any, b: Any, key: str, rank: int) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{key}.{k}", rank)]
    return [] if a == b else [f"{key.lstrip('.')}={a!r} on rank 0, {b!r} on rank {rank}"]
