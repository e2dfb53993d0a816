"""Leaky rectified linear unit."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from ..ops import relu_derivative_expectation, relu_expectation, relu_expectation_forward
from .base import FiniteBuild, Nonlinearity

__all__ = ["LeakyReLU"]


class LeakyReLU(Nonlinearity):
    r"""``phi(u) = u`` for ``u > 0`` and ``alpha u`` otherwise (``alpha = negative_slope``).

    Since ``phi(u) = (1 - alpha) relu(u) + alpha u``, and ``E[relu(u) u'] = c / 2``:

    .. math::
        E[\phi(u)\,\phi(u')] = (1 - \alpha)^2 J(c) + \alpha c, \qquad E[\phi(u)^2] = \frac{1 + \alpha^2}{2} v,

    with ``J`` the ReLU expectation of :class:`ReLU` (so the same overflow-free, finite-gradient
    formula is used). ``alpha = 0`` is the ReLU, ``alpha = 1`` the identity; any real slope works.
    """

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
            raise ValueError(f"LeakyReLU negative_slope must be a real number, got {negative_slope!r}")
        if not math.isfinite(negative_slope):
            raise ValueError(f"LeakyReLU negative_slope must be finite, got {negative_slope}")
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope:g}"

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        return v * (0.5 * (1.0 + self.negative_slope**2))

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        alpha = self.negative_slope
        if torch.is_grad_enabled() and (c.requires_grad or s1.requires_grad or s2.requires_grad):
            j = relu_expectation(c, s1, s2)
        else:
            j = relu_expectation_forward(c, s1, s2, compiled)
        return j * (1.0 - alpha) ** 2 + c * alpha

    # phi'(u) = alpha + (1 - alpha) H(u) with H(0) = 0 (autograd's phi'(0) = alpha), so
    # E[phi'(u) phi'(u')] = alpha^2 + alpha (1 - alpha) (E H(u) + E H(u')) + (1 - alpha)^2 E[H(u) H(u')]

    def self_derivative_map(self, v: Tensor, s: Tensor) -> Tensor:
        a = self.negative_slope
        h = (s > 0).to(s.dtype) * 0.5
        return h * (2.0 * a * (1.0 - a) + (1.0 - a) ** 2) + a * a

    def pair_derivative_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        a = self.negative_slope
        h1, h2 = (s1 > 0).to(s1.dtype) * 0.5, (s2 > 0).to(s2.dtype) * 0.5
        return relu_derivative_expectation(c, s1, s2) * (1.0 - a) ** 2 + (h1 + h2) * (a * (1.0 - a)) + a * a

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return nn.LeakyReLU(self.negative_slope), incoming
