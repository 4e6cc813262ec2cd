from ddpmlab.networks.classifier import NoisyClassifier
from ddpmlab.networks.unet import UNet, check_image_size

__all__ = ["NoisyClassifier", "UNet", "check_image_size"]
