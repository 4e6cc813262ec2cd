"""Checkpoints that never lose work.

- :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the checkpoint's own directory,
  fsyncs it and renames it over the target (``os.replace``, atomic on one filesystem): a kill or a full disk
  leaves the previous file intact and no partial one that a resume could pick. (Lightning's own writer stages
  the file in the system temporary directory and moves it: a copy, not a rename, when that is another
  filesystem.) A full disk is a one-line error naming the directory.
- :class:`Checkpoint`: ModelCheckpoint that also saves the final step: a run that stops at max_steps between two
  scheduled saves otherwise loses its last steps (Lightning saves only on its schedule or at validation).
- :class:`OnExceptionCheckpoint`: saves where a crash or a SIGTERM stopped training, but only when this run has
  trained at least one step since it started (or resumed): a failure before the first optimizer step writes
  nothing, so it cannot shadow the checkpoint it was resuming from with an untrained one. Nor does a training that
  diverged (:mod:`ddpmlab.callbacks.finite`): its weights are NaN. Under DDP it saves on a SIGTERM only, the one
  failure every rank stops at together.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import OnExceptionCheckpoint as _OnExceptionCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ddpmlab.callbacks.finite import TrainingDivergedError
from ddpmlab.errors import DiskFullError, NotWritableError
from ddpmlab.fileio import write_atomic


def atomic_write(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``, never a part."""
    write_atomic(path, data, again=("the checkpoints already there are intact", "continue with ckpt_path=last"))


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(buffer.getbuffer(), path)


class Checkpoint(ModelCheckpoint):
    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # a dry run writes no checkpoint (Lightning's on_train_end would save last.ckpt)
            return
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and trainer.global_step != self._last_global_step_saved:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(last, weights_only=False)  # a full, resumable checkpoint
            self._last_global_step_saved = trainer.global_step


class OnExceptionCheckpoint(_OnExceptionCheckpoint):
    def __init__(self, dirpath, filename: str = "on_exception") -> None:
        super().__init__(dirpath, filename)
        self._start_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = trainer.global_step  # after a resume: the step it resumed at

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._start_step is None or trainer.global_step <= self._start_step:
            return  # nothing trained since the start or the resume: nothing to keep
        if isinstance(exception, (DiskFullError, NotWritableError)):
            return  # the disk is full or the directory read-only: a second write would fail the same way
        if isinstance(exception, TrainingDivergedError):
            return  # the weights are NaN or inf: the last checkpoint before it is the one to keep
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            # Under DDP only a SIGTERM stops every rank at one step boundary (Lightning broadcasts it). Any other
            # failure may be one rank's, or a rank gone: saving waits for them all (a barrier) and would hang. The
            # last checkpoint is whole and resumes.
            return
        super().on_exception(trainer, pl_module, exception)
