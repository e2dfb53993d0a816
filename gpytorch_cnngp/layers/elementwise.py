"""Any elementwise torch function as a nonlinearity, its kernel by a Hermite (Mehler) series."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..ops import first_order_only
from ..state import CovState
from .base import FiniteBuild, Nonlinearity

__all__ = ["Elementwise"]


class _Apply(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


# Gauss-Hermite nodes evaluated together by self_map (its memory: this many times an image's map)
_NODE_GROUP = 16


def _derivatives(fn: Callable[[Tensor], Tensor], x: Tensor, orders: tuple[int, ...]) -> list[Tensor]:
    """``fn``'s derivatives of the given orders at ``x`` (elementwise), by autograd from one evaluation of ``fn``."""
    top = max(orders)
    if top == 0:
        return [fn(x)]
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = [fn(xr)]
        for k in range(top):
            out += torch.autograd.grad(out[k].sum(), xr, create_graph=k + 1 < top)
    return [out[k].detach() for k in orders]


class _Side(NamedTuple):
    """One side's series: its coefficients ``[term, ...]`` and what :meth:`Elementwise._terms` reads of them (per
    term the largest ``|a_k|``, and the smallest norm ``||a||`` over the entries; ``None`` for shapes alone)."""

    coef: Tensor
    amax: list[float] | None
    norm: float | None


class _Expectation(torch.autograd.Function):
    """``E[f^(k)(u) f^(k)(v)]`` for ``(u, v)`` centred Gaussian with covariance ``c`` and standard deviations
    ``s1, s2`` (``k = order``: 0 for the kernel, 1 for the neural tangent kernel's factor).

    The backward uses Price's theorem, ``dE/dc = E[f^(k+1)(u) f^(k+1)(v)]`` and, at fixed ``c``,
    ``dE/ds1 = s1 E[f^(k+2)(u) f^(k)(v)]``: exact and finite at correlation 1, where differentiating the
    quadrature through ``sqrt(1 - rho^2)`` would not be.
    """

    @staticmethod
    def forward(ctx, c, s1, s2, layer, order, series):
        ctx.layer, ctx.order = layer, order
        ctx.save_for_backward(c, s1, s2)
        return layer._quadrature(c, s1, s2, order, order, series)

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        c, s1, s2 = ctx.saved_tensors
        q, k = ctx.layer._quadrature, ctx.order
        g_c = g_s1 = g_s2 = None
        if ctx.needs_input_grad[0]:
            g_c = (grad * q(c, s1, s2, k + 1, k + 1)).sum_to_size(c.shape)
        if ctx.needs_input_grad[1]:
            g_s1 = (grad * s1 * q(c, s1, s2, k + 2, k)).sum_to_size(s1.shape)
        if ctx.needs_input_grad[2]:
            g_s2 = (grad * s2 * q(c, s1, s2, k, k + 2)).sum_to_size(s2.shape)
        return g_c, g_s1, g_s2, None, None, None


class Elementwise(Nonlinearity):
    r"""``phi = fn`` for any elementwise torch function ``fn`` (``torch.tanh``, ``torch.sin``, a lambda, ...).

    Its kernel is the expectation over the bivariate Gaussian of the two pre-activations ``u = s_1 x``,
    ``v = s_2 y`` (``x, y`` standard normal with correlation :math:`\rho = c / (s_1 s_2)`), by Mehler's
    expansion in the orthonormal Hermite polynomials :math:`h_k = He_k / \sqrt{k!}`:

    .. math::
        E[f(u) f(v)] = \sum_{k \ge 0} \rho^k\, a_k(s_1)\, a_k(s_2), \qquad a_k(s) = E[f(s x)\, h_k(x)],

    truncated after ``degree`` terms, each :math:`a_k(s)` by a Gauss-Hermite rule of ``degree`` nodes. The
    coefficients depend on one image's standard deviation at one position, so they cost ``degree`` evaluations of
    ``fn`` and ``degree^2 / 2`` multiply-adds per image and position (the rule folded at its symmetric nodes),
    computed once per call for each image where the memory budget leaves room to keep them across tiles; a pair
    costs a multiply-add in :math:`\rho` per term kept (Horner). The
    truncated series is itself a kernel (each :math:`\rho^k` is one), and an image's own value at one position
    keeps the whole sum, :math:`E[f(u)^2]`, so the tail the truncation drops only adds to the diagonal.
    Exact when ``f`` is a polynomial of degree below ``degree``. For other smooth ``f`` the error falls
    geometrically in the square root of ``degree``, more slowly the larger the variances and the nearer ``f``'s
    complex singularities: ``sin`` is exact to rounding at standard deviations up to 2, while ``tanh`` (poles at
    :math:`\pm i\pi/2`) at standard deviation 1 is within 7e-6 relative with 32 terms and 7e-9 with the default 64,
    and at 1.5 within 5e-4 and 5e-6. Raise ``degree`` for large pre-activation variances (the cost per pair grows
    linearly). Gradients follow Price's theorem (finite and exact at correlation 1, identical images included);
    ``fn`` must then be twice differentiable by autograd. The finite layer is ``fn`` itself. The neural tangent
    kernel's factor :math:`E[f'(u) f'(v)]` is the same series with the coefficients of ``f'`` by autograd.
    The closed-form layers (``ReLU``, ``Erf``, ``GELU``, ``LeakyReLU``) are still exact and faster where they exist.

    Layers that cannot exist exactly this way: max pooling has no closed form for the expectation of a
    maximum of many correlated Gaussians, and is not a pointwise map.

    Example::

        >>> model = Sequential(Conv2d(3), Elementwise(torch.tanh), Dense())
        >>> K = model(torch.rand(4, 1, 8, 8))
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], degree: int = 64) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"fn must be a callable applied elementwise to a tensor, got {type(fn).__name__}")
        if isinstance(degree, bool) or not isinstance(degree, int) or not 2 <= degree <= 200:
            raise ValueError(f"degree must be an integer from 2 to 200, got {degree!r}")
        probe = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
        try:
            out = fn(probe)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's function is reported as such
            raise ValueError(f"fn could not be applied to a float64 tensor: {exc}") from exc
        if not isinstance(out, Tensor) or out.shape != probe.shape:
            raise ValueError("fn must return a tensor of its input's shape (an elementwise function)")
        self.fn = fn
        self.degree = degree
        t, w = np.polynomial.hermite.hermgauss(degree)
        self._nodes = [float(x) for x in t]
        self._weights = [float(x) for x in w]
        self._bases: dict = {}  # the Hermite basis per dtype and device (see _basis)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', repr(self.fn))}, degree={self.degree}"

    def _f(self, order: int) -> Callable[[Tensor], Tensor]:
        return self.fn if order == 0 else (lambda x: _derivatives(self.fn, x, (order,))[0])

    def _basis(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The nodes ``sqrt(2) t_i`` and the matrix ``M[i, k] = w_i h_k(sqrt(2) t_i) / sqrt(pi)`` taking ``f`` at the
        nodes to its first ``degree`` Hermite coefficients (float64 recurrence, then ``like``'s dtype and device)."""
        key = (like.dtype, like.device)
        if key not in self._bases:
            x = math.sqrt(2.0) * np.asarray(self._nodes)
            h = np.zeros((self.degree, self.degree))
            h[:, 0] = 1.0
            h[:, 1] = x
            for k in range(1, self.degree - 1):  # the orthonormal three-term recurrence, stable for these k
                h[:, k + 1] = (x * h[:, k] - math.sqrt(k) * h[:, k - 1]) / math.sqrt(k + 1)
            M = np.asarray(self._weights)[:, None] * h / math.sqrt(math.pi)
            self._bases[key] = (
                torch.tensor(x, dtype=like.dtype, device=like.device),
                torch.tensor(M, dtype=like.dtype, device=like.device),
            )
        return self._bases[key]

    def _folded(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The rule folded at its nodes, which come in pairs ``+-x`` with equal weights: the nodes as ``f`` is
        evaluated (the positive ones, their negatives, then the centre for an odd degree) and the rows of
        :meth:`_basis`' matrix at the positive nodes (then the centre), even terms and odd terms. Since
        ``h_k(-x) = (-1)^k h_k(x)``, the even coefficients are the first matrix times ``f(s x) + f(-s x)`` and the
        odd ones the second times ``f(s x) - f(-s x)``: half the products of the whole matrix."""
        key = ("folded", like.dtype, like.device)
        if key not in self._bases:
            x, M = self._basis(like)
            half = self.degree // 2
            positive = torch.arange(self.degree - half, self.degree)  # ascending nodes: the positive half last
            rows = positive if self.degree % 2 == 0 else torch.cat([positive, torch.tensor([half])])
            nodes = torch.cat([x[positive], -x[positive], x[half : half + self.degree % 2]])
            self._bases[key] = (nodes, M[rows][:, 0::2].contiguous(), M[positive][:, 1::2].contiguous())
        return self._bases[key]

    def _coefficients(self, s: Tensor, order: int) -> Tensor:
        """``a_k(s) = E[f^(order)(s x) h_k(x)]`` for ``k < degree``, in a new first dimension (each term's
        coefficients one contiguous map)."""
        nodes, _, _ = self._folded(s)
        return self._fold(self._f(order)(s.unsqueeze(-1) * nodes))

    def _fold(self, values: Tensor) -> Tensor:
        """The coefficients ``[term, ...]`` from a function's values ``[..., node]`` at :meth:`_folded`'s nodes."""
        _, even, odd = self._folded(values)
        half, last = self.degree // 2, values.dim() - 1
        plus, minus = values[..., :half], values[..., half : 2 * half]
        out = values.new_empty(self.degree, *values.shape[:-1])
        # an odd f (or an even one's derivative) has exactly zero even parts, an even f zero odd parts: no product
        for part, matrix, terms in (
            (plus + minus, even, slice(0, None, 2)),
            (plus - minus, odd, slice(1, None, 2)),
        ):
            if matrix.shape[0] > half:  # the centre node of an odd degree, in the even terms only
                part = torch.cat([part, values[..., 2 * half :]], dim=-1)
            if not part.is_meta and not part.any():
                out[terms] = 0.0
            else:
                out[terms] = torch.tensordot(matrix.T, part, dims=([1], [last]))
        return out

    def _sides(self, s: Tensor, orders: tuple[int, ...]) -> tuple[_Side, ...]:
        """One side's series (:class:`_Side`) of ``f`` and its derivatives of the given orders for the standard
        deviations ``s`` (one evaluation of ``f`` at the nodes for all of them), outside autograd: the gradients
        follow Price's theorem (see :class:`_Expectation`)."""
        with torch.no_grad():
            nodes, _, _ = self._folded(s)
            values = _derivatives(self.fn, s.detach().unsqueeze(-1) * nodes, orders)
            return tuple(self._summarised(self._fold(v)) for v in values)

    def _side(self, s: Tensor, order: int) -> _Side:
        return self._sides(s, (order,))[0]

    @staticmethod
    def _summarised(coef: Tensor) -> _Side:
        if coef.is_meta or coef.numel() == 0:  # meta: shapes only (the tiling's probe)
            return _Side(coef, None, None)
        flat = coef.flatten(1)  # (amax and amin, and a product summed, are faster than the norms here)
        amax = torch.maximum(flat.amax(1), -flat.amin(1)).tolist()
        norm = math.sqrt(float((flat * flat).sum(0).amin()))
        return _Side(coef, amax, norm)

    @staticmethod
    def _terms(a: _Side, b: _Side) -> list[int]:
        """The terms kept, ascending: the smallest are dropped while their bounds
        ``max|a_k(s1)| max|b_k(s2)|`` sum to at most the dtype's rounding of the smallest ``||a|| ||b||`` (about
        ``sqrt(E[f(u)^2] E[f(v)^2])``, the entries' scale). An odd or even ``f`` loses half its terms this way, a
        smooth one its tail; the kept sum differs from the full one by less than rounding the entries would."""
        n = a.coef.shape[0]
        if a.amax is None or b.amax is None:
            return list(range(n))
        bound = [x * y for x, y in zip(a.amax, b.amax, strict=True)]
        scale = a.norm * b.norm
        budget, dropped = torch.finfo(a.coef.dtype).eps * scale, set()
        for k in sorted(range(n), key=bound.__getitem__):
            if bound[k] > budget:
                break
            budget -= bound[k]
            dropped.add(k)
        return [k for k in range(n) if k not in dropped]

    def _quadrature(
        self,
        c: Tensor,
        s1: Tensor,
        s2: Tensor,
        order1: int,
        order2: int,
        series: tuple[list[int], list[tuple[Tensor, Tensor]]] | None = None,
    ) -> Tensor:
        """``E[f^(order1)(u) f^(order2)(v)]`` by the truncated Mehler series (see the class), the coefficients once
        per image and position, the sum over the terms kept (:meth:`_terms`) by Horner's rule on the pair map.
        ``series``: the terms kept and their coefficients of both sides placed where the entries read them,
        when the caller has them (else computed here from ``s1`` and ``s2``)."""
        prod = s1 * s2
        positive = prod > 0
        rho = torch.where(positive, c / torch.where(positive, prod, 1.0), 0.0).clamp(-1.0, 1.0)
        if series is None:
            a = self._side(s1, order1)
            # an image with itself (the self pass's derivative map): the same coefficients on both sides
            b = a if s2 is s1 and order2 == order1 else self._side(s2, order2)
            keep = self._terms(a, b)
            series = keep, [(a.coef[k], b.coef[k]) for k in keep]
        keep, pairs = series
        if not keep:
            return torch.zeros_like(rho)
        powers: dict[int, Tensor] = {1: rho}

        def power(g: int) -> Tensor:  # rho^g, once per distinct gap between kept terms
            if g not in powers:
                powers[g] = rho.pow(g)
            return powers[g]

        out = torch.mul(*pairs[-1]).expand(rho.shape).clone()
        # never differentiated by autograd (see _Expectation): in place
        for hi, lo, (a, b) in zip(reversed(keep[1:]), reversed(keep[:-1]), reversed(pairs[:-1]), strict=True):
            out.mul_(power(hi - lo)).addcmul_(a, b)
        return out.mul_(power(keep[0])) if keep[0] else out

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        """``E[f(u)^2]`` by the Gauss-Hermite rule, a few nodes at a time (a tensor op per group, not per node)."""
        return self._own(s, self.fn)

    def _own(self, s: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        """``E[f(s x)^2]`` by the Gauss-Hermite rule, :data:`_NODE_GROUP` nodes to a tensor op."""
        x, M = self._basis(s)
        weights = M[:, 0]  # w_i h_0(x_i) / sqrt(pi), h_0 = 1: the rule's weights over sqrt(pi)
        out = None
        for k in range(0, self.degree, _NODE_GROUP):
            values = f(s.unsqueeze(-1) * x[k : k + _NODE_GROUP])
            term = (values * values) @ weights[k : k + _NODE_GROUP]
            out = term if out is None else out + term
        return out

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        return self.expectation(c, s1, s2, 0)

    def expectation(self, c: Tensor, s1: Tensor, s2: Tensor, order: int, series=None) -> Tensor:
        """``E[f^(order)(u) f^(order)(v)]`` by the product rule, differentiable (Price's theorem); ``series`` as
        :meth:`_quadrature` takes it."""
        if torch.is_grad_enabled() and (c.requires_grad or s1.requires_grad or s2.requires_grad):
            return _Expectation.apply(c, s1, s2, self, order, series)
        return self._quadrature(c, s1, s2, order, order, series)

    def pair_functions(self, state: CovState) -> tuple[Callable, Callable]:
        # in a pair pass, each side's coefficients once per image range for the whole call (Pass.derived), placed
        # by the layout like the standard deviations, instead of once per tile and (on the offset path) offset
        run, layout = state.run, state.layout
        if run.mode != "pair":
            return super().pair_functions(state)

        orders = (0, 1) if state.ntk is not None else (0,)  # the NTK's series from the same evaluations of f

        def bound(order: int) -> Callable:
            def pair(c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
                sides_x, sides_z = run.derived(f"series {orders}", lambda s: self._sides(s, orders))
                a, b = sides_x[order], sides_z[order]
                keep = self._terms(a, b)
                placed = [layout.place(*run.shaped(a.coef[k], b.coef[k])) for k in keep]
                return self.expectation(c, s1, s2, order, (keep, placed))

            return pair

        return bound(0), bound(1)

    def self_derivative_map(self, v: Tensor, s: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (v.requires_grad or s.requires_grad):
            # the pair rule at correlation 1 (its second axis then contributes nothing): exact and differentiable
            return self.expectation(v, s, s, 1)
        # the rule itself, E[f'(u)^2]: the same sum as the series' at correlation 1 with every term (the nodes'
        # discrete orthogonality), without the coefficients
        return self._own(s, self._f(1))

    def pair_derivative_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        return self.expectation(c, s1, s2, 1)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return _Apply(self.fn), incoming
