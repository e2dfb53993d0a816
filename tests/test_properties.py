"""Property tests over random small architectures and random (sometimes degenerate) images.

Whatever the architecture, a kernel matrix must be finite, exactly symmetric for one set, positive
semi-definite up to rounding, agree with ``diag=True``, and contain the cross kernel as a block of the
joint kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpytorch_cnngp import Conv2d, Layer, ReLU, Sequential, Sum

F64 = torch.float64

var_weights = st.floats(min_value=0.1, max_value=5.0, exclude_min=True, exclude_max=True)
var_biases = st.floats(min_value=0.0, max_value=2.0)


@st.composite
def convs(draw, same_size: bool = False, stride: int | None = None) -> Conv2d:
    """A Conv2d with random geometry; ``same_size`` keeps the map's size (padding "same", stride 1)."""
    k = draw(st.integers(1, 4))
    dilation = draw(st.integers(1, 2))
    if same_size:
        padding, stride = "same", 1
    else:
        padding = draw(st.sampled_from(["same", 0, 1]))
        stride = stride if stride is not None else draw(st.integers(1, 2))
    return Conv2d(
        k, stride=stride, padding=padding, dilation=dilation, var_weight=draw(var_weights), var_bias=draw(var_biases)
    )


@st.composite
def sum_layers(draw) -> Sum:
    """A Sum whose branches keep the same spatial size: identity + conv branch, or two conv branches."""

    def branch() -> Layer:
        conv = draw(convs(same_size=True))
        return Sequential(conv, ReLU()) if draw(st.booleans()) else conv

    if draw(st.booleans()):
        return Sum([Sequential(), branch()])
    if draw(st.booleans()):
        # two "same" convs of one stride give the same size whatever their windows
        stride = draw(st.integers(1, 2))
        first = Conv2d(
            draw(st.integers(1, 4)), stride=stride, dilation=draw(st.integers(1, 2)), var_weight=draw(var_weights)
        )
        second = Sequential(
            Conv2d(draw(st.integers(1, 4)), stride=stride, var_weight=draw(var_weights), var_bias=draw(var_biases)),
            ReLU(),
            Conv2d(draw(st.integers(1, 3)), var_weight=draw(var_weights)),
        )
        return Sum([first, second])
    return Sum([branch(), branch()])


@dataclass
class Case:
    model: Sequential
    x: torch.Tensor
    z: torch.Tensor

    def __repr__(self) -> str:  # shown by hypothesis on failure
        return f"Case(model={self.model!r}, x.shape={tuple(self.x.shape)}, z.shape={tuple(self.z.shape)})"


def _draw_images(draw, n: int, channels: int, size: int, gen: torch.Generator, pool: list[torch.Tensor]):
    images = []
    for _ in range(n):
        kind = draw(st.sampled_from(["uniform", "uniform", "normal", "zero", "duplicate", "scaled"]))
        if kind in ("duplicate", "scaled") and pool:
            src = pool[draw(st.integers(0, len(pool) - 1))]
            img = src.clone() if kind == "duplicate" else src * draw(st.sampled_from([0.5, 3.0]))
        elif kind == "zero":
            img = torch.zeros(channels, size, size, dtype=F64)
        elif kind == "normal":
            img = torch.randn(channels, size, size, generator=gen, dtype=F64)
        else:
            img = torch.rand(channels, size, size, generator=gen, dtype=F64)
        images.append(img)
        pool.append(img)
    return torch.stack(images)


@st.composite
def cases(draw) -> Case:
    size = draw(st.integers(4, 9))
    channels = draw(st.integers(1, 3))
    layers: list[Layer] = []
    h = size
    for _ in range(draw(st.integers(1, 4))):
        layer = draw(sum_layers()) if draw(st.integers(0, 4)) == 0 else draw(convs())
        try:
            new_h, new_w = layer.out_size((h, h))
        except ValueError:
            continue  # the map would shrink below 1x1: leave this layer out
        assert new_h == new_w
        layers.append(layer)
        h = new_h
        if draw(st.booleans()):
            layers.append(ReLU())
    layers.append(Conv2d(h, padding=0, var_weight=draw(var_weights), var_bias=draw(var_biases)))
    model = Sequential(*layers)
    assert model.out_size((size, size)) == (1, 1)

    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pool: list[torch.Tensor] = []
    x = _draw_images(draw, draw(st.integers(1, 5)), channels, size, gen, pool)
    z = _draw_images(draw, draw(st.integers(1, 5)), channels, size, gen, pool)
    return Case(model, x, z)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_same_set_kernel_is_finite_symmetric_psd(case):
    k = case.model(case.x)
    assert k.shape == (case.x.shape[0],) * 2
    assert k.dtype == F64
    assert torch.isfinite(k).all()
    assert torch.equal(k, k.T)
    eig = torch.linalg.eigvalsh(k)
    assert eig.min() >= -1e-10 * eig.abs().max()
    # a variance is never negative
    assert (k.diagonal() >= 0).all()


@settings(max_examples=40, deadline=None)
@given(cases())
def test_diag_matches_the_full_matrix(case):
    k = case.model(case.x)
    torch.testing.assert_close(case.model(case.x, diag=True), k.diagonal(), rtol=1e-12, atol=0.0)
    # the generic cross kernel of a set with itself agrees with the same-set kernel
    _close(case.model(case.x, case.x), k, rtol=1e-7)
    # matched pairs: diag=True with Z is the diagonal of the cross kernel
    n = min(case.x.shape[0], case.z.shape[0])
    _close(case.model(case.x[:n], case.z[:n], diag=True), case.model(case.x[:n], case.z[:n]).diagonal(), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_cross_kernel_is_a_block_of_the_joint_kernel(case):
    n1 = case.x.shape[0]
    joint = case.model(torch.cat([case.x, case.z]))
    cross = case.model(case.x, case.z)
    assert cross.shape == (n1, case.z.shape[0])
    assert torch.isfinite(cross).all()
    _close(cross, joint[:n1, n1:], rtol=1e-12)
    _close(case.model(case.z, case.x), joint[n1:, :n1], rtol=1e-12)
    eig = torch.linalg.eigvalsh(joint)
    assert eig.min() >= -1e-10 * eig.abs().max()
