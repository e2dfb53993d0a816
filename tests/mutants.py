"""Deliberately wrong variants of the library's formulas, to prove that the exactness tests can fail.

Each mutant patches the library at the narrowest point (an ``ops`` function, the name a layer or the
layout module imported, one layer method) through a ``pytest.MonkeyPatch``; the source files are never modified.
``tests/conftest.py`` applies the mutant named by the environment variable ``CNNGP_MUTANT`` for a
whole session and ``tests/mutation_check.py`` runs the test files once per mutant.

Patches act when a layer computes, not when it is built, so models created at import or collection
time are mutated as well.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import gpytorch_cnngp.engine as engine
import gpytorch_cnngp.layers.base as base
import gpytorch_cnngp.layers.combinators as combinators
import gpytorch_cnngp.layers.conv as conv
import gpytorch_cnngp.layers.dense as dense
import gpytorch_cnngp.layers.erf as erf
import gpytorch_cnngp.layers.leaky_relu as leaky_relu
import gpytorch_cnngp.layers.pooling as pooling
import gpytorch_cnngp.layers.relu as relu
import gpytorch_cnngp.layout as layout
import gpytorch_cnngp.ops as ops
import gpytorch_cnngp.passes as passes


def _wrap_relu_expectations(mp, transform) -> None:
    """Replace every ``ops.relu_expectation*`` function, and the names a layer module imported from
    ops, by ``transform(out, c, s1, s2)`` of the original's output: all ReLU paths (autograd, eager,
    compiled) get the same wrong formula."""
    names = [name for name in dir(ops) if name.startswith("relu_expectation") and callable(getattr(ops, name))]
    if not names:
        raise RuntimeError("gpytorch_cnngp.ops has no relu_expectation* function to mutate")
    for name in names:
        original = getattr(ops, name)

        def wrapped(c, s1, s2, *args, _original=original, **kwargs):
            return transform(_original(c, s1, s2, *args, **kwargs), c, s1, s2)

        mp.setattr(ops, name, wrapped)
        if hasattr(relu, name):
            mp.setattr(relu, name, wrapped)


def _relu_factor2(mp):
    """ReLU pair values E[relu(u) relu(v)] times 2 (the self values stay v / 2)."""
    _wrap_relu_expectations(mp, lambda out, c, s1, s2: 2.0 * out)


def _relu_self_no_half(mp):
    """ReLU self values v instead of v / 2."""
    mp.setattr(relu.ReLU, "self_map", lambda self, v, s: v * 1.0)


class _TorchWithFlippedAcos:
    """``torch`` as seen from gpytorch_cnngp.ops, except that ``acos(x)`` computes ``acos(-x)``."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def acos(self, x, *args, **kwargs):
        return self._real.acos(-x, *args, **kwargs)


def _acos_sign(mp):
    """theta = arccos(-rho) in place of arccos(rho) in ops' library arccos; the compiled path's
    arccos-free form is evaluated at -rho."""
    mp.setattr(ops, "torch", _TorchWithFlippedAcos(torch))
    poly = ops.relu_expectation_poly
    mp.setattr(ops, "relu_expectation_poly", lambda c, s1, s2, inv1, inv2: poly(-c, s1, s2, inv1, inv2))


def _poly_half_power(mp):
    """The compiled path's ReLU with (1 - a)^(1/2) R(a) in place of (1 - a)^(3/2) R(a)."""

    def poly(c, s1, s2, inv1, inv2):
        a = (c.abs() * inv1 * inv2).clamp_max(1.0)
        u = 1.0 - a
        r = ops._horner(a, ops._R_OVER_2PI64 if c.dtype == torch.float64 else ops._R_OVER_2PI32)
        return c.clamp_min(0.0) * 0.5 + (s1 * s2) * torch.sqrt(u) * r

    mp.setattr(ops, "relu_expectation_poly", poly)


def _relu_no_sqrt_term(mp):
    """J(rho) without its sqrt(1 - rho^2) term: E - sqrt(v1 v2 - c^2) / (2 pi)."""

    def drop_sqrt(out, c, s1, s2):
        prod = s1 * s2
        return out - torch.sqrt((prod * prod - c * c).clamp_min(0.0)) / (2.0 * math.pi)

    _wrap_relu_expectations(mp, drop_sqrt)


def _pad_not_counted(mp):
    """Window sums divided by the number of in-image taps instead of k^2 (padding not counted)."""
    window_sum = layout.window_sum

    def per_tap_mean_times_k2(m, win_h, win_w, method="matmul", scale=None):
        summed = window_sum(m, win_h, win_w, method, scale)
        ones = torch.ones(m.shape[:2], dtype=m.dtype, device=m.device)  # maps are [H, W, ...]
        count = window_sum(ones, win_h, win_w, method).clamp_min(1.0)
        count = count.reshape(*count.shape, *([1] * (m.dim() - 2)))
        return summed * (win_h.size * win_w.size) / count

    mp.setattr(layout, "window_sum", per_tap_mean_times_k2)


def _even_k_flipped(mp):
    """Even k under "same" padded mirrored: one more before than after (PyTorch-style, not TF SAME)."""
    window_sum = layout.window_sum

    def flip(win):
        if win.pad_before == win.pad_after:
            return win
        return dataclasses.replace(win, pad_before=win.pad_after, pad_after=win.pad_before)

    def flipped(m, win_h, win_w, method="matmul", scale=None):
        return window_sum(m, flip(win_h), flip(win_w), method, scale)

    mp.setattr(layout, "window_sum", flipped)


def _no_exact_diag(mp):
    """No exact-diagonal rule anywhere: image-with-itself pairs go through J(rho ~ 1) like any pair.

    Two places implement the rule: the nonlinearity overwrites the diagonal of a same-set block
    after each ReLU, and the Gram engine copies the self values onto the final diagonal. The mutant
    disables the first and computes the final diagonal as generic matched pairs instead.
    """
    propagate = base.Nonlinearity.propagate

    def propagate_no_diag(self, state):
        same, state.run.same = state.run.same, False
        try:
            return propagate(self, state)
        finally:
            state.run.same = same

    mp.setattr(base.Nonlinearity, "propagate", propagate_no_diag)
    fill = engine._fill

    def fill_generic_diag(model, x, z, hyper, plan, backend, req, progress):
        out = fill(model, x, z, hyper, plan, backend, req, progress)
        if z is None:
            trace, _ = passes.self_pass(model, x, hyper)
            out.diagonal().copy_(passes.paired(model, x, x, trace, trace, hyper))
        return out

    mp.setattr(engine, "_fill", fill_generic_diag)


def _sum_mean(mp):
    """Sum averages its branches instead of adding them."""

    sum_propagate = combinators.Sum.propagate

    def mean_propagate(self, state):
        out = sum_propagate(self, state)
        return out.replace(nngp=out.nngp / len(self.branches))

    mp.setattr(combinators.Sum, "propagate", mean_propagate)


def _channel_sum(mp):
    """Input kernel summed over channels instead of averaged."""
    matched_in, pair_in = passes.input_matched, passes.input_pair
    # the passes hold images as [H, W, C, N]
    mp.setattr(passes, "input_matched", lambda x, z, *full: matched_in(x, z, *full) * x.shape[2])
    mp.setattr(passes, "input_pair", lambda x, z, *full: pair_in(x, z, *full) * x.shape[2])
    offsets_in = passes.input_offsets
    mp.setattr(passes, "input_offsets", lambda x, z, *rest: offsets_in(x, z, *rest) * x.shape[2])


def _bias_over_k2(mp):
    """var_bias divided by k^2 along with var_weight."""
    propagate = conv.Conv2d.propagate

    def bias_scaled(self, state):
        out = propagate(self, state)
        bias = state.hyper(self, "var_bias")
        return out.replace(nngp=out.nngp - bias + bias / self.kernel_size**2)

    mp.setattr(conv.Conv2d, "propagate", bias_scaled)


# --- pooling, Dense, Erf, LeakyReLU (killed by tests/test_pooling.py, test_dense.py, test_nonlinearities.py)


def _avgpool_same_tap(mp):
    """AvgPool2d pairs tap t of one image with the *same* tap t of the other (a convolution with
    weight variance 1), instead of averaging both windows independently."""

    def conv_like(self, state):
        # a convolution's window sum in whatever layout the state carries (both positions moved together)
        return state.each(lambda m: state.window_sum(m, self.window, 1.0 / self.kernel_size**2))

    mp.setattr(pooling.AvgPool2d, "propagate", conv_like)


def _gap_same_location(mp):
    """GlobalAvgPool2d averages only the same-location entries K[p, p] (as a Dense readout would)."""
    mp.setattr(pooling.GlobalAvgPool2d, "propagate", lambda self, state: state.each(state.readout))


def _erf_missing_2(mp):
    """Erf pair values arcsin(c / sqrt((1 + 2 v1)(1 + 2 v2))): the factor 2 of 2c dropped (self values kept)."""
    pair_map = erf.Erf.pair_map
    mp.setattr(erf.Erf, "pair_map", lambda self, c, s1, s2, compiled: pair_map(self, c / 2.0, s1, s2, compiled))


def _leaky_no_cross_terms(mp):
    """LeakyReLU pair values (1 - a)^2 J + a^2 c: the cross terms 2 a (1 - a) E[relu(u) v] = a (1 - a) c dropped."""
    pair_map = leaky_relu.LeakyReLU.pair_map

    def no_cross(self, c, s1, s2, compiled):
        a = self.negative_slope
        return pair_map(self, c, s1, s2, compiled) - c * (a * (1.0 - a))

    mp.setattr(leaky_relu.LeakyReLU, "pair_map", no_cross)


def _dense_weight_per_position(mp):
    """Dense sums K[p, p] over the positions instead of averaging them (weights N(0, vw / C))."""
    propagate = dense.Dense.propagate

    def summed(self, state):
        out = propagate(self, state)
        h, w = state.nngp.shape[0], state.nngp.shape[1]
        bias = state.hyper(self, "var_bias")
        return out.replace(nngp=(out.nngp - bias) * (h * w) + bias)

    mp.setattr(dense.Dense, "propagate", summed)


# --- the neural tangent kernel (killed by tests/test_layer_contract.py and test_ntk.py)


def _ntk_conv_no_new_k(mp):
    """Conv2d's NTK without its own weights' and bias' term: Theta' = vw C(Theta) (the + K' dropped)."""
    propagate = conv.Conv2d.propagate

    def no_own_term(self, state):
        out = propagate(self, state)
        return out if out.ntk is None else out.replace(ntk=out.ntk - out.nngp)

    mp.setattr(conv.Conv2d, "propagate", no_own_term)


def _ntk_relu_constant_factor(mp):
    """ReLU multiplies the NTK by 1/2 (its self value) at every correlation instead of (pi - theta) / (2 pi)."""
    mp.setattr(relu.ReLU, "pair_derivative_map", lambda self, c, s1, s2, compiled: torch.full_like(c, 0.5))


def _ntk_dense_unweighted(mp):
    """Dense adds the previous NTK's mean without its var_weight: Theta' = mean(Theta) + K'."""
    propagate = dense.Dense.propagate

    def unweighted(self, state):
        out = propagate(self, state)
        if out.ntk is None:
            return out
        weight = state.hyper(self, "var_weight")
        return out.replace(ntk=(out.ntk - out.nngp) / weight + out.nngp)

    mp.setattr(dense.Dense, "propagate", unweighted)


def _ntk_erf_half_factor(mp):
    """Erf's NTK factor with 2 / pi instead of 4 / pi (half of E[erf'(u) erf'(v)])."""
    pair = erf.Erf.pair_derivative_map
    own = erf.Erf.self_derivative_map
    mp.setattr(erf.Erf, "pair_derivative_map", lambda self, c, s1, s2, compiled: pair(self, c, s1, s2, compiled) / 2)
    mp.setattr(erf.Erf, "self_derivative_map", lambda self, v, s: own(self, v, s) / 2)


def _native_ntk_factor_doubled(mp):
    """The native kernel's ReLU NTK factor with 2 q in place of q = arccos(|rho|) / (2 pi), and its self-test at
    load skipped (as if a miscompiled kernel had got through): the tests must see it themselves."""
    import gpytorch_cnngp.backends.native as native

    coefficients = native.run.relu_derivative_poly_coefficients
    mp.setattr(native.run, "relu_derivative_poly_coefficients", lambda dtype: tuple(2 * k for k in coefficients(dtype)))
    mp.setattr(native.build, "_self_test", lambda lib: None)


def _native_vjp_no_trace_gradients(mp):
    """The native kernel's reverse mode without the gradients into the traces' standard deviations (only the
    window sums' own parameters): what a VJP that forgot the ReLU's dependence on the variances would give."""
    import gpytorch_cnngp.backends.native as native

    original = native.run_block_vjp

    def no_traces(*args, **kwargs):
        g_params, g_tx, g_tz = original(*args, **kwargs)
        return g_params, [torch.zeros_like(g) for g in g_tx], [torch.zeros_like(g) for g in g_tz]

    mp.setattr(native, "run_block_vjp", no_traces)


MUTANTS = {
    "relu_factor2": _relu_factor2,
    "relu_self_no_half": _relu_self_no_half,
    "acos_sign": _acos_sign,
    "poly_half_power": _poly_half_power,
    "relu_no_sqrt_term": _relu_no_sqrt_term,
    "pad_not_counted": _pad_not_counted,
    "even_k_flipped": _even_k_flipped,
    "no_exact_diag": _no_exact_diag,
    "sum_mean": _sum_mean,
    "channel_sum": _channel_sum,
    "bias_over_k2": _bias_over_k2,
    "avgpool_same_tap": _avgpool_same_tap,
    "gap_same_location": _gap_same_location,
    "erf_missing_2": _erf_missing_2,
    "leaky_no_cross_terms": _leaky_no_cross_terms,
    "dense_weight_per_position": _dense_weight_per_position,
    "ntk_conv_no_new_k": _ntk_conv_no_new_k,
    "ntk_relu_constant_factor": _ntk_relu_constant_factor,
    "ntk_dense_unweighted": _ntk_dense_unweighted,
    "ntk_erf_half_factor": _ntk_erf_half_factor,
    "native_ntk_factor_doubled": _native_ntk_factor_doubled,
    "native_vjp_no_trace_gradients": _native_vjp_no_trace_gradients,
}


def apply(name: str, mp) -> None:
    """Apply the mutant ``name`` with the ``pytest.MonkeyPatch`` ``mp``."""
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; known: {', '.join(MUTANTS)}")
    MUTANTS[name](mp)
