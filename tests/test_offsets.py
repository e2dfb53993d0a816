"""Pooled networks on offset maps: the offsets each layer needs, the layout, and the kernels against the full maps.

Between pooling layers every spatial offset ``d = q - p`` evolves on its own, so the passes carry one map per
offset that the readout needs (``settings.spatial_path("offsets")``) instead of every pair of positions
(``"full"``, ``[H, W, H, W]``). The full path is the independent check here: the same kernels from maps laid
out another way, summed by other window sums (pooling as ``A K A^T``, convolutions along both positions at
once). The offset sets are checked against rules worked out by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference_full import describe, kernel

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
    gram,
    gram_diag,
    resnet_block,
    settings,
)
from gpytorch_cnngp.architectures import pooled_cnn_gp
from gpytorch_cnngp.ops import Offsets
from gpytorch_cnngp.state import Requirements

F64 = torch.float64


def _box(r: int, step: int = 1) -> frozenset:
    return frozenset((step * a, step * b) for a in range(-r, r + 1) for b in range(-r, r + 1))


def _plan(model, size, mode="offsets"):
    hw = (size, size) if isinstance(size, int) else size
    with settings.spatial_path(mode):
        return Requirements(model).plan(model, hw)


# --- the offsets each layer needs -----------------------------------------------------------------------------
def test_layer_rules():
    out = frozenset({(0, 0), (1, -2)})
    assert Conv2d(3, stride=2, dilation=3).offsets_needed(out, (9, 9)) == {(0, 0), (2, -4)}
    assert ReLU().offsets_needed(frozenset({(1, 1)}), (9, 9)) == {(0, 0), (1, 1)}  # plus its own variances
    assert Dense().offsets_needed(out, (9, 9)) == {(0, 0)}
    # stride s, taps a, b of a k-window: s D + (b - a)
    got = AvgPool2d(2, stride=3).offsets_needed(frozenset({(1, 0)}), (9, 9))
    assert got == {(3 + ey, ex) for ey in (-1, 0, 1) for ex in (-1, 0, 1)}
    assert GlobalAvgPool2d().offsets_needed(frozenset({(0, 0)}), (2, 3)) == {
        (dy, dx) for dy in (-1, 0, 1) for dx in (-2, -1, 0, 1, 2)
    }
    assert Sequential().offsets_needed(out, (4, 4)) == out
    # a Sum needs what any branch needs
    branches = Sum([Sequential(), Conv2d(1, stride=2)])
    assert branches.offsets_needed(out, (9, 9)) == out | {(2, -4)}


def test_plan_of_pooled_cnn_gp_needs_nine_offsets():
    # Dense <- Conv, ReLU: (0, 0); AvgPool2d(2): the 3x3 box at 14x14; ReLU, Conv, ReLU keep it; the strided
    # first convolution doubles it at 28x28
    plan = _plan(pooled_cnn_gp(), 28)
    sets = {o.size: frozenset(o.offsets) for o in plan._sets.values()}
    assert sets == {(14, 14): _box(1), (28, 28): _box(1, 2)}
    assert frozenset(plan.input.offsets) == _box(1, 2)
    assert plan.largest == 28 * 28 * 9


def test_plan_clips_offsets_to_the_map_and_global_pool_needs_all():
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(3, stride=2), Conv2d(2), ReLU(), GlobalAvgPool2d(), Dense())
    plan = _plan(model, 7)  # 7 -> 3 after the pool
    sets = {o.size: frozenset(o.offsets) for o in plan._sets.values()}
    assert sets[(3, 3)] == _box(2)
    # 2 D + e for |D| <= 2, |e| <= 2: every offset up to 6, all of a 7x7 map's
    assert sets[(7, 7)] == _box(6)


def test_auto_keeps_full_maps_where_offsets_would_be_larger():
    gap = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), GlobalAvgPool2d(), Dense())
    assert _plan(gap, 28, "auto") is None  # 55^2 offsets at 28x28 positions
    assert _plan(gap, 28, "offsets").worst > 1
    assert _plan(pooled_cnn_gp(), 28, "auto") is not None
    assert _plan(pooled_cnn_gp(), 28, "full") is None
    assert _plan(Sequential(Conv2d(3), ReLU(), Dense()), 8) is None  # same-location networks keep [H, W]


def test_a_layer_without_an_offset_rule_keeps_the_full_path():
    class MyPool(AvgPool2d):
        def offsets_needed(self, out, in_size, rule=None):
            raise NotImplementedError

    model = Sequential(Conv2d(3), ReLU(), MyPool(2), Dense())
    assert _plan(model, 6) is None
    x = torch.rand(3, 1, 6, 6, dtype=F64)
    with settings.spatial_path("offsets"):
        got = gram(model, x)
    expected = kernel(describe(model), x.numpy())
    assert float((got - torch.from_numpy(expected)).abs().max()) < 1e-12 * float(got.abs().max())


# --- the layout ------------------------------------------------------------------------------------------------
def test_offsets_layout_shift_and_mask_by_loops():
    h, w = 3, 4
    offsets = Offsets((h, w), [(0, 0), (1, -2), (-2, 3), (2, 2)])
    s = torch.rand(h, w, 5, dtype=F64)
    shifted, mask = offsets.shifted(s), offsets.mask(s, 1)
    assert shifted.shape == (h, w, 4, 5) and mask.shape == (h, w, 4, 1)
    for (y, x), (i, (dy, dx)) in itertools.product(itertools.product(range(h), range(w)), enumerate(offsets.offsets)):
        inside = 0 <= y + dy < h and 0 <= x + dx < w
        assert float(mask[y, x, i, 0]) == float(inside)
        expected = s[y + dy, x + dx] if inside else torch.zeros(5, dtype=F64)
        assert torch.equal(shifted[y, x, i], expected)
    with pytest.raises(ValueError, match=r"\(0, 0\)"):
        Offsets((2, 2), [(1, 0)])


def test_spatial_path_setting_refuses_other_values(monkeypatch):
    with pytest.raises(ValueError, match="spatial_path"):
        settings.spatial_path("diagonal")
    monkeypatch.setenv("CNNGP_SPATIAL", "sparse")
    with pytest.raises(ValueError, match="CNNGP_SPATIAL"):
        settings.spatial_path.value()
    monkeypatch.setenv("CNNGP_SPATIAL", " Full ")
    assert settings.spatial_path.value() == "full"


# --- kernels: offset maps against full maps --------------------------------------------------------------------
NETWORKS = {
    # odd size, a pool that does not divide the map, a bias that reaches offsets beyond the input's
    "relu_pool3s2_odd": (lambda: Sequential(Conv2d(3, var_bias=0.2), ReLU(), AvgPool2d(3, 2), Conv2d(2), ReLU()), 9),
    "strided_dilated_padded": (
        lambda: Sequential(
            Conv2d(3, stride=2, dilation=2, padding=1, var_weight=2.0, var_bias=0.1),
            Erf(),
            AvgPool2d(3, stride=2, padding=1),
            Conv2d(2, var_weight=1.5, var_bias=0.3),
            LeakyReLU(0.2),
        ),
        9,
    ),
    "gelu_two_pools": (
        lambda: Sequential(
            Conv2d(3, var_weight=2.0, var_bias=0.1),
            GELU(),
            AvgPool2d(2, stride=1),
            Conv2d(3, var_weight=1.2),
            ReLU(),
            AvgPool2d(2),
        ),
        5,
    ),
    "elementwise_pool": (
        lambda: Sequential(Conv2d(3, var_weight=2.0), Elementwise(torch.tanh, degree=10), AvgPool2d(2, stride=1)),
        5,
    ),
    "resnet_sum_gap": (
        lambda: Sequential(
            Conv2d(3, var_weight=2.0),
            resnet_block(),
            Sum([AvgPool2d(3, stride=1, padding=1), Conv2d(2, var_weight=1.3, var_bias=0.1)]),
            ReLU(),
            GlobalAvgPool2d(),
        ),
        6,
    ),
    "pool_first_nonsquare_even_conv": (
        lambda: Sequential(
            AvgPool2d(2, stride=1), Erf(), Conv2d(4, var_weight=2.0, var_bias=0.2), ReLU(), AvgPool2d(2)
        ),
        (7, 5),
    ),
    "pooled_cnn_gp_12": (lambda: pooled_cnn_gp(12), 12),
    # no nonlinearity between windows: each layer's zeros where p + d leaves the map are all the next one sees
    "linear_conv_pool_chain": (
        lambda: Sequential(
            Conv2d(3, var_bias=0.3), AvgPool2d(3, stride=1, padding=1), Conv2d(2, stride=2, var_bias=0.1), AvgPool2d(2)
        ),
        8,
    ),
}


def _readout(body, size):
    return Sequential(body, Dense(var_weight=1.3, var_bias=0.2))


def _inputs(size, seed):
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 2, h, w, generator=g, dtype=F64)
    x[0, :, : h // 2] = 0.0  # part of an image black: zero variances, zero covariances
    return x, torch.rand(3, 2, h, w, generator=g, dtype=F64)


def _all_kernels(model, x, z, get):
    """K(X, X), K(X, Z), k(x, x) and matched pairs k(x_i, z_i), flat in one vector."""
    parts = [
        gram(model, x, backend="eager", get=get),
        gram(model, x, z, backend="eager", get=get),
        gram_diag(model, x, get=get),
        gram_diag(model, x, x[[1, 2, 3, 0]], get=get),
    ]
    return torch.cat([p.flatten() for p in parts])


CASES = [pytest.param(name, get) for name in NETWORKS for get in ("nngp", "ntk")]


@pytest.mark.parametrize("name, get", CASES)
def test_offset_maps_equal_full_maps(name, get):
    body, size = NETWORKS[name]
    model = _readout(body(), size)
    x, z = _inputs(size, seed=len(name))
    plan = _plan(model, size)
    assert plan is not None and plan.input is not None  # the offset path runs
    with settings.spatial_path("full"):
        expected = _all_kernels(model, x, z, get)
    with settings.spatial_path("offsets"):
        got = _all_kernels(model, x, z, get)
    assert bool(torch.isfinite(got).all())
    assert float((got - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_readout_needs_only_some_offsets_and_values_match_the_reference():
    model = _readout(
        Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), ReLU(), AvgPool2d(2), Conv2d(3, var_weight=2.0), ReLU()),
        8,
    )
    plan = _plan(model, 8)
    assert frozenset(plan.input.offsets) == _box(1)  # 9 of the 225 offsets of an 8x8 map
    x, z = _inputs(8, seed=3)
    with settings.spatial_path("offsets"):
        got = gram(model, torch.cat([x, z]), backend="eager")
    expected = torch.from_numpy(kernel(describe(model), torch.cat([x, z]).numpy()))
    assert float((got - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def _leaves(model):
    leaves = []
    for layer in model.kernel_layers():
        for name in layer.hyperparameter_names:
            value = getattr(layer, name).detach().clone().requires_grad_(True)
            setattr(layer, name, value)
            leaves.append(value)
    return leaves


def _objective(model, x, z):
    weights = torch.linspace(-1.0, 2.0, x.shape[0] * z.shape[0], dtype=F64).reshape(x.shape[0], z.shape[0])
    return (gram(model, x, z, backend="eager") * weights).sum() + (gram(model, x, backend="eager") * 0.3).sum()


@pytest.mark.parametrize("name", ["strided_dilated_padded", "resnet_sum_gap"])
def test_hyperparameter_gradients_equal_full_maps_and_finite_differences(name):
    body, size = NETWORKS[name]
    model = _readout(body(), size)
    x, z = _inputs(size, seed=7)
    leaves = _leaves(model)
    with settings.spatial_path("full"):
        expected = torch.stack(torch.autograd.grad(_objective(model, x, z), leaves))
    with settings.spatial_path("offsets"):
        got = torch.stack(torch.autograd.grad(_objective(model, x, z), leaves))
        assert float((got - expected).abs().max()) <= 1e-11 * float(expected.abs().max())
        # central differences on the offset path (the full path's autograd could share a mistake)
        step = 1e-6
        for k in range(len(leaves)):
            if float(leaves[k].detach()) < 1e-3:  # a variance of 0 has no central difference
                continue
            values = []
            with torch.no_grad():
                for sign in (1.0, -1.0):
                    leaves[k] += sign * step
                    values.append(float(_objective(model, x, z)))
                    leaves[k] -= sign * step
            fd = (values[0] - values[1]) / (2 * step)
            assert abs(fd - float(got[k])) <= 1e-6 * max(1.0, abs(float(got[k]))), k


def test_image_gradients_and_float32_equal_full_maps():
    body, size = NETWORKS["relu_pool3s2_odd"]
    model = _readout(body(), size)
    x, z = _inputs(size, seed=11)
    grads = {}
    for path in ("full", "offsets"):
        xg = x.clone().requires_grad_(True)
        with settings.spatial_path(path):
            (grad,) = torch.autograd.grad(gram(model, xg, z).sum(), xg)
            grads[path] = grad
    assert float((grads["offsets"] - grads["full"]).abs().max()) <= 1e-12 * float(grads["full"].abs().max())
    with settings.spatial_path("full"):
        expected = gram(model, x, z)
    with settings.spatial_path("offsets"):
        got = gram(model, x.float(), z.float())
    assert got.dtype == torch.float32
    assert float((got.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
