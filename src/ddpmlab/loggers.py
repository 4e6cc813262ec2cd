"""A CSVLogger that keeps the history: a resumed run appends to its ``metrics.csv``.

Lightning's CSVLogger deletes ``metrics.csv`` when it finds the log directory in use, so every resume erased the
rows before it. Here the earlier rows stay; new columns widen the file (earlier rows get empty cells there)."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _ExperimentWriter


class AppendingExperimentWriter(_ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            header = next(csv.reader(f), [])
        self.metrics_keys = list(header)  # save() appends under this header, or widens it for new keys


class CSVLogger(_CSVLogger):
    @property
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
