"""Invalid inputs and architectures raise a ValueError whose message names the problem."""

from __future__ import annotations

import math

import pytest
import torch

from gpytorch_cnngp import Conv2d, ReLU, Sequential, Sum, gram, gram_diag, resnet_block

F64 = torch.float64


def _model(size: int = 6) -> Sequential:
    return Sequential(Conv2d(3, var_bias=0.1), ReLU(), Conv2d(size, padding=0))


def _images(n: int = 3, c: int = 2, size: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g, dtype=F64)


# ---------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("shape", [(3, 6, 6), (1, 3, 2, 6, 6), (6,)], ids=["3d", "5d", "1d"])
def test_wrong_number_of_dimensions(shape):
    model = _model()
    bad = torch.rand(*shape, dtype=F64)
    ndim = len(shape)
    with pytest.raises(ValueError, match=rf"X must have shape \[N, C, H, W\] \(4 dimensions\), got {ndim}"):
        model(bad)
    with pytest.raises(ValueError, match=rf"Z must have shape \[N, C, H, W\] \(4 dimensions\), got {ndim}"):
        model(_images(), bad)
    with pytest.raises(ValueError, match=r"X must have shape \[N, C, H, W\]"):
        model(bad, diag=True)


def test_non_tensor_input():
    with pytest.raises(ValueError, match="X must be a torch.Tensor"):
        _model()(_images().numpy())


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_non_float_input(dtype):
    model = _model()
    bad = torch.ones(3, 2, 6, 6, dtype=dtype)
    with pytest.raises(ValueError, match=f"X must be a floating-point tensor, got {dtype}"):
        model(bad)
    with pytest.raises(ValueError, match=f"Z must be a floating-point tensor, got {dtype}"):
        model(_images(), bad)
    with pytest.raises(ValueError, match="floating-point"):
        model(bad, diag=True)


def test_non_float_compute_dtype():
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        gram(_model(), _images(), dtype=torch.int32)


def test_empty_channel_or_spatial_dimension():
    with pytest.raises(ValueError, match="empty channel or spatial dimension"):
        _model()(torch.rand(3, 0, 6, 6, dtype=F64))


def test_channel_mismatch_between_x_and_z():
    model = _model()
    x, z = _images(c=2), _images(c=3)
    with pytest.raises(ValueError, match=r"same channels and image size.*\(2, 6, 6\).*\(3, 6, 6\)"):
        model(x, z)
    with pytest.raises(ValueError, match="same channels and image size"):
        model(x, z, diag=True)


def test_size_mismatch_between_x_and_z():
    model = _model()
    x, z = _images(size=6), _images(size=7)
    with pytest.raises(ValueError, match=r"same channels and image size.*\(2, 6, 6\).*\(2, 7, 7\)"):
        model(x, z)
    with pytest.raises(ValueError, match="same channels and image size"):
        gram_diag(model, x, z)
    rect = torch.rand(3, 2, 6, 5, dtype=F64)
    with pytest.raises(ValueError, match="same channels and image size"):
        model(x, rect)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_images(bad_value):
    model = _model()
    good = _images()
    bad = good.clone()
    bad[1, 0, 2, 3] = bad_value
    with pytest.raises(ValueError, match=r"X contains NaN or infinite values \(first in image 1\)"):
        model(bad)
    with pytest.raises(ValueError, match=r"Z contains NaN or infinite values \(first in image 1\)"):
        model(good, bad)
    with pytest.raises(ValueError, match="X contains NaN or infinite"):
        model(bad, diag=True)
    with pytest.raises(ValueError, match="Z contains NaN or infinite"):
        model(good, bad, diag=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(bad.float())


def test_same_flag_with_different_z():
    x = _images()
    with pytest.raises(ValueError, match="same=True requires Z to be X"):
        _model()(x, x + 1.0, same=True)


def test_diag_with_sets_of_different_length():
    model = _model()
    with pytest.raises(ValueError, match="diag=True needs X and Z of the same length, got 3 and 2"):
        model(_images(n=3), _images(n=2), diag=True)
    with pytest.raises(ValueError, match="same length"):
        gram_diag(model, _images(n=2), _images(n=5))


# ---------------------------------------------------------------------------------------------
# architectures that do not reduce to a single output


def test_output_not_1x1_names_the_size():
    model = Sequential(Conv2d(3), ReLU(), Conv2d(3, padding=0))  # 4x4 -> 2x2
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"maps a 4x4 input to a 2x2 output"):
        model(x)
    with pytest.raises(ValueError, match="2x2"):
        model(x, x)
    with pytest.raises(ValueError, match="2x2"):
        model(x, diag=True)
    with pytest.raises(ValueError, match="to a 4x4 output"):
        Sequential(Conv2d(3), ReLU())(x)
    with pytest.raises(ValueError, match=r"maps a 7x9 input to a 1x3 output"):
        Sequential(Conv2d(7, padding=0))(torch.rand(2, 1, 7, 9, dtype=F64))


def test_empty_sequential_on_a_larger_image_is_rejected():
    with pytest.raises(ValueError, match="to a 3x3 output"):
        Sequential()(torch.rand(2, 1, 3, 3, dtype=F64))


def test_window_larger_than_the_image():
    model = Sequential(Conv2d(5, padding=0), ReLU(), Conv2d(1, padding=0))
    with pytest.raises(ValueError, match=r"does not fit a 4x4 input"):
        model(torch.rand(2, 1, 4, 4, dtype=F64))


def test_sum_of_branches_with_different_spatial_sizes():
    model = Sequential(Sum([Sequential(), Conv2d(3, padding=0)]), Conv2d(4, padding=0))
    x = torch.rand(2, 1, 6, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"Sum branches give different spatial sizes \(6x6, 4x4\)"):
        model(x)
    with pytest.raises(ValueError, match="different spatial sizes"):
        model(x, diag=True)
    strided = Sum([Conv2d(1, stride=2), Conv2d(3)])
    with pytest.raises(ValueError, match=r"different spatial sizes \(3x3, 6x6\) for a 6x6 input"):
        strided.out_size((6, 6))


def test_sum_needs_a_branch():
    with pytest.raises(ValueError, match="at least one branch"):
        Sum([])


# ---------------------------------------------------------------------------------------------
# layer construction


@pytest.mark.parametrize("k", [0, -1])
def test_conv_kernel_size_below_one(k):
    with pytest.raises(ValueError, match=rf"Conv2d kernel_size must be an integer >= 1, got {k}"):
        Conv2d(k)


def test_conv_kernel_size_not_an_integer():
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2d(2.0)


def test_conv_stride_zero():
    with pytest.raises(ValueError, match="Conv2d stride must be an integer >= 1, got 0"):
        Conv2d(3, stride=0)


def test_conv_dilation_zero():
    with pytest.raises(ValueError, match="Conv2d dilation must be an integer >= 1, got 0"):
        Conv2d(3, dilation=0)


def test_conv_channel_multiplier_zero():
    with pytest.raises(ValueError, match="in_channel_multiplier"):
        Conv2d(3, in_channel_multiplier=0)
    with pytest.raises(ValueError, match="out_channel_multiplier"):
        Conv2d(3, out_channel_multiplier=0)


@pytest.mark.parametrize("padding", ["valid", "SAME", "full", ""])
def test_conv_bad_padding_string(padding):
    with pytest.raises(ValueError, match=rf"Conv2d padding must be 'same' or a non-negative integer, got '{padding}'"):
        Conv2d(3, padding=padding)


@pytest.mark.parametrize("padding", [-1, 1.5, True])
def test_conv_bad_padding_value(padding):
    with pytest.raises(ValueError, match="Conv2d padding must be 'same' or a non-negative integer"):
        Conv2d(3, padding=padding)


@pytest.mark.parametrize("name", ["var_weight", "var_bias"])
def test_negative_variance_at_construction(name):
    with pytest.raises(ValueError, match=rf"{name} must be non-negative, got -0.5"):
        Conv2d(3, **{name: -0.5})
    with pytest.raises(ValueError, match=rf"{name} must be non-negative"):
        Conv2d(3, **{name: torch.tensor(-2.0, dtype=F64, requires_grad=True)})


@pytest.mark.parametrize("name", ["var_weight", "var_bias"])
def test_negative_variance_via_setter(name):
    conv = Conv2d(3, var_weight=1.5, var_bias=0.25)
    before = getattr(conv, name).clone()
    with pytest.raises(ValueError, match=rf"{name} must be non-negative, got -1"):
        setattr(conv, name, -1.0)
    with pytest.raises(ValueError, match=rf"{name} must be non-negative"):
        setattr(conv, name, torch.tensor(-3.0))
    # a rejected value leaves the layer unchanged
    assert torch.equal(getattr(conv, name), before)


@pytest.mark.parametrize("name", ["var_weight", "var_bias"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_variance(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be finite"):
        Conv2d(3, **{name: value})
    conv = Conv2d(3)
    with pytest.raises(ValueError, match=rf"{name} must be finite"):
        setattr(conv, name, torch.tensor(value))


@pytest.mark.parametrize("name", ["var_weight", "var_bias"])
def test_non_scalar_variance_tensor(name):
    with pytest.raises(ValueError, match=rf"{name} must be a scalar, got a tensor of shape \(2,\)"):
        Conv2d(3, **{name: torch.tensor([1.0, 2.0])})
    conv = Conv2d(3)
    with pytest.raises(ValueError, match=rf"{name} must be a scalar, got a tensor of shape \(2, 2\)"):
        setattr(conv, name, torch.ones(2, 2))
    with pytest.raises(ValueError, match=rf"{name} must be a scalar"):
        setattr(conv, name, torch.ones(0))


@pytest.mark.parametrize("name", ["var_weight", "var_bias"])
@pytest.mark.parametrize("value", ["1.0", None, True, [1.0]], ids=["str", "none", "bool", "list"])
def test_variance_of_the_wrong_type(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a real number or a scalar tensor"):
        Conv2d(3, **{name: value})


def test_torch_nn_layer_in_sequential():
    with pytest.raises(ValueError, match=r"item 1 is a Conv2d \(use gpytorch_cnngp.Conv2d/ReLU, not torch.nn\)"):
        Sequential(Conv2d(3), torch.nn.Conv2d(1, 1, 3), ReLU())
    with pytest.raises(ValueError, match=r"item 0 is a ReLU \(use gpytorch_cnngp"):
        Sequential(torch.nn.ReLU())
    with pytest.raises(ValueError, match="Sum takes gpytorch_cnngp layers, but item 1 is a Conv2d"):
        Sum([Conv2d(3), torch.nn.Conv2d(1, 1, 3)])
    with pytest.raises(ValueError, match="Sequential takes gpytorch_cnngp layers, but item 0 is a str"):
        Sequential("relu")


def test_model_that_is_not_a_layer():
    with pytest.raises(ValueError, match="model must be a gpytorch_cnngp layer, got Conv2d"):
        gram(torch.nn.Conv2d(1, 1, 3), _images(c=1))


@pytest.mark.parametrize(
    "kwargs, word",
    [({"stride": 0}, "stride"), ({"multiplier": 0}, "multiplier"), ({"stride": 2, "multiplier": 3}, "divisible")],
)
def test_bad_resnet_block(kwargs, word):
    with pytest.raises(ValueError, match=word):
        resnet_block(**kwargs)
