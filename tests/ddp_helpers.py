"""Callbacks the multi-process tests add to a CLI run (``+callbacks.x._target_=ddp_helpers.KillAt``: tests/ on
PYTHONPATH): a rank that dies or fails at a given step."""

from __future__ import annotations

import os
import signal
import time

from lightning.pytorch import Callback


class KillAt(Callback):
    """Rank ``rank`` sends itself ``signum`` (SIGKILL: dies without a word) once it has trained ``step`` steps,
    having written the time to ``<when>``."""

    def __init__(self, step: int, when: str, rank: int = 1, signum: int = int(signal.SIGKILL)):
        self.step, self.when, self.rank, self.signum = step, when, rank, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            with open(self.when, "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), self.signum)


class FailAt(Callback):
    """Rank ``rank`` raises an error of its own once it has trained ``step`` steps."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            raise ValueError(f"a bug on rank {self.rank} at step {self.step}")


class RecordLosses(Callback):
    """Writes ``{"<step>/<micro-batch>": loss}`` of every micro-batch this rank trained to ``<out>/losses<rank>.json``:
    the micro-batch of the global batch (seeding.shard_index), so that layouts can be compared item by item."""

    def __init__(self, out: str):
        self.out, self.losses = out, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json
        from pathlib import Path

        from ddpmlab.seeding import shard_index

        step, micro = pl_module._micro
        key = f"{step}/{shard_index(trainer.global_rank, trainer.world_size, micro)}"
        self.losses[key] = outputs["loss_per_sample"].mean().item()
        path = Path(self.out) / f"losses{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.losses))
