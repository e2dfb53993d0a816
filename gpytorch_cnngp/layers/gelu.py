"""The Gaussian error linear unit, ``u * Phi(u)``."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from .base import FiniteBuild, Nonlinearity
from .elementwise import Elementwise

__all__ = ["GELU"]


@functools.cache
def _quadrature_layer() -> Elementwise:
    """``Elementwise(gelu)``, made once: the quadrature of GELU's NTK factor."""
    return Elementwise(torch.nn.functional.gelu, degree=GELU.ntk_quadrature_degree)


_INV_2PI = 0.5 / math.pi


class GELU(Nonlinearity):
    r"""``phi(u) = u Phi(u)`` (the exact GELU, ``torch.nn.GELU()``). With ``a, b`` the variances,
    ``c`` the covariance, ``t_i = \sqrt{1 + v_i}`` and ``r = c / (t_1 t_2)``:

    .. math::
        E[\phi(u)\,\phi(u')] = c\left(\frac14 + \frac{\arcsin r}{2\pi}\right)
            + \frac{1}{2\pi}\left(\frac{a}{t_1}\frac{b}{t_2}\sqrt{1 - r^2}
            + \frac{r^2}{t_1 t_2 \sqrt{1 - r^2}}\right).

    Derivation (ours): write ``Phi(u) = P(g <= u)`` with an independent standard normal ``g``, project
    ``u, u'`` onto ``(u - g, u' - g')`` and use the orthant moments of that pair. Since
    ``|r| <= \sqrt{ab / ((1 + a)(1 + b))} < 1``, nothing is singular: gradients are finite for
    identical and all-zero images, and the self value is the same formula at ``c = a = b``.
    Limits: ``v / 4`` for small variances, the ReLU's ``v / 2`` for large ones.
    """

    #: nodes per axis of the Gauss-Hermite rule of the NTK factor E[phi'(u) phi'(u')] (no closed form here)
    ntk_quadrature_degree = 64

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        return self.pair_map(v, s, s, False)

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        a, b = s1 * s1, s2 * s2
        t1, t2 = torch.sqrt(1.0 + a), torch.sqrt(1.0 + b)
        r = (c / t1 / t2).clamp(-1.0, 1.0)
        # 1 - r^2 >= (1 + a + b) / ((1 + a)(1 + b)) > 0; the floor only guards underflow at huge variances
        q = torch.sqrt((1.0 - r * r).clamp_min(torch.finfo(c.dtype).tiny))
        linear = c * (0.25 + torch.asin(r) * _INV_2PI)
        return linear + ((a / t1) * (b / t2) * q + r * r / (q * t1 * t2)) * _INV_2PI

    # E[phi'(u) phi'(u')] by quadrature (no closed form here): GELU as an Elementwise layer of its own
    def self_derivative_map(self, v: Tensor, s: Tensor) -> Tensor:
        return _quadrature_layer().expectation(v, s, s, 1)

    def pair_derivative_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        return _quadrature_layer().expectation(c, s1, s2, 1)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return nn.GELU(), incoming
