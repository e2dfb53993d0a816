"""The Gaussian error linear unit, ``u * Phi(u)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import FiniteBuild, Nonlinearity

__all__ = ["GELU"]


_INV_2PI = 0.5 / math.pi


def _geometry(c: Tensor, a: Tensor, b: Tensor, gap: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``r = c / (t_1 t_2)``, ``q = sqrt(1 - r^2)``, ``i_k = 1 / (1 + v_k)``, ``t_1``, ``t_2`` from the variances and
    ``gap = (ab - c^2) / ((1 + a)(1 + b)) >= 0``.

    ``1 - r^2`` is not taken as written: at variances where ``r`` rounds to 1 that is 0 and the formulas blow
    up. ``(1 + a)(1 + b)(1 - r^2) = 1 + a + b + (ab - c^2)`` gives ``1 - r^2 = i_1 + i_2 - i_1 i_2 + gap``, a sum
    of non-negative terms that stays accurate (and at least ``1 / (1 + max(a, b))``) at any scale.
    """
    t1, t2 = torch.sqrt(1.0 + a), torch.sqrt(1.0 + b)
    i1, i2 = 1.0 / (1.0 + a), 1.0 / (1.0 + b)
    r = c / t1 / t2
    q = torch.sqrt(i1 + i2 - i1 * i2 + gap)
    return r, q, i1, i2, t1, t2


def _pair_gap(c: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """``(ab - c^2) / ((1 + a)(1 + b))`` as ``(s_1 s_2 - c)(s_1 s_2 + c)``, each factor scaled first (no overflow);
    rounding can make it slightly negative where ``|c| = s_1 s_2``, never truly, so it is floored at 0."""
    p = s1 * s2
    t = torch.sqrt(1.0 + s1 * s1) * torch.sqrt(1.0 + s2 * s2)
    return ((p - c) / t * ((p + c) / t)).clamp_min(0.0)


def _nngp(c: Tensor, a: Tensor, b: Tensor, gap: Tensor) -> Tensor:
    r, q, i1, i2, t1, t2 = _geometry(c, a, b, gap)
    # atan2(r, q) is arcsin r with a finite slope even where r rounds to 1
    linear = c * (0.25 + torch.atan2(r, q) * _INV_2PI)
    return linear + ((a / t1) * (b / t2) * q + r * r / (q * t1 * t2)) * _INV_2PI


def _derivative(c: Tensor, a: Tensor, b: Tensor, gap: Tensor) -> Tensor:
    r, q, i1, i2, _, _ = _geometry(c, a, b, gap)
    return 0.25 + (torch.atan2(r, q) + r / q * (i1 + i2 + i1 * i2 / (q * q))) * _INV_2PI


class GELU(Nonlinearity):
    r"""``phi(u) = u Phi(u)`` (the exact GELU, ``torch.nn.GELU()``). With ``a, b`` the variances, ``c`` the
    covariance, ``t_1 = \sqrt{1 + a}``, ``t_2 = \sqrt{1 + b}``, ``r = c / (t_1 t_2)`` and
    ``D = (1 + a)(1 + b) - c^2 = t_1^2 t_2^2 (1 - r^2)``:

    .. math::
        E[\phi(u)\,\phi(u')] &= c\left(\frac14 + \frac{\arcsin r}{2\pi}\right)
            + \frac{1}{2\pi}\left(\frac{a}{t_1}\frac{b}{t_2}\sqrt{1 - r^2}
            + \frac{r^2}{t_1 t_2 \sqrt{1 - r^2}}\right), \\
        E[\phi'(u)\,\phi'(u')] &= \frac14 + \frac{\arcsin r}{2\pi}
            + \frac{c}{2\pi\sqrt D}\left(\frac{1}{1 + a} + \frac{1}{1 + b} + \frac1D\right)
            \ \text{(the NTK's factor)}.

    Derivation (ours). NNGP: write ``Phi(u) = P(g <= u)`` with an independent standard normal ``g``, project
    ``u, u'`` onto ``(u - g, u' - g')`` and use the orthant moments of that pair. NTK factor, with
    ``phi'(x) = Phi(x) + x \varphi(x)`` (``\varphi`` the standard normal density), term by term:

    * ``E[Phi(u) Phi(u')] = P(u - g >= 0, u' - g' >= 0)``, an orthant probability of a pair with variances
      ``1 + a, 1 + b`` and covariance ``c``: ``1/4 + arcsin(r) / (2 pi)``.
    * ``E[\varphi(u) \varphi(u')] = E[e^{-(u^2 + u'^2)/2}] / (2 pi) = 1 / (2 pi \sqrt{\det(I + \Sigma)})
      = 1 / (2 pi \sqrt D)``.
    * ``E[Phi(u) u' \varphi(u')]``: Gaussian integration by parts, ``E[u' h] = c E[\partial_u h]
      + b E[\partial_{u'} h]``, with ``h = Phi(u) \varphi(u')`` and ``\varphi'(x) = -x \varphi(x)``, gives
      ``T = c E[\varphi(u) \varphi(u')] - b T``, so ``T = c / ((1 + b) 2 pi \sqrt D)``; the mirror term has
      ``1 + a``.
    * ``E[u \varphi(u) u' \varphi(u')]``: the weight ``e^{-|x|^2/2}`` turns ``N(0, \Sigma)`` into
      ``N(0, \Sigma (I + \Sigma)^{-1})`` times ``\det(I + \Sigma)^{-1/2}``; the new covariance is ``c / D``, so
      the term is ``c / (2 pi D^{3/2})``.

    Nothing is singular: ``|c| <= \sqrt{ab}`` gives ``D >= 1 + a + b``, so values and gradients are finite for
    identical and all-zero images, and the self values are the same formulas at ``c = a = b``. Special values:
    ``E[phi'(u)^2] = 1/4`` at ``v = 0`` (``phi'(0) = 1/2``), the ReLU's ``1/2`` for large variances; the NNGP
    tends to ``v / 4`` for small variances and the ReLU's ``v / 2`` for large ones. ``1 - r^2`` is computed from
    ``D`` (see ``_geometry``), not from a rounded ``r``, so huge variances stay exact too.
    """

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        return _nngp(v, v, v, torch.zeros_like(v))

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        return _nngp(c, s1 * s1, s2 * s2, _pair_gap(c, s1, s2))

    def self_derivative_map(self, v: Tensor, s: Tensor) -> Tensor:
        return _derivative(v, v, v, torch.zeros_like(v))

    def pair_derivative_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        return _derivative(c, s1 * s1, s2 * s2, _pair_gap(c, s1, s2))

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return nn.GELU(), incoming
