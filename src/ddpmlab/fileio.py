"""Files in and out, safely (low level: imports nothing of ddpmlab but its errors).

Writing: every output ddpmlab writes (samples, grids, metrics, configs, exports) is written to a temporary name
beside its target and renamed over it, so a kill, an exception or a full disk mid-write leaves the target as it
was before (or absent), never half-written. Reading: every image file a user hands ddpmlab is decoded by PIL,
which reports a truncated or non-image file as an error and refuses decompression bombs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from ddpmlab.errors import ConfigError, DiskFullError, NotWritableError

__all__ = ["atomic_dir", "atomic_path", "read_image", "write_atomic"]

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UMASK = os.umask(0o022)
os.umask(UMASK)  # read back: the process's umask, unchanged


AGAIN = "what was there before is intact", "run the same command again"


def _write_error(e: OSError, path: Path, again: tuple[str, str]) -> ConfigError | None:
    """One line for the write failures a user can fix (a full disk, a read-only directory), else None. ``again``:
    what is intact, and how to go on once it is fixed."""
    intact, then = again
    if e.errno in DISK_FULL:
        return DiskFullError(f"no space left in {path.parent} to write {path.name}; {intact}: free space, then {then}")
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        return NotWritableError(
            f"cannot write {path.name} in {path.parent} ({e.strerror}); {intact}: make the directory writable, "
            f"then {then}"
        )
    return None


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the data is on disk before the rename makes it visible (a power cut keeps old or new)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, again: tuple[str, str] = AGAIN) -> Iterator[Path]:
    """A temporary path beside ``path`` (same folder, same suffix, so writers that go by the extension work) to
    write to; renamed over ``path`` when the block ends without an error, removed when it raises. A full disk or
    a read-only directory is one line (``again``: what is intact, and how to go on)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; an output gets what any new file gets
        _fsync(tmp)
        os.replace(tmp, path)  # atomic within one filesystem: a reader sees the old file or the new one
        _fsync(path.parent)  # the rename itself survives a power cut
    except OSError as e:
        error = _write_error(e, path, again)
        if error is None:
            raise
        raise error from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes, again: tuple[str, str] = AGAIN) -> None:
    """``path`` holds its old content or all of ``data`` (text is written as UTF-8), never a part."""
    with atomic_path(path, again) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # a filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(a))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; when the block ends without an error it takes ``path``'s place
    in one step (the old folder is swapped out and removed), so ``path`` holds the complete old folder or the
    complete new one. Where the system cannot swap two folders in one step, the old one is renamed aside first:
    a kill between the two renames leaves it complete beside, as ``.<name>.old-*``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700 folders
        for f in tmp.iterdir():
            _fsync(f)
        if not path.exists():
            os.rename(tmp, path)
        elif not _exchange(tmp, path):
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, aside)  # onto the empty folder mkdtemp made
            os.rename(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        # after the swap tmp holds the old folder (or nothing): removed below
    except OSError as e:
        error = _write_error(e, path, AGAIN)
        if error is None:
            raise
        raise error from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# PIL's decoders report what they cannot decode with several exception types.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def read_image(
    path: str | Path, mode: str, what: str = "image", fix: str = "give a PNG or JPEG", draft: bool = False
) -> Image.Image:
    """The image file at ``path`` fully decoded by PIL and converted to ``mode`` ('L' grey, 'RGB'). A missing,
    truncated or non-image file, or one over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), is a
    ConfigError naming ``what`` and the file, ending with ``fix``. ``draft``: decode a JPEG at 1/8 scale (it still
    reads every byte, so a truncated file still fails), to check a file cheaply."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: no file at {p}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse there too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                if draft:
                    img.draft(img.mode, (1, 1))  # JPEG only; other formats decode in full
                img.load()  # decodes every pixel: a truncated file fails here, not later
                return img.convert(mode)
    except (*UNREADABLE, Image.DecompressionBombWarning) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"cannot read {what} {p} ({reason}); {fix}") from e
