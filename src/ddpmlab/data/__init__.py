from ddpmlab.data.datamodule import DATASETS, DiffusionDataModule
from ddpmlab.data.datasets import NO_LABEL, CaptionedTensorDataset, DigitPairsDataset, ImageTensorDataset
from ddpmlab.data.device_loader import DeviceLoader
from ddpmlab.data.files import CaptionedImageFileDataset, ImageFileDataset
from ddpmlab.images import to_model_range, to_uint8

__all__ = [
    "DATASETS",
    "NO_LABEL",
    "CaptionedImageFileDataset",
    "CaptionedTensorDataset",
    "DigitPairsDataset",
    "DeviceLoader",
    "DiffusionDataModule",
    "ImageFileDataset",
    "ImageTensorDataset",
    "to_model_range",
    "to_uint8",
]
