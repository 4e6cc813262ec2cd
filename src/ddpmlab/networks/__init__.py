from ddpmlab.networks.classifier import NoisyClassifier
from ddpmlab.networks.clip_text import CLIPTextEncoder
from ddpmlab.networks.text import TransformerTextEncoder
from ddpmlab.networks.unet import UNet, check_image_size

__all__ = ["CLIPTextEncoder", "NoisyClassifier", "TransformerTextEncoder", "UNet", "check_image_size"]
