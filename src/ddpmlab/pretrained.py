"""Weights files of the pretrained networks ddpmlab measures with but never trains: torch-fidelity's Inception-v3
(FID, KID, IS), torchvision's VGG16 (LPIPS, torch-fidelity's ``vgg16`` features), OpenAI's CLIP (``clip-*``).

A weights file is data, never code. The libraries read theirs with ``torch.load(weights_only=False)``, a full
unpickling that runs whatever the file asks for (``os.system`` included), so ddpmlab reads each file itself with
``weights_only=True`` (tensors in plain containers, nothing else) and hands the library a state dict it wrote
itself. The one kind that cannot be read so, CLIP's TorchScript archives (``torch.jit.load``), must match the full
SHA-256 that OpenAI publishes in its URL before the library sees it. torch-fidelity's cache of real features
and statistics, which it also unpickles, is read the same way first.

A hash prefix in a file name (``vgg16-397923af.pth``) checks a download, as torch hub does; 32 bits are no
defence against a crafted file, which is why the files themselves are read as tensors only.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ddpmlab.errors import ConfigError


class UnsafeWeightsFile(ConfigError):
    """A weights (or cache) file whose pickle asks for more than tensors, or that is not the published file."""


def hub_path(url: str) -> Path:
    """Where torch hub caches the file at ``url``: ``$TORCH_HOME/hub/checkpoints/<its name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def download(url: str, path: Path) -> None:
    """Download ``url`` to ``path``, checked against the SHA-256 prefix in its name as torch hub does."""
    match = torch.hub.HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=False)


def _refused_global(e: Exception) -> str | None:
    """What a pickle asked for that ``weights_only=True`` refused (``posix.system``), None if it was no refusal."""
    text = str(e)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", text)
    return (found.group(1) or found.group(2)) if found else "objects other than tensors"


def mismatch(e: Exception) -> str:
    """The first line that says what went wrong in ``e`` (for load_state_dict: the missing keys or the shapes)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return (lines[1] if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1 else lines[0])[:120]


def read_state_dict(path: str | Path, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Tensor]:
    """The named tensors of the weights file ``path``, read with ``weights_only=True``: nothing in it runs.
    ``what`` names the weights in errors ("VGG16 ImageNet weights (torchvision's vgg16-397923af.pth)").

    A pickle that asks for anything but tensors raises :class:`UnsafeWeightsFile`; an unreadable file (truncated,
    not torch's format) or one that is not a mapping of names to tensors raises ``error``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = _refused_global(e)
        if refused is not None:
            raise UnsafeWeightsFile(
                f"{path} is not a plain weights file: its pickle asks for {refused}, and ddpmlab reads weights "
                f"as tensors only, never running a file's code: replace it with the genuine {what}"
            ) from e
        raise error(f"{path} does not hold the {what}: {type(e).__name__}: {mismatch(e)}") from e
    named_tensors = isinstance(state, Mapping) and all(isinstance(k, str) for k in state)
    if not named_tensors or not all(isinstance(v, Tensor) for v in state.values()):
        raise error(f"{path} does not hold the {what}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def as_file(state_dict: Mapping[str, Tensor]) -> io.BytesIO:
    """``state_dict`` as the file object a library's loader reads where it insists on a file: written here by
    ``torch.save`` from tensors alone, so its ``torch.load(weights_only=False)`` has nothing to run. Read once."""
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    buffer.seek(0)
    return buffer


def verify_sha256(path: str | Path, sha256: str, what: str) -> None:
    """Refuse ``path`` unless its SHA-256 is ``sha256``: for files a library must load itself (TorchScript)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != sha256.lower():
        raise UnsafeWeightsFile(
            f"{path} is not the published {what} file (SHA-256 {h.hexdigest()[:12]}..., expected "
            f"{sha256[:12]}...): delete it (it is downloaded again where the machine is online) or put the genuine "
            "file there"
        )


# numpy's pieces of a pickled array: torch-fidelity's cached FID statistics (mu, sigma) are numpy arrays
def _numpy_globals() -> list:
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    numeric = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]  # the dtype classes arrays are built with
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, *numeric]


def check_fidelity_cache(cache_root: str | Path, input_name: str) -> None:
    """torch-fidelity unpickles its cached features and statistics (``<cache_root>/<input_name>-*.pt``) with
    ``weights_only=False``: read each one first as tensors and numpy arrays only, and refuse any that holds more."""
    root = Path(cache_root)
    if not root.is_dir():
        return
    for path in sorted(p for p in root.iterdir() if p.name.startswith(f"{input_name}-") and p.suffix == ".pt"):
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            refused = _refused_global(e) or f"{type(e).__name__}: {str(e).strip()[:80]}"
            raise UnsafeWeightsFile(
                f"{path} is not a plain torch-fidelity cache file ({refused}), and ddpmlab never unpickles more "
                "than tensors and arrays: delete it (torch-fidelity computes it again)"
            ) from e


# ---------------------------------------------------------------------------------------------- LPIPS
VGG16 = "VGG16 ImageNet weights (torchvision's vgg16-397923af.pth)"


def lpips_vgg(vgg16_file: str | Path) -> nn.Module:
    """torchmetrics' LPIPS (Zhang et al. 2018, VGG, version 0.1) with its linear layers (shipped with torchmetrics)
    on the VGG16 ImageNet weights of ``vgg16_file`` (torchvision's ``vgg16-397923af.pth``), read as tensors."""
    from torchmetrics.functional.image.lpips import _LPIPS

    state = read_state_dict(vgg16_file, VGG16)
    net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)  # pnet_rand: torchvision does not load the VGG16
    # torchmetrics cuts VGG16's `features` into slices that keep torchvision's layer numbers (slice3.10 = features.10)
    names = {k: "features." + k.split(".", 1)[1] for k in net.net.state_dict()}
    missing = [v for v in names.values() if v not in state]
    if missing:
        raise ConfigError(f"{vgg16_file} does not hold torchvision's VGG16 weights (no {missing[0]})")
    try:
        net.net.load_state_dict({k: state[v] for k, v in names.items()})
    except RuntimeError as e:  # a tensor of another shape
        raise ConfigError(f"{vgg16_file} does not hold torchvision's VGG16 weights ({mismatch(e)})") from e
    return net.eval().requires_grad_(False)
