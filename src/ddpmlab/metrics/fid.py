"""FID, KID and IS with the papers' protocol, shared by the training callback and ``evaluate.py``.

The protocol (Heusel et al. 2017, whose TensorFlow code DDPM Sec. 4 used): uint8 RGB images, grey ones
repeated to 3 channels; Inception-v3 as the 2015-12-05 TF graph (torch-fidelity's port), which resizes to
299x299 with TF1's bilinear interpolation, *no antialiasing*; the 2048-d pool features; FID of N generated
samples against the training set. Numbers from torchvision's Inception or an antialiased resize are not
comparable with published ones.

Two engines, one protocol: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` during
training (their states sync across DDP ranks), ``torch_fidelity.calculate_metrics`` for final reports (with
IS and its own cache of real statistics). Both are fed uint8 images from :func:`to_inception_input`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from ddpmlab.errors import ConfigError
from ddpmlab.fileio import atomic_path
from ddpmlab.images import to_uint8
from ddpmlab.pretrained import (
    VGG16,
    as_file,
    check_fidelity_cache,
    download,
    hub_path,
    mismatch,
    read_state_dict,
    verify_sha256,
)
from ddpmlab.samplers import generate

INCEPTION = "inception-v3-compat"  # torch-fidelity's name for the TF Inception graph
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch hub caches under $TORCH_HOME/hub/checkpoints
INCEPTION_WEIGHTS = f"Inception-v3 weights (torch-fidelity's {INCEPTION_FILE})"


class InceptionUnavailable(ConfigError):
    """The Inception-v3 weights could not be loaded (no file at the configured path, no hub cache, no network)."""


def to_inception_input(images: Tensor) -> Tensor:
    """Model-range float images [N,C,H,W] in [-1, 1] (or uint8 ones) -> uint8 [N,3,H,W]; grey repeated to RGB.

    The resize to 299x299 is left to the Inception network itself (TF1 bilinear, no antialiasing)."""
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ConfigError(f"FID needs grey or RGB images, got {x.shape[1]} channels")
    return x.contiguous()


def inception_weights(weights_path: str | None = None) -> str:
    """The path of the Inception-v3 weights: ``weights_path`` if given, else torch hub's cache
    ($TORCH_HOME/hub/checkpoints/INCEPTION_FILE), downloaded there (hash-checked) where the machine has internet."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InceptionUnavailable(f"no Inception weights at {path} (expected torch-fidelity's {INCEPTION_FILE})")
        return str(path)
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    hub = hub_path(URL_INCEPTION_V3)
    if not hub.is_file():
        try:
            download(URL_INCEPTION_V3, hub)
        except Exception as e:  # offline: the usual case on compute nodes
            raise InceptionUnavailable(
                f"Inception-v3 weights are not in the hub cache and could not be downloaded ({type(e).__name__}); "
                f"put {INCEPTION_FILE} at {hub} or pass its path as weights_path"
            ) from e
    return str(hub)


def inception_present(weights_path: str | None = None) -> bool:
    """Whether the Inception-v3 weights are on this machine (``weights_path`` or the hub cache); downloads nothing."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    path = Path(weights_path).expanduser() if weights_path is not None else hub_path(URL_INCEPTION_V3)
    return path.is_file()


def inception_state_dict(weights_path: str | None = None) -> tuple[str, dict[str, Tensor]]:
    """The Inception-v3 weights file (:func:`inception_weights`) and its tensors, read with ``weights_only=True``:
    torch-fidelity would unpickle the file itself, running whatever it holds (UnsafeWeightsFile instead)."""
    path = inception_weights(weights_path)
    return path, read_state_dict(path, INCEPTION_WEIGHTS, InceptionUnavailable)


def inception(weights_path: str | None = None, feature: int = 2048, logits: bool = False) -> nn.Module:
    """torch-fidelity's Inception-v3 (through torchmetrics) returning ``feature``-d pool features; TF1 resize,
    no antialiasing. Weights from :func:`inception_state_dict`. ``logits``: it also has ``features_and_logits(x)``,
    the pool features and the 1008 unbiased logits (the Inception Score's) from the same forward pass."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class InceptionWithLogits(NoTrainInceptionV3):
        def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
            features, logits = self._torch_fidelity_forward(x)[:2]
            return features.reshape(x.shape[0], -1), logits

    path, state = inception_state_dict(weights_path)
    layers = [str(feature), "logits_unbiased"] if logits else [str(feature)]
    try:  # the network loads its weights from a file: it gets the tensors just read, never the file itself
        net = (InceptionWithLogits if logits else NoTrainInceptionV3)(
            name=INCEPTION, features_list=layers, feature_extractor_weights_path=as_file(state), antialias=False
        )
    except Exception as e:  # other names or shapes
        raise InceptionUnavailable(f"{path} does not hold the {INCEPTION_WEIGHTS}: {mismatch(e)}") from e
    net.num_features = feature
    return net


def fidelity_weights(feature_extractor: str, weights_path: str | None):
    """What torch-fidelity's ``feature_extractor`` gets as its weights path, which it would unpickle itself: for
    Inception-v3 and VGG16 the tensors read here (a file object), for CLIP's TorchScript archive the file once its
    SHA-256 is OpenAI's; extractors registered in-process get ``weights_path`` unchanged."""
    if feature_extractor == INCEPTION:
        return as_file(inception_state_dict(weights_path)[1])
    if feature_extractor == "vgg16":
        from torchvision.models import VGG16_Weights

        url = VGG16_Weights.IMAGENET1K_V1.url
        path = Path(weights_path).expanduser() if weights_path else hub_path(url)
        if weights_path is None and not path.is_file():
            try:
                download(url, path)
            except Exception as e:
                raise ConfigError(
                    f"VGG16 weights are not in the hub cache and could not be downloaded ({type(e).__name__}): "
                    f"put {path.name} at {path} or pass its path as weights_path"
                ) from e
        if not path.is_file():
            raise ConfigError(f"no VGG16 weights at {path} (expected torchvision's {Path(url).name})")
        return as_file(read_state_dict(path, VGG16))
    if feature_extractor.startswith("clip-"):
        from torch_fidelity.feature_extractor_clip import MODEL_METADATA

        if feature_extractor in MODEL_METADATA:
            sha256 = MODEL_METADATA[feature_extractor]["hash"]
            # torch-fidelity's own cache name; a missing file is downloaded by torch hub with this hash checked
            path = Path(weights_path).expanduser() if weights_path else hub_path(f"{feature_extractor}-{sha256}.pt")
            if weights_path and not path.is_file():
                raise ConfigError(f"no CLIP weights at {path} (expected OpenAI's {feature_extractor} TorchScript file)")
            if path.is_file():
                verify_sha256(path, sha256, f"CLIP ({feature_extractor})")
        return weights_path
    if feature_extractor.startswith("dinov2-"):
        raise ConfigError(
            f"fid.feature_extractor={feature_extractor} runs the Python code of a torch hub repository "
            "(facebookresearch/dinov2), which ddpmlab cannot check: use inception-v3-compat (the papers'), vgg16 or "
            "a clip-* extractor"
        )
    return weights_path


def extractor_id(net: nn.Module) -> str:
    """A short name for a feature network, for cache file names: the Inception layer, or a hash of the weights."""
    if hasattr(net, "features_list") and getattr(net, "name", None) == INCEPTION:
        return f"inception{net.features_list[0]}"
    h = hashlib.sha1()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(net).__name__}-{h.hexdigest()[:10]}"


@torch.no_grad()
def extract_features(net: nn.Module, images: Tensor, batch_size: int = 256, device="cpu") -> Tensor:
    """Features [N, D] (float32, CPU) of uint8 or [-1, 1] images [N,C,H,W], in batches on ``device``."""
    batches = (images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size))
    return torch.cat([net(to_inception_input(x)).float().cpu() for x in batches])


def real_features(net: nn.Module, images: Tensor, cache_file: str | Path | None, batch_size=256, device="cpu"):
    """The features of the real images, read from ``cache_file`` when it exists, else computed and saved there."""
    if cache_file is not None and Path(cache_file).is_file():
        return torch.load(cache_file, map_location="cpu", weights_only=True)["features"]
    features = extract_features(net, images, batch_size, device)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:  # a reader never sees half a file
            torch.save({"features": features, "num_images": len(images), "extractor": extractor_id(net)}, tmp)
    return features


def real_stats_file(cache_dir: str | Path, dataset: str, images: Tensor, net: nn.Module) -> Path:
    """``<cache_dir>/<dataset>-<C>x<H>x<W>-n<N>-<extractor>.pt``: one file per dataset, resolution and network."""
    n, c, h, w = images.shape
    return Path(cache_dir).expanduser() / f"{dataset}-{c}x{h}x{w}-n{n}-{extractor_id(net)}.pt"


class Precomputed(nn.Module):
    """The 'feature network' of metrics fed features: the real network runs once per batch for FID and KID
    together, and cached real features go in without it."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def inception_score(num_classes: int, splits: int = 10) -> nn.Module:
    """torchmetrics' InceptionScore fed logits [N, K] (``update(logits)``, synced across DDP ranks at ``compute``):
    exp E_x KL(p(y | x) || p(y)) (Salimans et al. 2016) in ``splits`` groups; ``compute`` -> (mean, std)."""
    from torchmetrics.image import InceptionScore

    return InceptionScore(feature=Precomputed(num_classes), splits=splits)


class FeatureMetrics(nn.Module):
    """FID and KID (torchmetrics, synced across DDP ranks at ``compute``) over precomputed features.

    Real features stay between evaluations; ``reset`` forgets only the generated ones."""

    def __init__(self, num_features: int, kid_subset_size: int = 1000, kid_subsets: int = 100):
        super().__init__()
        import warnings

        from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance

        feature = Precomputed(num_features)
        self.num_features = num_features
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False)
        with warnings.catch_warnings():  # "KID will save all extracted features": that is the point
            warnings.simplefilter("ignore", UserWarning)
            self.kid = KernelInceptionDistance(
                feature=feature, subsets=kid_subsets, subset_size=kid_subset_size, reset_real_features=False
            )
        # KID's states are lists gathered element by element: every rank must hold as many entries as the
        # others, so each rank's features go in as one tensor just before compute.
        self._pending: dict[bool, list[Tensor]] = {True: [], False: []}

    def update(self, features: Tensor, real: bool) -> None:
        self.fid.update(features, real=real)
        self._pending[real].append(features)

    def compute(self, seed: int = 0) -> dict[str, float]:
        """{"fid", "kid", "kid_std"}; KID's random subsets come from ``seed``, so every rank (and a rerun) agrees."""
        for real, pending in self._pending.items():
            if pending or not real:
                empty = torch.empty(0, self.num_features, device=self.fid.fake_features_sum.device)
                self.kid.update(torch.cat(pending) if pending else empty, real=real)
            pending.clear()
        fid = self.fid.compute()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid, kid_std = self.kid.compute()
        return {"fid": float(fid), "kid": float(kid), "kid_std": float(kid_std)}

    def reset(self) -> None:
        self.fid.reset()
        self.kid.reset()
        self._pending[False].clear()


# ---------------------------------------------------------------------------------------------- samples, reference
def share(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's chunks as (k, n): chunk k holds n images and is drawn from the seed offset k."""
    num_chunks = -(-num_samples // batch_size)
    mine = torch.arange(num_chunks).tensor_split(world_size)[rank].tolist()
    return [(k, min(batch_size, num_samples - k * batch_size)) for k in mine]


def real_images(datamodule, num_real: int | None) -> Tensor:
    """The first ``num_real`` training images (all when None) as uint8 [N,C,H,W]."""
    ds = getattr(datamodule, "train_set", None)
    if ds is None:
        raise ConfigError("FID needs a data module with a train_set: its images are the reference")
    if isinstance(getattr(ds, "images", None), Tensor):
        images = ds.images
        return images[:num_real] if num_real else images
    n = len(ds) if not num_real else min(num_real, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=256, shuffle=False)
    return torch.cat([to_uint8(x) for x, *_ in loader])


def generate_chunks(
    denoiser, sampler, chunks: list[tuple[int, int]], seed: int, perf=None, progress=None, conds=None,
    chunk_size: int = 0,
) -> Tensor:  # fmt: skip
    """Samples [sum n, C, H, W] in [-1, 1] on the denoiser's device; chunk (k, n) draws its n images from the
    seed ``seed + k`` (:func:`ddpmlab.samplers.generate`), so a sample set does not depend on how the chunks were
    shared out. A model conditioned on an image draws sample i (chunk k holds i = k * chunk_size ...) for the
    condition ``conds[i % len(conds)]`` of a pool of M conditions (a :class:`~ddpmlab.conditioning.Cond`)."""

    def cond_of(k: int, n: int):
        return None if conds is None else conds[(k * chunk_size + torch.arange(n)) % len(conds)]

    out = [
        generate(
            denoiser,
            sampler,
            n,
            seed=seed + k,
            batch_size=n,
            cond=cond_of(k, n),
            perf=perf,
            to_cpu=False,
            progress=progress or False,
        )  # fmt: skip
        for k, n in chunks
    ]
    if not out:
        device = next(denoiser.parameters()).device
        return torch.empty(0, *denoiser.sample_shape, device=device)
    return torch.cat(out).clamp(-1, 1)


def generate_on_devices(
    denoiser, sampler, num_samples: int, batch_size: int, seed: int, devices: list, perf=None, conds=None,
    progress: bool = True, chunks: list[tuple[int, int]] | None = None,
) -> Tensor:  # fmt: skip
    """``num_samples`` images as uint8 [N,C,H,W] on the CPU, the chunks shared out over ``devices`` (one thread
    and one copy of the denoiser per device); the same images whatever the number of devices. ``conds``: the pool
    of conditions of an image-conditioned model (:func:`generate_chunks`). ``chunks``: only these chunks (k, n) of
    the ``num_samples`` (one rank's :func:`share`), all of them when None."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from ddpmlab.progress import SamplingProgress

    chunks = chunks if chunks is not None else share(num_samples, batch_size, 0, 1)
    evals = sampler.num_evaluations(denoiser.diffusion) * len(chunks)
    split = [c.tolist() for c in torch.arange(len(chunks)).tensor_split(len(devices))]

    def run(rank: int) -> Tensor:
        model = denoiser if len(devices) == 1 else copy.deepcopy(denoiser).to(devices[rank])
        mine = [chunks[i] for i in split[rank]]
        x = generate_chunks(model, sampler, mine, seed, perf, progress=bar.wrap, conds=conds, chunk_size=batch_size)
        return to_uint8(x).cpu()

    label = f"sampling {sum(n for _, n in chunks)}"
    with SamplingProgress(evals, label, enabled=progress) as bar, ThreadPoolExecutor(len(devices)) as pool:
        return torch.cat(list(pool.map(run, range(len(devices)))))


def generate_across_ranks(
    denoiser, sampler, num_samples: int, batch_size: int, seed: int, perf=None, conds=None, progress: bool = True
) -> Tensor:  # fmt: skip
    """:func:`generate_on_devices` over the ranks of an initialised process group (evaluate.py under torchrun or
    SLURM): each rank draws its own chunks (:func:`share`) once, on its own device, and every rank gets them all
    back in chunk order, as uint8 [N,C,H,W] on the CPU: the images one process draws."""
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = generate_on_devices(
        denoiser, sampler, num_samples, batch_size, seed, [next(denoiser.parameters()).device], perf, conds,
        progress=progress and rank == 0, chunks=share(num_samples, batch_size, rank, world_size),
    )  # fmt: skip
    shares: list = [None] * world_size
    dist.all_gather_object(shares, mine)  # uint8 on the CPU: gloo and NCCL alike
    return torch.cat(shares)  # share() deals out contiguous runs of chunks: rank order is chunk order


# ---------------------------------------------------------------------------------------------- torch-fidelity
class UInt8Images(torch.utils.data.Dataset):
    """uint8 [N,3,H,W] images as the Dataset torch-fidelity reads (one uint8 [3,H,W] tensor per item)."""

    def __init__(self, images: Tensor):
        self.images = to_inception_input(images).cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def fidelity_metrics(
    fake: Tensor,
    real: Tensor,
    real_name: str,
    *,
    isc: bool = True,
    fid: bool = True,
    kid: bool = True,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    feature_extractor: str = INCEPTION,
    feature_layer: str = "2048",
    feature_layer_isc: str = "logits_unbiased",
    weights_path: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 2020,
) -> dict[str, float]:
    """FID / KID / IS of generated images ``fake`` against ``real`` with torch-fidelity.

    Both are uint8 or [-1, 1] images [N,C,H,W]. The real set's features are cached by torch-fidelity under
    ``cache_dir`` with the name ``real_name`` (say ``cifar10-train-32``): give each reference set its own name.
    Returns {"fid", "kid", "kid_std", "is", "is_std"} for the metrics asked for."""
    import torch_fidelity

    weights = fidelity_weights(feature_extractor, weights_path)
    if cache_dir is not None and (fid or kid):
        check_fidelity_cache(Path(cache_dir).expanduser(), real_name)
    n_fake, n_real = len(fake), len(real)
    subset = min(kid_subset_size, n_fake, n_real)
    options = dict(
        input1=UInt8Images(fake),
        input2=UInt8Images(real) if (fid or kid) else None,
        input2_cache_name=real_name if (fid or kid) else None,
        cache=cache_dir is not None,
        cache_root=None if cache_dir is None else str(Path(cache_dir).expanduser()),
        isc=isc,
        fid=fid,
        kid=kid,
        kid_subset_size=subset,
        kid_subsets=kid_subsets,
        isc_splits=min(10, n_fake),
        feature_extractor=feature_extractor,
        feature_layer_fid=feature_layer,
        feature_layer_kid=feature_layer,
        feature_layer_isc=feature_layer_isc,
        feature_extractor_weights_path=weights,
        batch_size=batch_size,
        cuda=torch.device(device).type == "cuda",
        samples_shuffle=False,
        rng_seed=seed,
        verbose=False,
    )
    try:
        raw = torch_fidelity.calculate_metrics(**options)
    except RuntimeError as e:  # the tensors read for the extractor have other names or shapes
        if "Error(s) in loading state_dict" not in str(e):
            raise
        source = weights_path or f"torch hub's cache ({torch.hub.get_dir()})"
        raise ConfigError(f"{source} does not hold {feature_extractor}'s weights ({mismatch(e)})") from e
    names = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid",
        "kernel_inception_distance_std": "kid_std",
        "inception_score_mean": "is",
        "inception_score_std": "is_std",
    }
    return {names[k]: float(v) for k, v in raw.items() if k in names}
