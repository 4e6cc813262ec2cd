from ddpmlab.networks.classifier import NoisyClassifier
from ddpmlab.networks.text import TransformerTextEncoder
from ddpmlab.networks.unet import UNet, check_image_size

__all__ = ["NoisyClassifier", "TransformerTextEncoder", "UNet", "check_image_size"]
