"""Kernel layers: each maps a covariance state to the next and builds its finite torch layer."""

from .base import FiniteBuild, Layer, Nonlinearity, WeightedLayer
from .combinators import Sequential, Sum, resnet_block
from .conv import Conv2d
from .dense import Dense
from .elementwise import Elementwise
from .erf import Erf
from .gelu import GELU
from .leaky_relu import LeakyReLU
from .pooling import AvgPool2d, GlobalAvgPool2d
from .relu import ReLU

__all__ = [
    "AvgPool2d",
    "Conv2d",
    "Dense",
    "Elementwise",
    "Erf",
    "GELU",
    "GlobalAvgPool2d",
    "LeakyReLU",
    "FiniteBuild",
    "Layer",
    "Nonlinearity",
    "ReLU",
    "WeightedLayer",
    "Sequential",
    "Sum",
    "resnet_block",
]
