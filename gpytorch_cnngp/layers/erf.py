"""The error function nonlinearity (a smooth, bounded sigmoid)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import FiniteBuild, Nonlinearity

__all__ = ["Erf"]


class _ErfModule(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


class Erf(Nonlinearity):
    r"""``phi(u) = erf(u)``. For centred Gaussians with variances ``v_1, v_2`` and covariance ``c``:

    .. math::
        E[\mathrm{erf}(u)\,\mathrm{erf}(u')] = \frac{2}{\pi}
            \arcsin\frac{2c}{\sqrt{1 + 2 v_1}\,\sqrt{1 + 2 v_2}}, \qquad
        E[\mathrm{erf}(u)^2] = \frac{2}{\pi} \arcsin\frac{2v}{1 + 2v}, \qquad
        E[\mathrm{erf}'(u)\,\mathrm{erf}'(u')] = \frac{4}{\pi \sqrt{(1 + 2 v_1)(1 + 2 v_2) - 4 c^2}}
        \ \text{(the NTK's factor)}.

    The arcsine's argument is below 1 in magnitude for finite variances, so gradients are finite for
    identical and all-zero images; the two square roots are taken separately so that nothing
    overflows for huge variances. Outputs are bounded by 1 whatever the input scale.
    """

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        return torch.asin(2.0 * v / (1.0 + 2.0 * v)) * (2.0 / math.pi)

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        a1 = torch.sqrt(1.0 + 2.0 * s1 * s1)
        a2 = torch.sqrt(1.0 + 2.0 * s2 * s2)
        # |2c| <= 2 s1 s2 < a1 a2 exactly; the clamp only removes rounding overshoot at huge variances
        return torch.asin((2.0 * c / a1 / a2).clamp(-1.0, 1.0)) * (2.0 / math.pi)

    # erf'(u) = 2 exp(-u^2) / sqrt(pi), and E[exp(-u^2 - u'^2)] = det(I + 2 Sigma)^(-1/2)

    def self_derivative_map(self, v: Tensor, s: Tensor) -> Tensor:
        return torch.rsqrt(1.0 + 4.0 * v) * (4.0 / math.pi)

    def pair_derivative_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        a1 = torch.sqrt(1.0 + 2.0 * s1 * s1)
        a2 = torch.sqrt(1.0 + 2.0 * s2 * s2)
        r = (2.0 * c / a1 / a2).clamp(-1.0, 1.0)  # |r| < 1 for finite variances
        return torch.rsqrt((1.0 - r * r).clamp_min(torch.finfo(c.dtype).tiny)) / (a1 * a2) * (4.0 / math.pi)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return _ErfModule(), incoming
