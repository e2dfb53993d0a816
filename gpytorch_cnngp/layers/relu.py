"""Pointwise nonlinearities: the Gaussian expectation of the product of two activations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import position_diagonal, relu_expectation, relu_expectation_forward, safe_sqrt, same_location
from .base import Context, FiniteBuild, Layer

__all__ = ["Nonlinearity", "ReLU"]


class Nonlinearity(Layer):
    """A pointwise nonlinearity ``phi``; maps covariances of pre-activations to those of activations.

    Subclasses implement :meth:`self_map` (``v -> E[phi(u)^2]`` for ``u ~ N(0, v)``) and
    :meth:`pair_map` (``E[phi(u) phi(u')]`` from the covariance ``c`` and the standard deviations of
    both sides). This class handles the self trace and the exact diagonal of same-image pairs.
    """

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        raise NotImplementedError

    def propagate(self, m: Tensor, ctx: Context) -> Tensor:
        slot = ctx.next_slot()
        full = ctx.is_full(m)
        if ctx.mode == "self":
            v = same_location(m) if full else m
            s = safe_sqrt(v)
            ctx.trace.append(s)
            if not full:
                return self.self_map(v, s)
            # covariances between the positions of one image; each position with itself is exact
            out = self.pair_map(m, s[:, :, None, None], s[None, None], ctx.compiled)
            position_diagonal(out).copy_(self.self_map(v, s).flatten(0, 1).movedim(0, -1))
            return out
        s1, s2 = ctx.trace_x[slot], ctx.trace_z[slot]
        if full:
            s1, s2 = s1[:, :, None, None], s2[None, None]
        out = self.pair_map(m, s1, s2, ctx.compiled)
        if ctx.same:
            # An image with itself: use the self value instead of J(rho ~ 1), which rounding spoils.
            s = ctx.trace_x[slot].squeeze(-1)  # [H, W, n, 1] -> [H, W, n]
            value = self.self_map(s * s, s)
            if full:  # entries (p, p, a, a): each position of image a with itself, as [n, H * W]
                hw = s.shape[0] * s.shape[1]
                target = out.view(hw, hw, *out.shape[4:]).diagonal(0, -2, -1).diagonal(0, 0, 1)
                target.copy_(value.reshape(hw, -1).t())
            else:
                out.diagonal(0, -2, -1).copy_(value)
        return out


class ReLU(Nonlinearity):
    r"""Rectified linear unit. With ``theta = arccos(c / sqrt(v_1 v_2))``:

    .. math::
        c' = \frac{\sqrt{v_1 v_2 - c^2} + (\pi - \theta)\, c}{2\pi}, \qquad v' = v / 2,

    which is exactly :math:`E[\mathrm{relu}(u)\,\mathrm{relu}(u')]` for centred Gaussians (no
    factor 2). Computed through standard deviations so that nothing overflows, with gradients that
    stay finite for identical images and zero variances. Compiled code evaluates the same value
    without arccos, as :math:`\max(c, 0)/2 + \sqrt{v_1 v_2}\,(1 - a)^{3/2} R(a) / (2\pi)` with
    :math:`a = |c| / \sqrt{v_1 v_2}` and a fitted polynomial :math:`R`
    (:func:`gpytorch_cnngp.ops.relu_expectation_poly`).
    """

    def self_map(self, v: Tensor, s: Tensor) -> Tensor:
        return v * 0.5

    def pair_map(self, c: Tensor, s1: Tensor, s2: Tensor, compiled: bool) -> Tensor:
        if torch.is_grad_enabled() and (c.requires_grad or s1.requires_grad or s2.requires_grad):
            return relu_expectation(c, s1, s2)
        return relu_expectation_forward(c, s1, s2, compiled)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return nn.ReLU(), incoming
