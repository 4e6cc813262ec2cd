"""Progress for sampling loops: a bar over network evaluations on a terminal, a line every quarter elsewhere
(CI, SLURM logs), nothing when switched off. Samplers take it as ``progress=`` (any iterator wrapper), so the
pure packages never import it."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class SamplingProgress:
    """Counts network evaluations over one or more sampler calls: ``sampler(..., progress=bar.wrap)``.

    ``total`` is the number of evaluations expected (steps x batches). On a terminal it is a tqdm bar (left on
    screen with ``leave``); otherwise a line at 25, 50, 75 and 100%; ``enabled=False`` says nothing."""

    def __init__(
        self, total: int, desc: str = "sampling", enabled: bool = True, leave: bool = True, unit: str = "eval"
    ):
        self.total, self.desc, self.unit, self.n = max(1, int(total)), desc, unit, 0
        self.start = time.perf_counter()
        self.enabled, self._next_line = enabled, 0.25
        self.bar: Any = None
        if enabled and is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stdout)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and self.n >= self._next_line * self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.n * (self.total - self.n)
            print(
                f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n // self.total}%), "
                f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}",
                flush=True,
            )
            while self._next_line * self.total <= self.n:
                self._next_line += 0.25

    def wrap(self, steps: Iterable[T]) -> Iterator[T]:
        for step in steps:
            self.update()
            yield step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "SamplingProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
