"""FID/KID: the protocol helpers, the feature-level metrics, the real-feature cache, torch-fidelity's report,
and the training callback (with a tiny feature network: Inception's weights are not downloadable here)."""

import csv
import json

import pytest
import torch
from torch import nn

from conftest import TINY, compose_cfg, fid_tiny
from ddpmlab.callbacks.fid import FID, share
from ddpmlab.cli.evaluate import evaluate
from ddpmlab.metrics.fid import (
    FeatureMetrics,
    InceptionUnavailable,
    extract_features,
    fidelity_metrics,
    inception,
    real_features,
    to_inception_input,
)
from ddpmlab.training import train


class TinyFeatures(nn.Module):
    """A fixed random conv net: uint8 [N,3,H,W] -> [N,6] (stands in for Inception's 2048-d pool features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))


def images(n, seed, shift=0.0, size=8):
    return (torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 0.5 + shift).clamp(-1, 1)


def test_grey_is_repeated_to_rgb_and_levels_are_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5]).view(1, 1, 2, 2)
    y = to_inception_input(x)
    assert y.dtype == torch.uint8 and y.shape == (1, 3, 2, 2)
    assert torch.equal(y[0, 0], torch.tensor([[0, 128], [255, 191]], dtype=torch.uint8))
    assert torch.equal(y[0, 0], y[0, 2])


def test_feature_level_metrics_equal_torchmetrics_fed_images():
    """Features computed once and fed to both metrics give torchmetrics' own numbers from the images."""
    from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance

    net = TinyFeatures()
    real, fake = to_inception_input(images(64, 0)), to_inception_input(images(48, 1, shift=0.3))
    ours = FeatureMetrics(6, kid_subset_size=40, kid_subsets=5)
    ours.update(net(real), real=True)
    ours.update(net(fake[:30]), real=False)
    ours.update(net(fake[30:]), real=False)
    got = ours.compute(seed=3)

    fid = FrechetInceptionDistance(feature=net)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    kid = KernelInceptionDistance(feature=net, subset_size=40, subsets=5)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(3)
    kid_mean, _ = kid.compute()
    assert got["fid"] == pytest.approx(float(fid.compute()), rel=1e-5)
    assert got["kid"] == pytest.approx(float(kid_mean), rel=1e-5)
    assert got["fid"] > 0.01  # a shifted distribution is measurably far


def test_fid_is_near_zero_for_the_same_distribution_and_reset_keeps_the_reference():
    net = TinyFeatures()
    m = FeatureMetrics(6, kid_subset_size=100, kid_subsets=10)
    m.update(extract_features(net, images(400, 0)), real=True)
    m.update(extract_features(net, images(400, 1)), real=False)
    same = m.compute()
    m.reset()  # forgets the generated features only
    m.update(extract_features(net, images(400, 2, shift=0.5)), real=False)
    shifted = m.compute()
    assert same["fid"] < 0.05 * shifted["fid"]
    assert abs(same["kid"]) < 0.05 * shifted["kid"]


def test_share_gives_each_rank_its_own_contiguous_chunks_and_seeds():
    assert share(20, 8, 0, 1) == [(0, 8), (1, 8), (2, 4)]
    r0, r1 = share(20, 8, 0, 2), share(20, 8, 1, 2)
    assert r0 == [(0, 8), (1, 8)] and r1 == [(2, 4)]
    four = [share(100, 7, r, 4) for r in range(4)]
    chunks = [k for s in four for k, _ in s]
    assert chunks == list(range(15))  # every chunk once, in rank order
    assert sum(n for s in four for _, n in s) == 100


def test_real_features_are_computed_once_and_cached(tmp_path):
    net = TinyFeatures()
    imgs = to_inception_input(images(30, 0))
    path = tmp_path / "stats" / "digits.pt"
    first = real_features(net, imgs, path, batch_size=7)
    assert path.is_file() and first.shape == (30, 6)

    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have been used")

    assert torch.equal(real_features(Exploding(), imgs, path), first)


def test_missing_inception_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(InceptionUnavailable, match="no Inception weights at .*weights-inception"):
        inception(str(tmp_path / "nowhere.pth"))


# ------------------------------------------------------------------ torch-fidelity (evaluate.py's engine)
def register_tiny_fidelity_extractor():
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyFidelity(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = TinyFeatures()

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" else "feat"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            f = self.net(x)
            out = {"feat": f, "logits": torch.cat([f, -f], 1) * 4}
            return tuple(out[k] for k in self.features_list)

    if "tiny-test" not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("tiny-test", TinyFidelity)


def test_fidelity_metrics_report_fid_kid_is_and_cache_the_reference(tmp_path):
    register_tiny_fidelity_extractor()
    real, fake = images(120, 0), images(60, 1, shift=0.4)
    kwargs = dict(feature_extractor="tiny-test", feature_layer="feat", feature_layer_isc="logits", kid_subsets=5)
    a = fidelity_metrics(fake, real, "digits-test", cache_dir=tmp_path / "cache", **kwargs)
    assert set(a) == {"fid", "kid", "kid_std", "is", "is_std"}
    assert a["fid"] > 0 and a["is"] >= 1.0
    assert list((tmp_path / "cache").iterdir())  # the reference's features were cached under its name
    b = fidelity_metrics(fake, real, "digits-test", cache_dir=tmp_path / "cache", **kwargs)
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6) and b["kid"] == pytest.approx(a["kid"], rel=1e-6)


# ------------------------------------------------------------------ the callback in a training run
FID_TINY = fid_tiny("test_fid.TinyFeatures")


def test_callback_logs_fid_and_kid_during_training(train_cfg, tmp_path):
    cache = tmp_path / "fid_stats"
    cfg = train_cfg(*FID_TINY, f"callbacks.fid.cache_dir={cache}")
    assert cfg.callbacks.fid.feature == {"_target_": "test_fid.TinyFeatures"}
    metrics = train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    fids = {int(r["step"]): float(r["val/fid"]) for r in rows if r.get("val/fid")}
    assert sorted(fids) == [2, 5] and all(v > 0 for v in fids.values())  # steps 3 and 6: Lightning's indices 2, 5
    assert metrics["val/fid"] == pytest.approx(fids[5], rel=1e-6)
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["val/kid"] == pytest.approx(
        metrics["val/kid"]
    )
    [stats] = cache.glob("digits-1x8x8-n200-TinyFeatures-*.pt")  # one cached reference, reused at step 6
    assert torch.load(stats, weights_only=True)["features"].shape == (200, 6)


def test_callback_without_inception_weights_says_so_once_and_training_goes_on(train_cfg, tmp_path):
    cfg = train_cfg(
        "callbacks=fid", f"callbacks.fid.weights_path={tmp_path / 'missing.pth'}", "callbacks.fid.every_n_steps=3"
    )
    with pytest.warns(UserWarning, match="FID callback switched off") as record:
        metrics = train(cfg)
    assert sum("FID callback switched off" in str(w.message) for w in record) == 1
    assert "val/fid" not in metrics and metrics["val/loss"] > 0
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_callback_rejects_too_few_samples():
    from ddpmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="num_samples"):
        FID(num_samples=1)


def test_evaluate_writes_fid_kid_is_and_the_protocol_to_metrics_json(tmp_path):
    register_tiny_fidelity_extractor()
    train(
        compose_cfg("train", TINY + ["trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=0"], tmp_path / "run")
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    over = [
        f"ckpt_path={ckpt}",
        "metrics=[fid]",
        "batch_size=8",
        "fid.num_samples=20",
        "fid.num_real=100",
        "fid.num_steps=3",
        "fid.kid_subsets=5",
        "fid.feature_extractor=tiny-test",
        "fid.feature_layer=feat",
        "fid.feature_layer_isc=logits",
        f"fid.cache_dir={tmp_path / 'cache'}",
    ]
    results = evaluate(compose_cfg("evaluate", over, tmp_path / "eval"), tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["fid"]
    assert saved == json.loads(json.dumps(results["fid"]))
    assert saved["fid"] > 0 and saved["is"] >= 1.0 and "kid" in saved and "kid_std" in saved
    p = saved["protocol"]
    assert p["num_samples"] == 20 and p["num_real"] == 100 and p["steps"] == 3 and p["seed"] == 0
    assert p["reference"] == "digits-train-1x8x8-first100" and p["sampler"]["algorithm"] == "ddpm" and p["devices"] == 1
    # the same seed gives the same samples, hence the same numbers (and the cached reference is reused)
    again = evaluate(compose_cfg("evaluate", over, tmp_path / "again"), tmp_path / "again")["fid"]
    assert again["fid"] == pytest.approx(saved["fid"], rel=1e-6)
