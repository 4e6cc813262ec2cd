"""Samples written to disk as they are drawn, so memory holds one batch and a stopped draw continues where it
stopped (``sample.py`` run again into the same output folder).

``<out>/chunks/settings.json`` records what the samples depend on (seed, batch size, sampler, a hash of the
weights and of the inputs, ...); ``<out>/chunks/chunk_000000.npz`` and on hold one batch each, uint8 [n,H,W,C],
with the state of the sampling generator after it. Each file is written atomically, so a kill leaves only
complete chunks. A run with the same settings takes the generator's state from the last chunk and draws the
batches after it: the same samples an uninterrupted run draws. Chunks drawn with other settings are refused, never
mixed in. At the end ``samples.npz`` is assembled chunk by chunk and the chunks are removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_path, write_atomic

SETTINGS = "settings.json"


def tensor_hash(*tensors: Tensor | None, modules: tuple[torch.nn.Module, ...] = ()) -> str:
    """A short hash of tensors' values (and of modules' state dicts, names included): what identifies the
    weights and inputs a set of chunks was drawn from."""
    h = hashlib.sha256()

    def add(t: Tensor) -> None:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    for t in tensors:
        h.update(b"-" if t is None else b"+")
        if t is not None:
            add(t)
    for module in modules:
        for name, t in module.state_dict().items():
            h.update(name.encode())
            add(t)
    return h.hexdigest()[:16]


class SampleChunks:
    """The chunks of one draw of ``num_samples`` in batches of ``batch_size``, in ``folder``."""

    def __init__(self, folder: str | Path, settings: dict[str, Any], num_samples: int, batch_size: int):
        self.folder, self.num_samples, self.batch_size = Path(folder), num_samples, batch_size
        self.settings = json.loads(json.dumps({**settings, "num_samples": num_samples, "batch_size": batch_size}))

    def path(self, index: int) -> Path:
        return self.folder / f"chunk_{index:06d}.npz"

    def size(self, index: int) -> int:
        return min(self.batch_size, self.num_samples - index * self.batch_size)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def resume(self) -> tuple[int, Tensor | None]:
        """(samples already drawn, the generator's state after them): (0, None) for a new folder, where the
        settings are recorded first; refuses a folder whose chunks were drawn with other settings."""
        stored_file = self.folder / SETTINGS
        if not stored_file.is_file():
            if self.path(0).exists():  # the settings are written before any chunk: these came from elsewhere
                raise ConfigError(f"{self.folder} holds chunks but no {SETTINGS}; delete it to draw the samples afresh")
            write_atomic(stored_file, json.dumps(self.settings, indent=2) + "\n")
            return 0, None
        try:
            stored = json.loads(stored_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot read {stored_file} ({e}); delete {self.folder} to draw the samples afresh"
            ) from e
        stored = stored if isinstance(stored, dict) else {}
        if stored != self.settings:
            differ = sorted(k for k in stored.keys() | self.settings.keys() if stored.get(k) != self.settings.get(k))
            raise ConfigError(
                f"{self.folder} holds samples drawn with other settings ({', '.join(differ)} differ); they are not "
                f"mixed in: delete {self.folder} to start afresh, or write to another folder (hydra.run.dir=...)"
            )
        done = 0
        while done < self.num_chunks and self.path(done).is_file():
            done += 1
        if done == 0:
            return 0, None
        state = self._load(done - 1)["generator_state"]
        return min(done * self.batch_size, self.num_samples), torch.from_numpy(state)

    def write(self, index: int, images: np.ndarray, generator_state: Tensor) -> None:
        """Chunk ``index``: its batch (uint8 [n,H,W,C]) and the generator's state after it, atomically."""
        assert len(images) == self.size(index), "one batch per chunk"
        with atomic_path(self.path(index)) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, generator_state=generator_state.cpu().numpy())

    def _load(self, index: int) -> dict[str, np.ndarray]:
        path = self.path(index)
        try:
            with np.load(path, allow_pickle=False) as chunk:
                data = {k: chunk[k] for k in ("images", "generator_state")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ConfigError(f"cannot read {path} ({e}); delete it (and the chunks after it) to draw it again") from e
        if len(data["images"]) != self.size(index):
            raise ConfigError(f"{path} holds {len(data['images'])} samples, not {self.size(index)}; delete it")
        return data

    def images(self) -> Iterator[np.ndarray]:
        """The samples chunk by chunk, in order."""
        for index in range(self.num_chunks):
            yield self._load(index)["images"]

    def head(self, n: int) -> np.ndarray:
        """The first ``n`` samples (or all, when fewer)."""
        taken, count = [], 0
        for chunk in self.images():
            taken.append(chunk[: n - count])
            count += len(taken[-1])
            if count >= n:
                break
        return np.concatenate(taken)

    def assemble(self, path: str | Path, **arrays: np.ndarray) -> None:
        """``samples.npz`` as ``np.savez_compressed(path, images=<all samples>, **arrays)`` writes it, streamed a
        chunk at a time (the samples never all in memory) and atomically."""
        first = self._load(0)["images"]
        header = {
            "descr": np.lib.format.dtype_to_descr(first.dtype),
            "fortran_order": False,
            "shape": (self.num_samples, *first.shape[1:]),
        }
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as npz:
            with npz.open("images.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in self.images():
                    f.write(np.ascontiguousarray(chunk).tobytes())
            for name, array in arrays.items():
                with npz.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
