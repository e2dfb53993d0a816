"""The backends' one policy (gpytorch_cnngp.backends.choose) and the backend argument of every caller."""

from __future__ import annotations

import pytest
import torch

from gpytorch_cnngp import (
    AvgPool2d,
    CNNGPKernel,
    Conv2d,
    Dense,
    Elementwise,
    Erf,
    ReLU,
    Sequential,
    Sum,
    gram,
    settings,
)
from gpytorch_cnngp.backends import Eager, Inductor, Native, choose, native, resolve

CPU, F32, F64 = torch.device("cpu"), torch.float32, torch.float64


def _images(n: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _native_or_skip():
    if native.load_library() is None:  # pragma: no cover - no C++ compiler
        pytest.skip("the native kernel cannot be built here")


def test_unknown_backend_names_are_refused():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'eager', 'inductor', 'native'"):
        resolve("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        gram(Sequential(Conv2d(3), ReLU(), Dense()), _images(2, 0), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        CNNGPKernel(Sequential(Conv2d(3), ReLU(), Dense()), input_shape=(1, 6, 6), backend="compiled")
    with pytest.raises(ValueError, match="backend must be one of"):  # the old alias's internal name too
        choose("compiled", Sequential(Conv2d(3), ReLU(), Dense()), (6, 6), F32, CPU, 10)


def test_the_removed_compile_keyword_is_refused_as_unknown():
    """``compile=`` is gone: gram and CNNGPKernel refuse it as Python refuses an unknown keyword (gpytorch's
    Kernel takes any keyword, so CNNGPKernel checks it itself rather than ignoring it)."""
    model = Sequential(Conv2d(3), ReLU(), Dense())
    with pytest.raises(TypeError, match="unexpected keyword argument 'compile'"):
        gram(model, _images(2, 0), compile=True)
    with pytest.raises(TypeError, match=r"CNNGPKernel.__init__\(\) got an unexpected keyword argument 'compile'"):
        CNNGPKernel(model, input_shape=(1, 6, 6), compile=False)
    with pytest.raises(TypeError):
        resolve("auto", compile=True)  # the alias rule itself is gone


def test_explicit_backends_that_cannot_run_the_network_name_the_layer():
    x = _images(3, 1)
    pooled = Sequential(Conv2d(3), ReLU(), Sum([Sequential(), AvgPool2d(3, stride=1, padding=1)]), Dense())
    with pytest.raises(ValueError, match=r"backend='native' cannot run this network here: the network has AvgPool2d"):
        gram(pooled, x, backend="native")
    with pytest.raises(ValueError, match=r"backend='native' cannot run this network here: the network has Erf"):
        gram(Sequential(Conv2d(3), Erf(), Dense()), x, backend="native")
    with pytest.raises(ValueError, match=r"backend='native' cannot run .* float32 or float64, not torch.float16"):
        choose("native", Sequential(Conv2d(3), ReLU(), Dense()), (6, 6), torch.float16, CPU, 10)
    with pytest.raises(ValueError, match=r"backend='native' cannot run .* CPUs only, not cuda"):
        choose("native", Sequential(Conv2d(3), ReLU(), Dense()), (6, 6), F32, torch.device("cuda"), 10)
    # the same in CNNGPKernel, at its first evaluation
    kernel = CNNGPKernel(pooled, input_shape=(1, 6, 6), backend="native").double()
    with pytest.raises(ValueError, match="AvgPool2d"), torch.no_grad():
        kernel(x.flatten(1)).to_dense()


def test_auto_falls_back_quietly_and_gradients_run_where_they_can():
    _native_or_skip()
    model = Sequential(Conv2d(3), ReLU(), Dense())
    assert choose("auto", model, (6, 6), F32, CPU, 10**6) is Native
    # hyperparameter gradients: the native kernel differentiates the NNGP; torch.compile does not differentiate
    assert choose("native", model, (6, 6), F32, CPU, 10**6, grad=True) is Native
    assert choose("auto", model, (6, 6), F32, CPU, 10**6, grad=True) is Native
    assert choose("native", model, (6, 6), F32, CPU, 10**6, grad=True, ntk=True) is Eager
    assert choose("auto", model, (6, 6), F32, CPU, 10**6, grad=True, ntk=True) is Eager
    assert choose("inductor", model, (6, 6), F32, CPU, 10**6, grad=True) is Eager
    assert "not the NTK" in Native.unsupported(model, (6, 6), F32, CPU, ntk=True, grad=True)
    # gradients with respect to the images: always eager
    assert choose("native", model, (6, 6), F32, CPU, 10**6, grad=True, input_grad=True) is Eager
    pooled = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Dense())
    assert choose("auto", pooled, (6, 6), F32, CPU, 10**9) is Native
    assert choose("auto", pooled, (6, 6), F32, CPU, 10**9, grad=True) is Native
    assert choose("auto", pooled, (6, 6), F32, CPU, 10**9, grad=True, ntk=True) is Eager
    inside = Sequential(Conv2d(3), ReLU(), Sum([Sequential(), AvgPool2d(3, stride=1, padding=1)]), Dense())
    assert choose("auto", inside, (6, 6), F32, CPU, 10**9) is Eager  # full maps: eager beats torch.compile
    with settings.compile_mode("off"):
        assert choose("auto", model, (6, 6), F32, CPU, 10**9) is Eager
        assert choose("native", model, (6, 6), F32, CPU, 1) is Native  # an explicit backend beats the setting


def test_cnngp_kernel_passes_its_backend_on(monkeypatch):
    _native_or_skip()
    calls = []
    original = native.run_block
    monkeypatch.setattr(native, "run_block", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = Sequential(Conv2d(3, var_weight=2.0), ReLU(), Dense())
    x = _images(3, 2).flatten(1)  # 9 pairs: "auto" would stay eager
    eager = CNNGPKernel(model, input_shape=(1, 6, 6), backend="eager").double()
    fast = CNNGPKernel(model, input_shape=(1, 6, 6), backend="native").double()
    with torch.no_grad():
        want = eager(x).to_dense()
        assert not calls
        got = fast(x).to_dense()
    assert calls
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0.0)


def test_elementwise_networks_are_never_compiled():
    """Elementwise's quadrature unrolls into a graph too large to compile: refused by name, avoided by "auto"."""

    model = Sequential(Conv2d(3), Elementwise(torch.sin, degree=8), Dense())
    assert choose("auto", model, (6, 6), F32, CPU, 10**9) is Eager
    with settings.compile_mode("on"):
        assert choose("auto", model, (6, 6), F32, CPU, 10) is Eager
    with pytest.raises(ValueError, match=r"backend='inductor' cannot run this network here: Elementwise"):
        gram(model, _images(2, 3), backend="inductor")


def test_the_ntk_is_never_given_to_backends_that_cannot_run_it():
    from gpytorch_cnngp import GELU

    model = Sequential(Conv2d(3), ReLU(), Dense())
    with settings.native(False):
        assert choose("auto", model, (6, 6), F32, CPU, 10**9, ntk=True) is Inductor  # large same-location jobs
    elementwise = Sequential(Conv2d(3), Elementwise(torch.sin, degree=8), Dense())
    assert choose("auto", elementwise, (6, 6), F32, CPU, 10**9, ntk=True) is Eager
    with pytest.raises(ValueError, match=r"backend='inductor' cannot run this network here: Elementwise"):
        gram(elementwise, _images(2, 4), backend="inductor", get="ntk")
    # GELU's NNGP and NTK factor are closed forms of a few elementwise operations: compiled like ReLU's
    gelu = Sequential(Conv2d(3), GELU(), Dense())
    assert choose("auto", gelu, (6, 6), F32, CPU, 10**9) is Inductor
    assert choose("auto", gelu, (6, 6), F32, CPU, 10**9, ntk=True) is Inductor


def test_gelu_ntk_compiled_equals_eager():
    from gpytorch_cnngp import GELU

    gelu = Sequential(Conv2d(3, var_weight=2.0, var_bias=0.1), GELU(), Dense())
    x = _images(3, 4)
    want = gram(gelu, x, backend="eager", get=("nngp", "ntk"))
    got = gram(gelu, x, backend="inductor", get=("nngp", "ntk"))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0.0)
