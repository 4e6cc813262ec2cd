from ddpmlab.lit.classifier import ClassifierModule
from ddpmlab.lit.ema import EMA
from ddpmlab.lit.module import DiffusionModule

__all__ = ["EMA", "ClassifierModule", "DiffusionModule"]
