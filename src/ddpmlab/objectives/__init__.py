from ddpmlab.objectives.losses import MinSNRLoss, SimpleLoss, mean_flat

__all__ = ["MinSNRLoss", "SimpleLoss", "mean_flat"]
