"""Images with black regions through networks without bias: positions whose variance is exactly zero.

A window sum over zeros is zero, and a nonlinearity at a zero variance gives zero. The native kernel sums
wide windows as running sums (add the tap that enters, subtract the one that leaves), which over a black
region leaves rounding residuals of either sign instead of zeros; the kernel must still give the eager
path's values (to rounding relative to the kernel's scale), never NaN or a false overflow. Before the fix
the default backend raised "kernel values overflow even float64" for the first case below (eager:
K[0, 0] = 0.0105).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpytorch_cnngp import Conv2d, Dense, LeakyReLU, ReLU, Sequential, gram
from gpytorch_cnngp.backends import native

F64 = torch.float64


def _native_or_skip():
    if native.load_library() is None:  # pragma: no cover - no C++ compiler
        pytest.skip("the native kernel cannot be built here")


def _patch_images(n: int, size: int, patch: tuple[int, int], seed: int, dtype=F64) -> torch.Tensor:
    """Black images with a bright square ``[a, b)`` in both directions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size, dtype=dtype)
    a, b = patch
    x[:, :, a:b, a:b] = torch.rand(n, 1, b - a, b - a, generator=gen, dtype=dtype)
    return x


# The NTK's derivative factor (pi - arccos rho) / (2 pi) has a square-root singularity at |rho| = 1, which
# the edges of a bright patch reach exactly (a window that sees one pixel of it: a rank-one covariance). There
# any rounding of the covariance, eager's or the native kernel's, moves the factor by about its square root:
# the two paths then agree to about 1e-9 of the kernel's scale, not to 1e-12 (on images without such
# positions they agree to 1e-15, tests/test_native.py).
TOLERANCE = {"nngp": 1e-12, "ntk": 1e-8}


def _agree(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert bool(torch.isfinite(got).all())
    scale = float(want.abs().max())
    torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=rtol * scale)


def test_the_issues_case_gives_eagers_values_on_the_default_path():
    _native_or_skip()
    x = _patch_images(16, 28, (10, 18), seed=0)
    model = Sequential(Conv2d(7), ReLU(), Conv2d(28, padding=0))
    want = gram(model, x, backend="eager")
    assert 0.005 < float(want[0, 0]) < 0.02
    _agree(gram(model, x), want, 1e-12)
    _agree(gram(model, x, backend="native"), want, 1e-12)
    _agree(gram(model, x[:5], x[5:], backend="native"), want[:5, 5:], 1e-12)
    both = gram(model, x, backend="native", get=("nngp", "ntk"))
    for got, kind in zip(both, ("nngp", "ntk"), strict=True):
        _agree(got, gram(model, x, backend="eager", get=kind), TOLERANCE[kind])


@st.composite
def black_region_cases(draw):
    """A bias-free network of wide windows (running sums) and ReLUs, and images black outside a patch."""
    size = draw(st.integers(10, 16))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(4, 7))  # wide enough for running sums
        layers.append(
            Conv2d(k, padding=draw(st.sampled_from(["same", 0])), var_weight=draw(st.sampled_from([0.5, 2.0])))
        )
        nonlin = draw(st.sampled_from(["relu", "leaky", "none"]))
        if nonlin != "none":
            layers.append(ReLU() if nonlin == "relu" else LeakyReLU(0.2))
    try:
        out = Sequential(*layers).out_size((size, size))
    except ValueError:
        layers, out = [Conv2d(5), ReLU()], (size, size)
    layers.append(Dense(var_weight=1.5) if draw(st.booleans()) else Conv2d(out[0], padding=0))
    a = draw(st.integers(0, size - 2))
    b = draw(st.integers(a + 1, min(size, a + 4)))
    n1, n2 = draw(st.integers(1, 5)), draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**20))
    x = _patch_images(n1 + n2, size, (a, b), seed)
    # some images entirely black, as in data sets with blank inputs
    for i in draw(st.lists(st.integers(0, n1 + n2 - 1), max_size=2)):
        x[i] = 0.0
    return Sequential(*layers), x[:n1], x[n1:]


@settings(max_examples=30, deadline=None)
@given(black_region_cases())
def test_native_equals_eager_on_black_regions(case):
    _native_or_skip()
    model, x, z = case
    for kind in ("nngp", "ntk"):
        want = gram(model, x, z, backend="eager", get=kind)
        _agree(gram(model, x, z, backend="native", get=kind), want, TOLERANCE[kind])
        _agree(gram(model, x, z, get=kind), want, TOLERANCE[kind])  # the default path
    want = gram(model, z, backend="eager")
    got = gram(model, z, backend="native")
    _agree(got, want, TOLERANCE["nngp"])
    assert torch.equal(got.diagonal(), model(z, diag=True))
    # float32 against the float64 reference
    _agree(gram(model.float(), x.float(), z.float(), backend="native"), gram(model, x, z, backend="eager"), 1e-4)


def test_native_gradients_on_black_regions_are_finite_and_eagers():
    _native_or_skip()
    x = _patch_images(6, 12, (4, 8), seed=3)
    x[0] = 0.0
    grads = {}
    for backend in ("eager", "native"):
        model = Sequential(Conv2d(5), ReLU(), Conv2d(5), ReLU(), Dense())
        leaves = []
        for layer, value in ((model[0], 1.3), (model[2], 0.7)):
            leaf = torch.tensor(value, dtype=F64, requires_grad=True)
            layer.var_weight = leaf
            leaves.append(leaf)
        gram(model, x[:2], x[2:], backend=backend).sum().backward()
        grads[backend] = torch.stack([leaf.grad for leaf in leaves])
        assert bool(torch.isfinite(grads[backend]).all())
    torch.testing.assert_close(grads["native"], grads["eager"], rtol=1e-10, atol=0.0)


def test_inductor_equals_eager_on_black_regions():
    model = Sequential(Conv2d(5), ReLU(), Conv2d(5), ReLU(), Dense())
    x = _patch_images(5, 12, (5, 8), seed=1)
    x[1] = 0.0
    want = gram(model, x[:2], x[2:], backend="eager")
    _agree(gram(model, x[:2], x[2:], backend="inductor"), want, 1e-11)
