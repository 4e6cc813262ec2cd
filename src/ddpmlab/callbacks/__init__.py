from ddpmlab.callbacks.checkpoint import Checkpoint
from ddpmlab.callbacks.sample_grid import SampleGrid

__all__ = ["Checkpoint", "SampleGrid"]
