"""Kernel layers: each maps a covariance state to the next and builds its finite torch layer."""

from .base import Context, FiniteBuild, Layer
from .combinators import Sequential, Sum, resnet_block
from .conv import Conv2d
from .relu import Nonlinearity, ReLU

__all__ = [
    "Context",
    "Conv2d",
    "FiniteBuild",
    "Layer",
    "Nonlinearity",
    "ReLU",
    "Sequential",
    "Sum",
    "resnet_block",
]
