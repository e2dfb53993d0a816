"""Pointwise nonlinearities: the Gaussian expectation of the product of two activations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import relu_derivative_expectation, relu_expectation, relu_expectation_forward
from .base import FiniteBuild, Nonlinearity

__all__ = ["Nonlinearity", "ReLU"]  # Nonlinearity lives in .base; kept importable from here


class ReLU(Nonlinearity):
    r"""Rectified linear unit. With ``theta = arccos(c / sqrt(v_1 v_2))``:

    .. math::
        c' = \frac{\sqrt{v_1 v_2 - c^2} + (\pi - \theta)\, c}{2\pi}, \qquad v' = v / 2,

    which is exactly :math:`E[\mathrm{relu}(u)\,\mathrm{relu}(u')]` for centred Gaussians (no
    factor 2); the neural tangent kernel is multiplied by :math:`E[\mathrm{relu}'(u)\,\mathrm{relu}'(u')]
    = (\pi - \theta) / (2\pi)` (0 where a variance is 0: :math:`\mathrm{relu}'(0) = 0`). Computed through
    standard deviations so that nothing overflows, with gradients that stay finite for identical images
    and zero variances. Compiled code evaluates the same value without arccos, as
    :math:`\max(c, 0)/2 + \sqrt{v_1 v_2}\,(1 - a)^{3/2} R(a) / (2\pi)` with
    :math:`a = |c| / \sqrt{v_1 v_2}` and a fitted polynomial :math:`R`
    (:func:`gpytorch_cnngp.ops.relu_expectation_poly`).
    """

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        return v * 0.5

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        if torch.is_grad_enabled() and (c.requires_grad or s1.requires_grad or s2.requires_grad):
            return relu_expectation(c, s1, s2)
        return relu_expectation_forward(c, s1, s2, compiled)

    def self_derivative_map(self, v: Tensor, s: Tensor) -> Tensor:
        return (s > 0).to(s.dtype) * 0.5  # relu'(0) = 0

    def pair_derivative_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        return relu_derivative_expectation(c, s1, s2)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return nn.ReLU(), incoming
