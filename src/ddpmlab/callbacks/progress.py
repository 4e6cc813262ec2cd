"""One progress bar for the whole training, over ``global_step / max_steps`` (a diffusion run counts steps, not
epochs), with the ETA, the loss and images per second. Where stdout is not a terminal (CI, SLURM logs) it
prints one line every ``every_n_steps`` instead, and the last step's."""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks.progress import ProgressBar

from ddpmlab.progress import format_seconds, is_terminal


class StepProgressBar(ProgressBar):
    def __init__(self, every_n_steps: int = 100, terminal: bool | None = None):
        """``terminal``: None detects it (``sys.stdout.isatty()``); True / False force the bar / the lines."""
        super().__init__()
        self.every_n_steps = every_n_steps
        self.terminal = terminal
        self._enabled = True
        self.bar: Any = None
        self._t0 = 0.0
        self._step0 = 0
        self._images = 0

    # ProgressBar's switches (Trainer(enable_progress_bar=...), and off on ranks other than 0)
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _total(self, trainer) -> int:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return int(trainer.estimated_stepping_batches)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0, self._images = time.perf_counter(), trainer.global_step, 0
        if not self._enabled or not (is_terminal() if self.terminal is None else self.terminal):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self._total(trainer),
            initial=trainer.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0.05,
        )

    def summary(self, trainer, pl_module) -> dict[str, str]:
        """loss, val/loss (when validated) and img/s, formatted for the bar or the line."""
        metrics = self.get_metrics(trainer, pl_module)
        out = {k.split("/", 1)[-1] if k == "train/loss" else k: v for k, v in metrics.items() if k != "v_num"}
        seconds = time.perf_counter() - self._t0
        if seconds > 0 and self._images:
            out["img/s"] = f"{self._images / seconds:.0f}"
        return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in out.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        x0 = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += x0.shape[0] * trainer.world_size
        step, total = trainer.global_step, self._total(trainer)
        if self.bar is not None:
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix(self.summary(trainer, pl_module), refresh=False)
            return
        if step == self._step0 or (step % self.every_n_steps and step != total):
            return
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / (step - self._step0) * (total - step)
        values = " ".join(f"{k} {v}" for k, v in self.summary(trainer, pl_module).items())
        print(
            f"step {step}/{total} ({100 * step // max(1, total)}%) {values} "
            f"[{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}]",
            flush=True,
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self.summary(trainer, pl_module), refresh=True)
            self.bar.close()
            self.bar = None
