"""The two FID implementations ddpmlab uses agree: torchmetrics (the training callback, ddpm FeatureMetrics) and
torch-fidelity (evaluate.py's reports), fed the same features."""

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from ddpmlab.metrics.fid import FeatureMetrics


def test_torchmetrics_and_torch_fidelity_give_the_same_fid_on_the_same_features():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    real = torch.randn(600, 8, generator=g, dtype=torch.float64) @ mix.double()
    fake = 0.8 * torch.randn(500, 8, generator=g, dtype=torch.float64) @ mix.double() + 0.3
    ours = FeatureMetrics(8, kid_subset_size=100, kid_subsets=5)
    ours.update(real.float(), real=True)
    ours.update(fake.float(), real=False)
    fid_torchmetrics = ours.compute()["fid"]
    stats = [fid_features_to_statistics(x) for x in (fake, real)]
    fid_fidelity = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert fid_fidelity > 1.0  # the sets differ: a real comparison, not 0 == 0
    assert abs(fid_torchmetrics - fid_fidelity) < 1e-3 * fid_fidelity, (fid_torchmetrics, fid_fidelity)
