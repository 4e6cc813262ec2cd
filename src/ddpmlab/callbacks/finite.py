"""Training that stops at the first non-finite loss, and never saves the weights it produced.

:class:`FiniteGuard` is added to every training (diffusion, noisy classifier, first stage) by ``train()``. Each step
it marks, on the device, whether a loss handed to ``backward`` or the gradient norm before the optimizer step is
not finite, and stops training with a :class:`TrainingDivergedError` naming the step. A checkpoint is only written
after its weights were found finite, so ``ckpt_path=last`` keeps picking the last good one.

Reading a device value on the host waits for the GPU (a host sync), which a training step otherwise avoids (see
``perf.sync_free_logging``). On a GPU the verdict of a step is copied to pinned host memory behind that step's
kernels and read at the end of the next step, when those kernels are usually done: the host never waits for the step
it has just queued, and training stops at most one step after the first non-finite value. A checkpoint save reads
every verdict still pending first (saving waits for the GPU anyway). On the CPU the verdict is read at once.

Under DDP the check of the gradient norm, taken after the gradients are all-reduced, sees the same value on every
rank: a non-finite loss on one rank makes every rank stop at the same step.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ddpmlab.errors import ConfigError


class TrainingDivergedError(ConfigError):
    """The loss or the gradient norm became NaN or infinite; nothing from that step on was saved."""


class FiniteGuard(Callback):
    def __init__(self) -> None:
        self._bad: Tensor | None = None  # this step's verdict, a bool on the device
        self._step = 0  # the step being trained, as the loggers count it (global_step before its optimizer step)
        self._pending: deque[tuple[int, Tensor, torch.cuda.Event]] = deque()  # GPU verdicts on their way to the host

    def _mark(self, bad: Tensor) -> None:
        self._bad = bad if self._bad is None else self._bad | bad

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._bad, self._step = None, trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        # Every loss a step differentiates: automatic optimization's, and each manual_backward (the autoencoder's
        # generator and discriminator losses).
        self._mark(~torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's GradScaler meets infinite gradients by design, and skips those steps itself
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self._mark(~torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bad, self._bad = self._bad, None
        if bad is None:
            return
        if bad.device.type != "cuda":
            self._check(trainer, self._step, bad)  # computed already: reading it costs nothing
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(bad, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending.append((self._step, host, done))
        while len(self._pending) > 1:  # the previous step's verdict
            self._read(trainer)

    def _read(self, trainer) -> None:
        step, host, done = self._pending.popleft()
        done.synchronize()
        self._check(trainer, step, host)

    def _drain(self, trainer) -> None:
        while self._pending:
            self._read(trainer)
        if self._bad is not None:  # a save in the middle of a step
            self._check(trainer, self._step, self._bad)

    def on_train_end(self, trainer, pl_module) -> None:
        self._drain(trainer)  # the last step's verdict, before the final last.ckpt is written

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Raising here aborts the save: no file is written. Weights are checked too, for what the loss cannot show
        # (a parameter no loss of the step used).
        self._drain(trainer)
        for key in ("state_dict", "current_model_state"):  # after EMA's swap: the average, and the raw weights
            name = first_non_finite(checkpoint.get(key) or {})
            if name is not None:
                raise diverged(trainer, f"the weight {name} is not finite at step {trainer.global_step}")

    def _check(self, trainer: pl.Trainer, step: int, bad: Tensor) -> None:
        if bool(bad):
            self._pending.clear()
            raise diverged(trainer, f"the loss or the gradient norm of step {step} is not finite (NaN or inf)")


def first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` holding a NaN or an infinity, else None; one
    host sync for all of them."""
    floats = [(k, v) for k, v in tensors.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(v).all().to(floats[0][1].device) for _, v in floats])
    if bool(finite.all()):
        return None
    return floats[int((~finite).nonzero()[0])][0]


def diverged(trainer: pl.Trainer, what: str) -> TrainingDivergedError:
    parts = [f"training diverged: {what}", "stopped without saving it"]
    folder = next((Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)), None)
    if folder is not None and any(folder.glob("*.ckpt")):
        parts.append(f"the checkpoints in {folder} are from before it (ckpt_path=last resumes the last one)")
    parts.append("lower optimizer.lr, or warm it up with optimizer.lr_warmup_steps=<steps>")
    return TrainingDivergedError("; ".join(parts))
