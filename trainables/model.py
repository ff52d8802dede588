"""CIFAR ResNet18: torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool."""
from __future__ import annotations

import torch.nn as nn
from torchvision.models import resnet18

ARCH = "cifar_resnet18"


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet18 for 32x32 inputs (11.17 M parameters with 10 classes).

    The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 32x32 image to 8x8 before
    the first block; the CIFAR variant keeps full resolution with a 3x3 stride-1 conv.
    """
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
