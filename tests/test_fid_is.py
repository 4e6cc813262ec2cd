"""The Inception Score beside FID/KID: torchmetrics' InceptionScore fed logits against the formula, and the
training callback logging val/is from the logits of the same feature pass (a tiny feature network)."""

import csv

import pytest
import torch
from torch import nn

from conftest import fid_tiny
from ddpmlab.metrics.fid import inception_score
from ddpmlab.training import train


class TinyFeaturesAndLogits(nn.Module):
    """A fixed random conv net: uint8 [N,3,H,W] -> features [N,6] and logits [N,5] from the same pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.features_and_logits(x)[0]

    def features_and_logits(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        features = torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))
        return features, 4 * self.head(features)


def is_direct(logits, splits, seed):
    """exp E_x KL(p(y|x) || p(y)) per split of a seeded permutation (Salimans et al. 2016); (mean, std)."""
    torch.manual_seed(seed)
    logits = logits[torch.randperm(len(logits))]
    scores = []
    for part in logits.chunk(splits):
        p = part.softmax(1)
        p_y = p.mean(0, keepdim=True)
        scores.append(torch.exp((p * (part.log_softmax(1) - p_y.log())).sum(1).mean()))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std())


def test_inception_score_of_logits_is_the_formula():
    logits = torch.randn(60, 7, generator=torch.Generator().manual_seed(1)) * 3
    metric = inception_score(7, splits=3)
    metric.update(logits[:25])
    metric.update(logits[25:])
    torch.manual_seed(5)
    mean, std = metric.compute()
    assert (float(mean), float(std)) == pytest.approx(is_direct(logits, 3, 5), rel=1e-5)
    certain = torch.eye(7).repeat(4, 1) * 100  # every class equally often, each sample certain: IS = K
    metric = inception_score(7, splits=1)
    metric.update(certain)
    assert float(metric.compute()[0]) == pytest.approx(7.0, rel=1e-4)


FID_TINY = fid_tiny("test_fid_is.TinyFeaturesAndLogits", "callbacks.fid.isc_splits=2")


def test_callback_logs_the_inception_score_beside_fid(train_cfg, tmp_path):
    metrics = train(train_cfg(*FID_TINY, f"callbacks.fid.cache_dir={tmp_path / 'fid_stats'}"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    scores = {int(r["step"]): float(r["val/is"]) for r in rows if r.get("val/is")}
    fids = {int(r["step"]): float(r["val/fid"]) for r in rows if r.get("val/fid")}
    assert sorted(scores) == sorted(fids) == [2, 5]
    assert all(1.0 <= v <= 5.0 for v in scores.values())  # 1 <= IS <= the number of classes
    assert metrics["val/is"] == pytest.approx(scores[5], rel=1e-6)


def test_a_feature_network_without_logits_warns_and_fid_goes_on(train_cfg, tmp_path):
    cfg = train_cfg(
        *FID_TINY[:1],
        "+callbacks.fid.feature._target_=test_fid.TinyFeatures",
        *FID_TINY[2:],
        f"callbacks.fid.cache_dir={tmp_path / 'fid_stats'}",
    )
    with pytest.warns(UserWarning, match="no Inception Score during training"):
        metrics = train(cfg)
    assert "val/is" not in metrics and metrics["val/fid"] > 0
