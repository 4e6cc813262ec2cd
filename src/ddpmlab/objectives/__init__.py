from ddpmlab.objectives.hybrid import HybridLoss, VLBLoss
from ddpmlab.objectives.losses import MinSNRLoss, SimpleLoss, mean_flat
from ddpmlab.objectives.timestep_samplers import ImportanceSampler, TimestepSampler, UniformSampler

__all__ = [
    "HybridLoss",
    "ImportanceSampler",
    "MinSNRLoss",
    "SimpleLoss",
    "TimestepSampler",
    "UniformSampler",
    "VLBLoss",
    "mean_flat",
]
