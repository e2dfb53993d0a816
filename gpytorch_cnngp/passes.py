"""The pure passes over a layer tree: images in, kernel values out, no tiles, budgets or backends.

* :func:`self_pass`: each image's own variances through the network; records the standard deviations
  every nonlinearity sees (the *trace*) and gives ``k(x, x)``;
* :func:`pair_block`: the kernel between two sets of images ``[n1, n2]``, given their traces;
* :func:`paired`: ``k(x_i, z_i)`` for matched images.

Images are in the passes' layout ``[H, W, C, N]`` (:func:`spatial_first`). The engine
(:mod:`gpytorch_cnngp.engine`) tiles these calls; the backends (:mod:`gpytorch_cnngp.backends`) run
:func:`pair_block` eagerly, compiled, or lowered to the native kernel, which checks itself against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import FULL, SAME_LOCATION, layout_of
from .ops import Offsets
from .state import CovState, Hyper, Pass, Requirements, SpatialPlan
from .state import KernelLayer as Layer

__all__ = ["spatial_first", "self_pass", "pair_block", "paired", "input_matched", "input_pair"]


def spatial_first(x: Tensor) -> Tensor:
    """Images ``[N, C, H, W]`` in the passes' layout ``[H, W, C, N]`` (images innermost)."""
    return x.permute(2, 3, 1, 0).contiguous()


def _channel_mean(total: Tensor, channels: int) -> Tensor:
    return total if channels == 1 else total.div_(channels)  # einsum's fresh output: safe in place


def input_matched(x: Tensor, z: Tensor, full: bool = False) -> Tensor:
    """Channel mean of ``x_c[p] z_c[p]`` for matched images: ``[H, W, N]``; ``full``: of ``x_c[p] z_c[q]``,
    ``[H, W, H, W, N]``."""
    if full:
        return _channel_mean(torch.einsum("hwcn,HWcn->hwHWn", x, z), x.shape[2])
    return (x * z).mean(2)


def input_pair(x: Tensor, z: Tensor, full: bool = False) -> Tensor:
    """Channel mean of ``x_c[p] z_c[p]`` for every pair: ``[H, W, n1, n2]``; ``full``: ``[H, W, H, W, n1, n2]``."""
    if full:
        return _channel_mean(torch.einsum("hwca,HWcb->hwHWab", x, z), x.shape[2])
    if x.shape[2] == 1:
        return x[:, :, 0, :, None] * z[:, :, 0, None, :]
    return torch.matmul(x.transpose(2, 3), z) / x.shape[2]


def input_offsets(x: Tensor, z: Tensor, offsets: Offsets, pairs: bool) -> Tensor:
    """Channel mean of ``x_c[p] z_c[p + d]`` at each offset ``d``: ``[H, W, O, N]`` for matched images,
    ``[H, W, O, n1, n2]`` for every pair (``pairs``); 0 where ``p + d`` lies outside the image."""
    zs = offsets.shifted(z)  # [H, W, O, C, n]
    if pairs:
        return _channel_mean(torch.einsum("hwca,hwocb->hwoab", x, zs), x.shape[2])
    return (x[:, :, None] * zs).mean(3)


def _requirements(model: Layer, requirements: Requirements | None) -> Requirements:
    return requirements if requirements is not None else Requirements(model)


def _plan(model: Layer, req: Requirements, x: Tensor, compiled: bool = False) -> SpatialPlan | None:
    # compiled code keeps the full maps: the offset layout's index tensors are made outside the graph
    return None if compiled else req.plan(model, (x.shape[0], x.shape[1]))


def _start(m: Tensor, run: Pass, ntk: bool) -> CovState:
    # the input layer has no parameters: its tangent kernel is zero
    if run.plan is not None:
        layout = layout_of(run.plan.input)
    else:
        layout = FULL if run.requirements.full else SAME_LOCATION
    return CovState(m, run, ntk=torch.zeros_like(m) if ntk else None, layout=layout)


def _input(x: Tensor, z: Tensor, req: Requirements, plan: SpatialPlan | None, pairs: bool) -> Tensor:
    if plan is not None and plan.input is not None:
        return input_offsets(x, z, plan.input, pairs)
    full = req.full and plan is None  # a plan that needs no offset at the input starts from the same-location map
    return input_pair(x, z, full) if pairs else input_matched(x, z, full)


def _result(out: CovState, *shape: int) -> Tensor:
    """The final maps as ``[*shape]``, or ``[2, *shape]`` (NNGP, NTK) when the pass carried the NTK."""
    if out.ntk is None:
        return out.nngp.reshape(shape)
    return torch.stack([out.nngp.reshape(shape), out.ntk.reshape(shape)])


def self_pass(
    model: Layer,
    x: Tensor,
    hyper: Hyper,
    window_method: str = "matmul",
    requirements: Requirements | None = None,
    ntk: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """Variances of single images ``x`` ``[H, W, C, N]`` through ``model``.

    :param ntk: also carry the neural tangent kernel.
    :return: the recorded trace (one ``[h, w, N]`` standard-deviation map per nonlinearity) and
        ``k(x, x)`` of shape ``[N]`` (``[2, N]``: NNGP and NTK, with ``ntk``).
    """
    req = _requirements(model, requirements)
    plan = _plan(model, req, x)
    run = Pass(mode="self", hyper=hyper, requirements=req, window_method=window_method, plan=plan)
    out = model.propagate(_start(_input(x, x, req, plan, False), run, ntk))
    return run.trace, _result(out, x.shape[-1])


def pair_block(
    model: Layer,
    x: Tensor,
    z: Tensor,
    trace_x: list[Tensor],
    trace_z: list[Tensor],
    hyper: Hyper,
    same: bool = False,
    compiled: bool = False,
    window_method: str = "matmul",
    requirements: Requirements | None = None,
    ntk: bool = False,
) -> Tensor:
    """Kernel block ``[n1, n2]`` (``[2, n1, n2]``: NNGP and NTK, with ``ntk``) between images ``x``
    ``[H, W, C, n1]`` and ``z`` ``[H, W, C, n2]`` given their sliced self traces (``[h, w, n1]`` and
    ``[h, w, n2]`` per nonlinearity; a :class:`~gpytorch_cnngp.backends.base.TraceSlices` carries a memo of what the
    layers derive from them, kept by the engine across tiles).

    :param same: ``x`` and ``z`` are the same images (a square block on the diagonal of ``K(X, X)``):
        each image's entry with itself is set exactly to its self value after every nonlinearity.
    :param compiled: the call is traced by ``torch.compile`` (see :class:`~gpytorch_cnngp.state.Pass`).
    """
    req = _requirements(model, requirements)
    run = Pass(
        mode="pair",
        hyper=hyper,
        requirements=req,
        trace_x=trace_x,
        trace_z=trace_z,
        same=same,
        compiled=compiled,
        window_method=window_method,
        pair_ndim=2,
        plan=_plan(model, req, x, compiled),
        memo_x=getattr(trace_x, "memo", None),
        memo_z=getattr(trace_z, "memo", None),
    )
    out = model.propagate(_start(_input(x, z, req, run.plan, True), run, ntk))
    return _result(out, x.shape[-1], z.shape[-1])


def paired(
    model: Layer,
    x: Tensor,
    z: Tensor,
    trace_x: list[Tensor],
    trace_z: list[Tensor],
    hyper: Hyper,
    window_method: str = "matmul",
    requirements: Requirements | None = None,
    ntk: bool = False,
) -> Tensor:
    """``k(x_i, z_i)`` for matched images ``[H, W, C, N]`` on both sides, given their traces (``[N]``, or
    ``[2, N]`` with ``ntk``)."""
    req = _requirements(model, requirements)
    plan = _plan(model, req, x)
    run = Pass(
        mode="pair",
        hyper=hyper,
        requirements=req,
        trace_x=trace_x,
        trace_z=trace_z,
        window_method=window_method,
        plan=plan,
    )
    out = model.propagate(_start(_input(x, z, req, plan, False), run, ntk))
    return _result(out, x.shape[-1])
