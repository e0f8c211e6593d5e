"""Built-in model definitions (no torchvision): a CIFAR ResNet-18, a small MobileNetV2 and a tiny transformer."""

from autocompress.models.mobilenet import mobilenet_v2_small
from autocompress.models.resnet import resnet18_cifar
from autocompress.models.transformer import tiny_transformer

__all__ = ["mobilenet_v2_small", "resnet18_cifar", "tiny_transformer"]
