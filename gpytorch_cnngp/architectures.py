"""The three architectures of the paper's MNIST table, with its hyperparameters.

``image_size`` lets the same architectures run on smaller images (tests, Monte-Carlo studies): the
readout layer always covers the whole final map.
"""

from __future__ import annotations

from .layers import AvgPool2d, Conv2d, Dense, GlobalAvgPool2d, Layer, ReLU, Sequential, Sum, resnet_block

__all__ = ["convnet_gp", "residual_cnn_gp", "resnet32_gp", "pooled_cnn_gp", "ARCHITECTURES", "PAPER_RESULTS"]

#: Published MNIST errors (validation, test) of the paper's table, as fractions.
PAPER_RESULTS = {
    "convnet_gp": (0.0071, 0.0103),
    "residual_cnn_gp": (0.0072, 0.0096),
    "resnet32_gp": (0.0068, 0.0084),
}


def _check_size(image_size: int, multiple: int = 1) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < multiple:
        raise ValueError(f"image_size must be an integer >= {multiple}, got {image_size!r}")
    if image_size % multiple:
        raise ValueError(f"image_size must be a multiple of {multiple} for this architecture, got {image_size}")


def convnet_gp(
    image_size: int = 28,
    var_weight: float = 2.79,
    var_bias: float = 7.86,
    depth: int = 7,
    kernel_size: int = 7,
) -> Layer:
    """ConvNet GP: ``depth`` x [Conv2d(k, "same"), ReLU] and a dense readout (MNIST: 1.03% test error)."""
    _check_size(image_size)
    hidden = []
    for _ in range(depth):
        hidden += [Conv2d(kernel_size, var_weight=var_weight * kernel_size**2, var_bias=var_bias), ReLU()]
    return Sequential(*hidden, Conv2d(image_size, padding=0, var_weight=var_weight, var_bias=var_bias))


def residual_cnn_gp(
    image_size: int = 28,
    var_weight: float = 7.27,
    var_bias: float = 4.69,
    blocks: int = 8,
    kernel_size: int = 4,
) -> Layer:
    """Residual CNN GP: ``blocks`` x Sum([identity, Conv2d(k) + ReLU]), Conv2d(k), ReLU, dense (0.96%).

    It sums after a ReLU, as published: a valid kernel but not the limit of its finite network.
    """
    _check_size(image_size)
    k = kernel_size

    def conv() -> Conv2d:
        return Conv2d(k, var_weight=var_weight * k**2, var_bias=var_bias)

    body = [Sum([Sequential(), Sequential(conv(), ReLU())]) for _ in range(blocks)]
    return Sequential(*body, conv(), ReLU(), Conv2d(image_size, padding=0, var_weight=var_weight, var_bias=var_bias))


def resnet32_gp(image_size: int = 28) -> Layer:
    """ResNet-32 GP: three stages of five pre-activation blocks, as in the paper (0.84% test error)."""
    _check_size(image_size, 4)
    layers: list[Layer] = [Conv2d(3)]
    for _stage, (stride, mult) in enumerate(((1, 1), (2, 2), (2, 4))):
        layers.append(resnet_block(stride=stride, projection_shortcut=True, multiplier=mult))
        layers += [resnet_block(stride=1, projection_shortcut=False, multiplier=mult) for _ in range(4)]
    layers += [
        # no nonlinearity before this conv: it stands in for average pooling
        Conv2d(image_size // 4, padding=0, in_channel_multiplier=4, out_channel_multiplier=4),
        ReLU(),
        Conv2d(1, padding=0, in_channel_multiplier=4),
    ]
    return Sequential(*layers)


def pooled_cnn_gp(
    image_size: int = 28,
    var_weight: float = 2.0,
    var_bias: float = 0.05,
    global_pool: bool = False,
) -> Layer:
    """A pooled CNN-GP (ours, not in the paper).

    ``Conv2d(3, stride=2), ReLU, Conv2d(3), ReLU, AvgPool2d(2), Conv2d(3), ReLU`` and a
    :class:`~gpytorch_cnngp.Dense` readout; with ``global_pool=True`` a
    :class:`~gpytorch_cnngp.GlobalAvgPool2d` comes before the readout. Convolutions average their
    window (``var_weight = 2`` keeps the ReLU's variance scale). Without the global pool, every layer
    before the pool carries nine spatial offsets (the pool's 3x3 of tap differences, doubled by the strided
    first convolution); with it, every offset, on maps a quarter of the input's size after that convolution.
    """
    _check_size(image_size, 4)

    def conv(stride: int = 1) -> Conv2d:
        return Conv2d(3, stride=stride, var_weight=var_weight, var_bias=var_bias)

    layers: list[Layer] = [conv(2), ReLU(), conv(), ReLU(), AvgPool2d(2), conv(), ReLU()]
    if global_pool:
        layers.append(GlobalAvgPool2d())
    return Sequential(*layers, Dense(var_weight=var_weight, var_bias=var_bias))


ARCHITECTURES = {
    "convnet_gp": convnet_gp,
    "residual_cnn_gp": residual_cnn_gp,
    "resnet32_gp": resnet32_gp,
    "pooled_cnn_gp": pooled_cnn_gp,
}
