"""Built-in model definitions (no torchvision): a CIFAR ResNet-18 and a tiny transformer."""

from autocompress.models.resnet import resnet18_cifar
from autocompress.models.transformer import tiny_transformer

__all__ = ["resnet18_cifar", "tiny_transformer"]
