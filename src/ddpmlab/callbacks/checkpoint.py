"""ModelCheckpoint that also saves the final step: a run that stops at max_steps between two scheduled
saves otherwise loses its last steps (Lightning saves only on its schedule or at validation)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # a dry run writes no checkpoint (Lightning's on_train_end would save last.ckpt)
            return
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and trainer.global_step != self._last_global_step_saved:
            trainer.save_checkpoint(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
            self._last_global_step_saved = trainer.global_step
