"""Conv2d against closed forms worked out by hand on a 3x3 image.

Model: ``Sequential(Conv2d(k, ..., var_weight=VW1, var_bias=VB1), readout)`` with the readout a dense
``Conv2d(side, padding=0, var_weight=VW2, var_bias=VB2)`` over the whole ``side x side`` map. With no
nonlinearity the kernel is linear in the input map ``K0[p] = (1/C) sum_c x_c[p] z_c[p]``:

    K1[p] = VB1 + VW1 / k^2 * S[p],      S[p] = sum of K0 over the window of p (zero padding adds 0)
    K2    = VB2 + VW2 / side^2 * sum_p K1[p]
          = VB2 + VW2 * VB1 + VW2 * VW1 / (k^2 * side^2) * sum_p S[p]

Numbers: VW1 = 2, VB1 = 0.5, VW2 = 3, VB2 = 0.25, so ``VB2 + VW2 * VB1 = 1.75`` and
``VW2 * VW1 = 6``.

The image (one channel) and its square, K0 = x * x for k(x, x)::

    x = 1 0 2        x*x = 1 0 4
        0 3 0              0 9 0
        1 1 0              1 1 0
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from gpytorch_cnngp import Conv2d, Sequential

VW1, VB1, VW2, VB2 = 2.0, 0.5, 3.0, 0.25

X_IMG = [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]]
ONES = [[1.0] * 3 for _ in range(3)]


def _img(*channels):
    return torch.tensor([channels], dtype=torch.float64)  # [1, C, 3, 3]


def _model(first: Conv2d, side: int) -> Sequential:
    return Sequential(first, Conv2d(side, padding=0, var_weight=VW2, var_bias=VB2))


# --- Conv2d(3, "same"): 3x3 windows centred on each pixel, zero padding 1 ------------------------
# Window sums S[p] of x*x (rows/cols of the window clipped to the image, the padding adds 0):
#   S(0,0) = rows 0-1, cols 0-1 = 1+0+0+9         = 10
#   S(0,1) = rows 0-1, cols 0-2 = 1+0+4+0+9+0     = 14
#   S(0,2) = rows 0-1, cols 1-2 = 0+4+9+0         = 13
#   S(1,0) = rows 0-2, cols 0-1 = 1+0+0+9+1+1     = 12
#   S(1,1) = all nine                             = 16
#   S(1,2) = rows 0-2, cols 1-2 = 0+4+9+0+1+0     = 14
#   S(2,0) = rows 1-2, cols 0-1 = 0+9+1+1         = 11
#   S(2,1) = rows 1-2, cols 0-2 = 0+9+0+1+1+0     = 11
#   S(2,2) = rows 1-2, cols 1-2 = 9+0+1+0         = 10
#   sum_p S[p] = 111, each divided by k^2 = 9 whatever the number of in-image taps.
# K(x, x) = 1.75 + 6 * 111 / (9 * 9) = 7/4 + 74/9 = 359/36.
# padding=1 is the same geometry as "same" for k = 3.
#
# K(x, ones): K0 = x.  Window sums of x: 4, 6, 5 / 6, 8, 6 / 5, 5, 4, total 49.
# K(x, ones) = 1.75 + 6 * 49 / 81 = 7/4 + 98/27 = 581/108.
# K(ones, ones): K0 = 1; window sums: corners 4, edges 6, centre 9: 4*4 + 4*6 + 9 = 49, so also 581/108
# (dividing by the in-image tap count instead would give every K1 = VB1 + VW1 = 2.5 and K2 = 7.75).
SAME_K3 = {
    "xx": Fraction(359, 36),
    "x_ones": Fraction(581, 108),
    "ones_ones": Fraction(581, 108),
}


@pytest.mark.parametrize("padding", ["same", 1])
def test_k3_same_padding_closed_form(padding):
    model = _model(Conv2d(3, padding=padding, var_weight=VW1, var_bias=VB1), side=3)
    x, ones = _img(X_IMG), _img(ONES)
    both = torch.cat([x, ones])
    K = model(both)
    assert K.shape == (2, 2)
    assert K[0, 0].item() == pytest.approx(float(SAME_K3["xx"]), rel=1e-14)
    assert K[0, 1].item() == pytest.approx(float(SAME_K3["x_ones"]), rel=1e-14)
    assert K[1, 0].item() == pytest.approx(float(SAME_K3["x_ones"]), rel=1e-14)
    assert K[1, 1].item() == pytest.approx(float(SAME_K3["ones_ones"]), rel=1e-14)
    assert model(x, ones).item() == pytest.approx(float(SAME_K3["x_ones"]), rel=1e-14)
    diag = model(both, diag=True)
    assert diag[0].item() == pytest.approx(float(SAME_K3["xx"]), rel=1e-14)
    assert diag[1].item() == pytest.approx(float(SAME_K3["ones_ones"]), rel=1e-14)


# --- Conv2d(3, padding=0): one window, the whole image, output 1x1; readout Conv2d(1, padding=0) ---
# K1 = VB1 + VW1 / 9 * 16 = 0.5 + 32/9;  K2 = VB2 + VW2 * K1 = 0.25 + 1.5 + 32/3 = 149/12.
# K(x, ones) = 0.25 + 3 * (0.5 + 2 * 8 / 9) = 1.75 + 16/3 = 85/12.
def test_k3_no_padding_closed_form():
    model = _model(Conv2d(3, padding=0, var_weight=VW1, var_bias=VB1), side=1)
    x, ones = _img(X_IMG), _img(ONES)
    assert model(x).item() == pytest.approx(149 / 12, rel=1e-14)
    assert model(x, diag=True).item() == pytest.approx(149 / 12, rel=1e-14)
    assert model(x, ones).item() == pytest.approx(85 / 12, rel=1e-14)


# --- Conv2d(2, "same"), even k: offsets 0 and +1 (none before, one after, as TensorFlow's SAME) ------
# Window of p = (i, j): rows i..i+1, cols j..j+1 clipped to the image.  Sums of x*x:
#   S(0,0) = 1+0+0+9 = 10   S(0,1) = 0+4+9+0 = 13   S(0,2) = 4+0 = 4
#   S(1,0) = 0+9+1+1 = 11   S(1,1) = 9+0+1+0 = 10   S(1,2) = 0+0 = 0
#   S(2,0) = 1+1     = 2    S(2,1) = 1+0     = 1    S(2,2) = 0
#   total 51, each divided by k^2 = 4:  K = 1.75 + 6 * 51 / (4 * 9) = 1.75 + 8.5 = 10.25.
# (The mirrored window, rows i-1..i, would give 1, 1, 4 / 1, 10, 13 / 1, 11, 10 = 52 and K = 10.41666.)
def test_even_k2_same_closed_form():
    model = _model(Conv2d(2, var_weight=VW1, var_bias=VB1), side=3)
    x = _img(X_IMG)
    assert model(x).item() == pytest.approx(10.25, rel=1e-14)
    assert model(x, diag=True).item() == pytest.approx(10.25, rel=1e-14)


# --- Conv2d(3, "same", stride=2): centres (0,0), (0,2), (2,0), (2,2) -> 2x2 map; readout Conv2d(2, 0) --
# S = 10, 13, 11, 10 (from the k=3 table above), total 44.
# K = VB2 + VW2 / 4 * sum_p (VB1 + VW1 / 9 * S[p]) = 0.25 + 3 * (0.5 + 2 * 44 / 36) = 1.75 + 22/3 = 109/12.
def test_k3_stride2_closed_form():
    model = _model(Conv2d(3, stride=2, var_weight=VW1, var_bias=VB1), side=2)
    assert model(_img(X_IMG)).item() == pytest.approx(109 / 12, rel=1e-14)


# --- Conv2d(3, "same", dilation=2): padding 2, taps at p-2, p, p+2 ---------------------------------
#   S(0,0) = x*x at (0,0),(0,2),(2,0),(2,2) = 1+4+1+0 = 6    S(0,1) = (0,1),(2,1) = 0+1 = 1
#   S(0,2) = 6 (same four corners)                          S(1,0) = (1,0),(1,2) = 0
#   S(1,1) = (1,1) only = 9                                 S(1,2) = 0
#   S(2,0) = 6,  S(2,1) = 1,  S(2,2) = 6;  total 35.
# K = 1.75 + 6 * 35 / 81 = 7/4 + 70/27 = 469/108.
def test_k3_dilation2_closed_form():
    model = _model(Conv2d(3, dilation=2, var_weight=VW1, var_bias=VB1), side=3)
    assert model(_img(X_IMG)).item() == pytest.approx(469 / 108, rel=1e-14)


# --- two channels: K0 is the channel mean ---------------------------------------------------------
# x = (X_IMG, ONES): K0(x, x) = (x*x + 1) / 2, window sums total (111 + 49) / 2 = 80 under k=3 "same",
#   K(x, x) = 1.75 + 6 * 80 / 81 = 7/4 + 160/27 = 829/108        (a channel *sum* would give 1.75 + 6*160/81)
# z = (ONES, X_IMG): K0(x, z) = (x + x) / 2 = x, total 49: K(x, z) = 581/108.
# K(z, z) = K(x, x) = 829/108 (channel order does not matter).
def test_two_channels_use_the_channel_mean():
    model = _model(Conv2d(3, var_weight=VW1, var_bias=VB1), side=3)
    x = _img(X_IMG, ONES)
    z = _img(ONES, X_IMG)
    both = torch.cat([x, z])
    K = model(both)
    assert K[0, 0].item() == pytest.approx(829 / 108, rel=1e-14)
    assert K[1, 1].item() == pytest.approx(829 / 108, rel=1e-14)
    assert K[0, 1].item() == pytest.approx(581 / 108, rel=1e-14)
    assert model(x, z).item() == pytest.approx(581 / 108, rel=1e-14)
    assert model(both, diag=True).tolist() == pytest.approx([829 / 108, 829 / 108], rel=1e-14)


def test_channel_multipliers_do_not_change_the_kernel_closed_form():
    """in/out channel multipliers only size the finite network: the same 359/36 as above."""
    first = Conv2d(3, var_weight=VW1, var_bias=VB1, in_channel_multiplier=3, out_channel_multiplier=5)
    model = Sequential(first, Conv2d(3, padding=0, var_weight=VW2, var_bias=VB2, in_channel_multiplier=5))
    assert model(_img(X_IMG)).item() == pytest.approx(359 / 36, rel=1e-14)


def test_float32_closed_form():
    model = _model(Conv2d(3, var_weight=VW1, var_bias=VB1), side=3)
    K = model(_img(X_IMG).float())
    assert K.dtype == torch.float32
    assert K.item() == pytest.approx(359 / 36, rel=1e-6)
