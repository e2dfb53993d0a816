"""The contract every layer class passes, as a mixin (in the manner of GPyTorch's ``BaseKernelTestCase``).

A test class names one layer class and a small network around it (:meth:`LayerContract.create_model`; the
layer under test must not be the first layer: a nonlinearity of raw pixels has no Gaussian input), and
inherits these checks, each against something obtained independently of the engine:

* the Gram matrix is finite, exactly symmetric and positive semi-definite, and equals the independent
  float64 reference of ``tests/reference_full.py`` (full spatial covariances, selection matrices,
  closed forms or a differently turned quadrature);
* ``diag=True`` (self variances, and matched pairs ``k(x_i, z_i)``) equals the same reference;
* float32 agrees with float64;
* the finite networks ``model.nn(...)`` have second moments that match the kernel (Monte Carlo, with the
  statistics and tolerances of ``tests/test_monte_carlo.py``);
* the neural tangent kernel (``get="ntk"``) is finite, symmetric and positive semi-definite, equals the
  reference's (tangent blocks carried beside its covariance blocks), and comes with the NNGP in one pass;
* every backend agrees with the eager one; an explicit backend that cannot run the network raises a
  ValueError naming the layer that stops it. The ``torch.compile`` comparison takes 15-60 s per network on
  2 CPU cores, so it is a slow test (``pytest -m slow``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import reference_full
import torch
from test_monte_carlo import Z, allowance, check_against_kernel, correlation_errors, make_inputs, sample_second_moments

from gpytorch_cnngp import Layer, gram, gram_diag
from gpytorch_cnngp.backends import Inductor, Native

F64 = torch.float64
SIZE = 8


def _images(n: int, seed: int, dtype=F64, size: int = SIZE, channels: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g, dtype=F64)
    x[0, :, : size // 2] = 0.0  # part of an image black: zero variances inside the network
    return x.to(dtype)


class LayerContract:
    """Mixin of the checks every layer class passes; subclasses set :attr:`layer_class` and
    :meth:`create_model`."""

    #: the layer class under test (it must occur in :meth:`create_model`)
    layer_class: type[Layer]
    #: the exported function under test that builds :attr:`layer_class` layers (``resnet_block``), if any
    factory: Callable[..., Layer] | None = None
    #: relative tolerance against the float64 reference (quadrature-based layers need more)
    rtol_reference: float = 1e-10
    #: width of the finite networks of the Monte-Carlo check
    mc_channels: int = 32
    #: image size of the value checks (the quadrature references cost the square of its square)
    image_size: int = SIZE

    def images(self, n: int, seed: int, dtype=F64) -> torch.Tensor:
        return _images(n, seed, dtype, size=self.image_size)

    def create_model(self) -> Layer:
        raise NotImplementedError

    # --- values --------------------------------------------------------------------------------
    def test_the_layer_is_in_the_model(self):
        assert any(type(layer) is self.layer_class for layer in self.create_model().kernel_layers())

    def test_every_layer_states_its_offset_rule(self):
        # the spatial offsets a layer needs at its input for given output offsets (pooled networks carry only
        # those): a set of integer pairs, for every layer of the model
        out = frozenset({(0, 0), (1, -1)})
        for layer in self.create_model().kernel_layers():
            got = layer.offsets_needed(out, (self.image_size, self.image_size))
            assert isinstance(got, frozenset) and got, type(layer).__name__
            assert all(isinstance(dy, int) and isinstance(dx, int) for dy, dx in got), type(layer).__name__

    def test_gram_is_finite_symmetric_psd_and_equals_the_reference(self):
        model = self.create_model()
        x = self.images(5, seed=1)
        K = model(x)
        assert K.dtype == F64 and bool(torch.isfinite(K).all())
        assert torch.equal(K, K.T)
        eig = torch.linalg.eigvalsh(K)
        assert float(eig.min()) >= -1e-10 * float(eig.max()), f"not positive semi-definite: {eig}"
        want = reference_full.kernel(reference_full.describe(model), x.numpy())
        np.testing.assert_allclose(K.numpy(), want, rtol=self.rtol_reference, atol=0.0)

    def test_cross_kernel_equals_the_reference(self):
        model = self.create_model()
        x, z = self.images(3, seed=2), self.images(4, seed=3)
        want = reference_full.kernel(reference_full.describe(model), x.numpy(), z.numpy())
        np.testing.assert_allclose(model(x, z).numpy(), want, rtol=self.rtol_reference, atol=0.0)

    def test_diag_equals_the_reference(self):
        model = self.create_model()
        x, z = self.images(4, seed=4), self.images(4, seed=5)
        arch = reference_full.describe(model)
        got = model(x, diag=True)
        np.testing.assert_allclose(got.numpy(), reference_full.kernel_diag(arch, x.numpy()), rtol=self.rtol_reference)
        matched = model(x, z, diag=True)  # k(x_i, z_i): matched pairs, a third path through the engine
        want = np.diagonal(reference_full.kernel(arch, x.numpy(), z.numpy()))
        np.testing.assert_allclose(matched.numpy(), want, rtol=self.rtol_reference, atol=0.0)

    # --- the neural tangent kernel -------------------------------------------------------------
    def test_ntk_equals_the_reference(self):
        model = self.create_model()
        x, z = self.images(4, seed=12), self.images(3, seed=13)
        arch = reference_full.describe(model)
        nngp, ntk = gram(model, x, get=("nngp", "ntk"))
        # one pass for both: the NNGP is that of a call for the NNGP alone, to the bit
        assert torch.equal(nngp, gram(model, x))
        assert bool(torch.isfinite(ntk).all()) and torch.equal(ntk, ntk.T)
        eig = torch.linalg.eigvalsh(ntk)
        assert float(eig.min()) >= -1e-10 * float(eig.max()), f"NTK not positive semi-definite: {eig}"
        rtol = self.rtol_reference
        np.testing.assert_allclose(ntk.numpy(), reference_full.kernel(arch, x.numpy(), ntk=True), rtol=rtol, atol=0.0)
        want = reference_full.kernel(arch, x.numpy(), z.numpy(), ntk=True)
        np.testing.assert_allclose(gram(model, x, z, get="ntk").numpy(), want, rtol=rtol, atol=0.0)
        want = reference_full.kernel_diag(arch, x.numpy(), ntk=True)
        np.testing.assert_allclose(gram_diag(model, x, get="ntk").numpy(), want, rtol=rtol, atol=0.0)
        assert (ntk.diagonal() >= nngp.diagonal() * (1 - 1e-12)).all()  # Theta contains the last layer's K

    def test_float32_agrees_with_float64(self):
        model = self.create_model()
        x, z = self.images(4, seed=6), self.images(3, seed=7)
        for a, b in ((model(x), model(x.float())), (model(x, z), model(x.float(), z.float()))):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))

    # --- finite networks -----------------------------------------------------------------------
    def test_finite_networks_match_the_kernel(self):
        model = self.create_model()
        x = make_inputs(in_channels=2, size=SIZE)
        K = model(x)
        readout = 16
        S = sample_second_moments(model, x, channels=self.mc_channels, n_networks=200, out_channels=readout, seed=3)
        # per-network correlations: the statistic that resolves the finite-width bias (see test_monte_carlo)
        e = correlation_errors(S, K)
        check_against_kernel(
            e, allowance(self.mc_channels, exact_diagonal=False, readout=readout), self.layer_class.__name__
        )
        assert float(e.se.max()) * Z < 0.5, "the Monte-Carlo estimate is too noisy to test anything"

    # --- backends ------------------------------------------------------------------------------
    def test_native_backend_agrees_with_eager_or_names_the_layer(self):
        model = self.create_model()
        x, z = self.images(5, seed=8), self.images(19, seed=9)  # 19: a partial block of SIMD lanes
        reason = Native.unsupported(model, (self.image_size,) * 2, F64, torch.device("cpu"), ntk=True)
        if reason is None:
            both = ("nngp", "ntk")
            for dtype, rtol in ((F64, 1e-10), (torch.float32, 1e-4)):
                xd, zd = x.to(dtype), z.to(dtype)
                want = gram(model, xd, zd, backend="eager", get=both)
                torch.testing.assert_close(gram(model, xd, zd, backend="native", get=both), want, rtol=rtol, atol=0.0)
                want = gram(model, xd, backend="eager", get=both)
                torch.testing.assert_close(gram(model, xd, backend="native", get=both), want, rtol=rtol, atol=0.0)
            return
        # a kernel that fails to build or its self-test with a compiler present fails here instead of skipping
        if "no C++ compiler" in reason or "switched off" in reason:  # pragma: no cover - machine-dependent
            pytest.skip(f"the native kernel is not available here: {reason}")
        blocking = [type(layer).__name__ for layer in model.kernel_layers() if type(layer).__name__ in reason]
        assert blocking, f"the error does not name a layer of the network: {reason}"
        with pytest.raises(ValueError, match=rf"backend='native' cannot run this network here: .*{blocking[0]}"):
            gram(model, x, z, backend="native")
        # "auto" falls back quietly to a backend that can
        torch.testing.assert_close(gram(model, x, z), gram(model, x, z, backend="eager"), rtol=1e-12, atol=0.0)

    @pytest.mark.slow
    def test_inductor_backend_agrees_with_eager_or_names_the_layer(self):
        model = self.create_model()
        x, z = self.images(5, seed=10), self.images(7, seed=11)
        reason = Inductor.unsupported(model, (self.image_size,) * 2, F64, torch.device("cpu"), ntk=True)
        if reason is not None:
            blocking = [type(layer).__name__ for layer in model.kernel_layers() if type(layer).__name__ in reason]
            assert blocking, f"the error does not name a layer of the network: {reason}"
            with pytest.raises(ValueError, match=rf"backend='inductor' cannot run this network here: {blocking[0]}"):
                gram(model, x, z, backend="inductor", get=("nngp", "ntk"))
            return
        for dtype, rtol in ((F64, 1e-10), (torch.float32, 1e-4)):
            xd, zd = x.to(dtype), z.to(dtype)
            want = gram(model, xd, zd, backend="eager", get=("nngp", "ntk"))
            got = gram(model, xd, zd, backend="inductor", get=("nngp", "ntk"))
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=rtol, atol=0.0)
