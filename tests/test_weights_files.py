"""Weights files are data: a crafted pickle in any weights file ddpmlab reads (torch-fidelity's Inception-v3 for
FID/KID/IS, torchvision's VGG16 for LPIPS and torch-fidelity's vgg16 features, torch-fidelity's cache) is refused
with one line and never runs; files in the genuine format load, into the same networks as the libraries' own
loaders build (random weights here: the real files are not downloadable in the tests)."""

from __future__ import annotations

import os
import re
import shlex
from unittest import mock

import pytest
import torch

from conftest import TINY, compose_cfg, run_cli
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.fid import INCEPTION, INCEPTION_FILE, InceptionUnavailable, fidelity_metrics, inception
from ddpmlab.metrics.image_metrics import inpainting_metrics
from ddpmlab.metrics.lpips import lpips
from ddpmlab.pretrained import UnsafeWeightsFile, as_file, hub_path, verify_sha256
from ddpmlab.training import train
from test_fid import register_tiny_fidelity_extractor

VGG16_FILE = "vgg16-397923af.pth"


class RunsCode:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME (the CLI subprocesses inherit it); returns its hub checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "code_ran"


def at(path, message: str) -> str:
    """The pattern of an error message that starts with ``path``."""
    return re.escape(str(path)) + message


def crafted(path, marker):
    """A weights file whose pickle runs `touch marker`: a state dict with one tensor beside the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": torch.zeros(2), "payload": RunsCode(marker)}, path)
    return path


def test_the_crafted_file_runs_code_when_unpickled(tmp_path, marker):
    """The payload of the tests below is live: what the libraries' own loaders (weights_only=False) would do."""
    path = crafted(tmp_path / INCEPTION_FILE, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- refused
@pytest.mark.parametrize("where", ["weights_path", "hub_cache"])
def test_inception_refuses_a_crafted_weights_file(torch_home, marker, where):
    path = crafted(torch_home / INCEPTION_FILE, marker)
    expected = at(path, " is not a plain weights file: its pickle asks for posix.system")
    with pytest.raises(UnsafeWeightsFile, match=expected):
        inception(str(path) if where == "weights_path" else None)
    assert not marker.exists()


@pytest.mark.parametrize("extractor,name", [(INCEPTION, INCEPTION_FILE), ("vgg16", VGG16_FILE)])
def test_torch_fidelity_never_gets_a_crafted_weights_file(torch_home, marker, extractor, name):
    crafted(torch_home / name, marker)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(UnsafeWeightsFile, match="posix.system"):
        fidelity_metrics(images, images, "ref", feature_extractor=extractor)
    assert not marker.exists()


def test_torch_fidelity_cache_files_are_read_as_tensors_first(tmp_path, marker):
    register_tiny_fidelity_extractor()
    g = torch.Generator().manual_seed(0)
    fake, real = (torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g) for n in (20, 30))
    options = dict(feature_extractor="tiny-test", feature_layer="feat", feature_layer_isc="logits", kid_subsets=5)
    first = fidelity_metrics(fake, real, "ref", cache_dir=tmp_path / "cache", **options)
    stats = tmp_path / "cache" / "ref-tiny-test-stat-fid-feat.pt"
    assert stats.is_file()  # numpy mu and sigma: read back with weights_only=True and numpy's array globals
    assert fidelity_metrics(fake, real, "ref", cache_dir=tmp_path / "cache", **options) == first
    torch.save({"mu": RunsCode(marker)}, stats)
    with pytest.raises(UnsafeWeightsFile, match=at(stats, " is not a plain torch-fidelity cache file .*posix.system")):
        fidelity_metrics(fake, real, "ref", cache_dir=tmp_path / "cache", **options)
    assert not marker.exists()


def test_lpips_refuses_a_crafted_vgg16_file(torch_home, marker):
    crafted(torch_home / VGG16_FILE, marker)
    with pytest.raises(UnsafeWeightsFile, match=at(torch_home / VGG16_FILE, " is not a plain weights file")):
        lpips(1)
    x = torch.zeros(2, 1, 8, 8)
    keep = torch.ones(8, 8)
    keep[:, :4] = 0
    with pytest.raises(UnsafeWeightsFile, match="posix.system"):
        inpainting_metrics(x, x, keep, lpips=True)
    assert not marker.exists()


def test_first_stage_training_with_lpips_refuses_a_crafted_vgg16_file(torch_home, marker, tmp_path):
    from test_latent import AE

    crafted(torch_home / VGG16_FILE, marker)
    cfg = compose_cfg("train", AE + ["first_stage.loss.perceptual_weight=1.0", "trainer.max_steps=2"], tmp_path / "run")
    with pytest.raises(UnsafeWeightsFile, match="posix.system"):
        train(cfg)
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def one_line_error(r, *expected):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("ddpmlab: error:")]
    for text in expected:
        assert text in line, line
    return line


def test_train_with_the_fid_callback_refuses_a_crafted_inception_file(torch_home, marker, tmp_path):
    path = crafted(tmp_path / "inception.pth", marker)
    run = tmp_path / "run"
    r = run_cli(
        "train.py", *TINY, "callbacks=fid", f"callbacks.fid.weights_path={path}", f"hydra.run.dir={run}", cwd=tmp_path
    )
    one_line_error(r, f"{path} is not a plain weights file: its pickle asks for posix.system")
    assert not marker.exists() and not (run / "checkpoints" / "last.ckpt").exists()  # refused before step 1


def test_evaluate_refuses_crafted_inception_and_vgg16_files_in_the_hub_cache(tiny_ckpt, torch_home, marker, tmp_path):
    crafted(torch_home / INCEPTION_FILE, marker)
    common = [f"ckpt_path={tiny_ckpt}", "batch_size=4"]
    fid = ["metrics=[fid]", "fid.num_samples=4", "fid.num_steps=2", f"fid.cache_dir={tmp_path / 'cache'}"]
    r = run_cli("evaluate.py", *common, *fid, f"hydra.run.dir={tmp_path / 'fid'}", cwd=tmp_path)
    one_line_error(r, str(torch_home / INCEPTION_FILE), "posix.system")
    assert "sampler:" not in r.stdout  # refused before drawing any sample
    crafted(torch_home / VGG16_FILE, marker)
    inpaint = ["metrics=[inpaint]", "inpaint.num_images=2", "inpaint.num_steps=4", "inpaint.jump_length=1"]
    inpaint += ["inpaint.jump_n_sample=1", "inpaint.lpips=true"]
    r = run_cli("evaluate.py", *common, *inpaint, f"hydra.run.dir={tmp_path / 'lpips'}", cwd=tmp_path)
    one_line_error(r, str(torch_home / VGG16_FILE), "posix.system")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- not weights
def test_files_that_are_not_inception_weights_keep_their_error(tmp_path):
    """Truncated or foreign files are InceptionUnavailable, as before (the training callback switches off)."""
    truncated = tmp_path / "truncated.pth"
    torch.save({"fc.weight": torch.zeros(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(
        InceptionUnavailable, match=at(truncated, " does not hold the Inception-v3 weights \\(torch-fidelity's")
    ):
        inception(str(truncated))
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(3)}, foreign)
    with pytest.raises(InceptionUnavailable, match=at(foreign, " does not hold the Inception-v3 .*: Missing key")):
        inception(str(foreign))
    torch.save([torch.zeros(3)], foreign)
    with pytest.raises(InceptionUnavailable, match="not a state dict"):
        inception(str(foreign))


def test_a_download_is_checked_against_the_hash_in_its_name(torch_home, marker, tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    served = crafted(tmp_path / "server" / INCEPTION_FILE, marker)
    monkeypatch.setattr(fe, "URL_INCEPTION_V3", served.as_uri())  # torch hub reads file:// URLs as it reads https
    with pytest.raises(InceptionUnavailable, match="could not be downloaded \\(RuntimeError\\)"):
        inception()
    assert not (torch_home / INCEPTION_FILE).exists() and not marker.exists()


def test_torchscript_and_hub_code_extractors(torch_home, tmp_path):
    """CLIP's TorchScript archive must be OpenAI's file; dinov2 would run a hub repository's code."""
    from torch_fidelity.feature_extractor_clip import MODEL_METADATA

    sha256 = MODEL_METADATA["clip-vit-b-32"]["hash"]
    path = hub_path(f"clip-vit-b-32-{sha256}.pt")
    path.write_bytes(b"not the archive")
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(UnsafeWeightsFile, match=at(path, " is not the published CLIP \\(clip-vit-b-32\\) file")):
        fidelity_metrics(images, images, "ref", feature_extractor="clip-vit-b-32")
    import hashlib

    verify_sha256(path, hashlib.sha256(b"not the archive").hexdigest(), "test")  # the check itself passes a match
    with pytest.raises(ConfigError, match="no CLIP weights at .*no.pt"):
        fidelity_metrics(images, images, "ref", feature_extractor="clip-vit-b-32", weights_path=f"{tmp_path}/no.pt")
    with pytest.raises(ConfigError, match="runs the Python code of a torch hub repository"):
        fidelity_metrics(images, images, "ref", feature_extractor="dinov2-vit-s-14")


# ---------------------------------------------------------------------------------------------- genuine format
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved as a state dict like the released file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):  # built without the real weights
        net = FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=as_file({}))
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_from_a_state_dict_is_the_network_its_own_loader_builds(inception_file):
    from torchmetrics.image.fid import NoTrainInceptionV3

    ours = inception(str(inception_file), 2048, logits=True)
    state = torch.load(inception_file, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    # the library reading this (benign) file itself, as before: same features, same no-antialias resize
    theirs = NoTrainInceptionV3(
        INCEPTION, ["2048"], feature_extractor_weights_path=str(inception_file), antialias=False
    )
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours(x), theirs(x)) and ours.features_and_logits(x)[1].shape == (2, 1008)


def test_torch_fidelity_with_a_state_dict_gives_the_numbers_of_its_own_loader(inception_file):
    import torch_fidelity

    from ddpmlab.metrics.fid import UInt8Images

    g = torch.Generator().manual_seed(0)
    fake, real = (torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g) for n in (5, 6))
    ours = fidelity_metrics(fake, real, "ref", weights_path=str(inception_file), kid_subsets=3)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(fake), input2=UInt8Images(real), isc=True, fid=True, kid=True, kid_subset_size=5,
        kid_subsets=3, isc_splits=5, feature_extractor=INCEPTION, feature_layer_fid="2048", feature_layer_kid="2048",
        feature_extractor_weights_path=str(inception_file), cuda=False, samples_shuffle=False, rng_seed=2020,
        verbose=False,
    )  # fmt: skip
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6) and ours["fid"] > 0
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6, abs=1e-9)


def test_lpips_from_a_state_dict_is_the_network_torchmetrics_builds(torch_home, monkeypatch):
    from torchmetrics.functional.image.lpips import _LPIPS
    from torchvision.models import vgg16
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(0)
    state = vgg16(weights=None).state_dict()
    features = {k: v for k, v in state.items() if k.startswith("features.")}  # all LPIPS uses of the file
    torch.save(features, torch_home / VGG16_FILE)
    ours = lpips(3)
    # torchmetrics' own path, torchvision loading VGG16 from the same tensors (in memory: nothing unpickled)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: state)
    theirs = _LPIPS(pretrained=True, net="vgg").eval()
    x, y = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = theirs(x, y).flatten()
        assert torch.allclose(ours(x, y).flatten(), expected, rtol=1e-5) and expected.abs().min() > 0
    torch.save({k: v for k, v in features.items() if k != "features.28.bias"}, torch_home / VGG16_FILE)
    with pytest.raises(ConfigError, match="does not hold torchvision's VGG16 weights \\(no features.28.bias\\)"):
        lpips(3)
