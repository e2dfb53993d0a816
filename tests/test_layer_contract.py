"""Every layer class passes the layer contract (tests/layer_contract.py), each in a small network of its own."""

from __future__ import annotations

import inspect

import torch
from layer_contract import LayerContract

import gpytorch_cnngp
from gpytorch_cnngp import (
    GELU,
    AvgPool2d,
    Conv2d,
    Dense,
    Elementwise,
    Erf,
    GlobalAvgPool2d,
    LeakyReLU,
    ReLU,
    Sequential,
    Sum,
    layers,
    resnet_block,
)
from gpytorch_cnngp.layers import base


class TestConv2d(LayerContract):
    layer_class = Conv2d

    def create_model(self):
        # stride, dilation, an even kernel ("same": asymmetric padding) and biases
        return Sequential(
            Conv2d(4, var_weight=1.3, var_bias=0.2),
            ReLU(),
            Conv2d(3, stride=2, dilation=2, var_weight=2.0, var_bias=0.1),
            ReLU(),
            Conv2d(4, padding=0, var_weight=1.5),
        )


class TestDense(LayerContract):
    layer_class = Dense

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=2.0), ReLU(), Dense(var_weight=2.0, var_bias=0.1))


class TestReLU(LayerContract):
    layer_class = ReLU

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=2.0), ReLU(), Conv2d(3, var_weight=2.0, var_bias=0.1), ReLU(), Dense())


class TestLeakyReLU(LayerContract):
    layer_class = LeakyReLU

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=2.0), LeakyReLU(0.2), Conv2d(3), LeakyReLU(-0.5), Dense())


class TestErf(LayerContract):
    layer_class = Erf

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=3.0, var_bias=0.1), Erf(), Dense(var_weight=2.0))


class TestGELU(LayerContract):
    layer_class = GELU
    rtol_reference = 1e-8  # the reference integrates numerically
    image_size = 5

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), GELU(), Dense())


class TestElementwise(LayerContract):
    layer_class = Elementwise
    rtol_reference = 1e-6  # two quadrature rules of different orientation
    image_size = 5

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), Elementwise(torch.tanh), Dense(var_weight=3.0))


class TestAvgPool2d(LayerContract):
    layer_class = AvgPool2d

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=2.0), ReLU(), AvgPool2d(2), Conv2d(3, var_weight=2.0), ReLU(), Dense())


class TestGlobalAvgPool2d(LayerContract):
    layer_class = GlobalAvgPool2d

    def create_model(self):
        return Sequential(Conv2d(3, var_weight=2.0), ReLU(), GlobalAvgPool2d(), Dense(var_weight=2.0))


class TestSum(LayerContract):
    layer_class = Sum

    def create_model(self):
        # branches that end in linear layers with weights of their own (the infinite-width limit of the sum)
        return Sequential(
            Conv2d(3, var_weight=2.0),
            Sum([Sequential(), Sequential(ReLU(), Conv2d(3, var_weight=2.0, var_bias=0.1)), Conv2d(1)]),
            ReLU(),
            Dense(),
        )


class TestSequential(LayerContract):
    layer_class = Sequential

    def create_model(self):
        return Sequential(Sequential(Conv2d(3, var_weight=2.0), Sequential()), ReLU(), Sequential(Dense()))


class TestResnetBlock(LayerContract):
    layer_class = Sum  # resnet_block builds Sums of Sequentials
    factory = staticmethod(resnet_block)

    def create_model(self):
        return Sequential(
            Conv2d(3), resnet_block(), resnet_block(stride=2, projection_shortcut=True, multiplier=2), ReLU(), Dense()
        )


def _exported_layers() -> tuple[set[type], set]:
    """The layer classes and the layer-building functions exported by ``gpytorch_cnngp`` and
    ``gpytorch_cnngp.layers``; the protocol's classes in ``layers.base`` (``Layer``, ``Nonlinearity``,
    ``WeightedLayer``) are what layers derive from, not layers of a network."""
    classes, functions = set(), set()
    for module in (gpytorch_cnngp, layers):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, base.Layer) and obj.__module__ != base.__name__:
                classes.add(obj)
            elif inspect.isfunction(obj) and obj.__module__.startswith(layers.__name__ + "."):
                functions.add(obj)
    return classes, functions


def test_every_exported_layer_has_a_contract_class():
    contracts = [c for c in globals().values() if inspect.isclass(c) and issubclass(c, LayerContract)]
    contracts = [c for c in contracts if c is not LayerContract and c.__name__.startswith("Test")]
    classes, functions = _exported_layers()
    assert {Conv2d, Sum, GELU} <= classes and resnet_block in functions  # the collection itself works
    missing = sorted(c.__name__ for c in classes - {c.layer_class for c in contracts})
    assert not missing, f"exported layers without a contract class here: {missing}"
    missing = sorted(f.__name__ for f in functions - {c.factory for c in contracts})
    assert not missing, f"exported layer builders without a contract class (with factory = ...) here: {missing}"
