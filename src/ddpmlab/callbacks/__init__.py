from ddpmlab.callbacks.caption import CaptionAccuracy
from ddpmlab.callbacks.checkpoint import AtomicCheckpointIO, Checkpoint, OnExceptionCheckpoint
from ddpmlab.callbacks.sample_grid import SampleGrid

__all__ = ["AtomicCheckpointIO", "CaptionAccuracy", "Checkpoint", "OnExceptionCheckpoint", "SampleGrid"]
