"""The straightforward CNN-GP kernel, computed the way the paper's code does it.

Every layer runs as a one-channel ``conv2d`` with a full ``k x k`` window over the covariance maps
of all image pairs, and the ReLU step is a chain of separate (unfused) elementwise operations on
``v1 * v2``. Used as the speed baseline in ``bench_kernels.py`` and as an exactness reference for the
fast engine (it shares no code with ``gpytorch_cnngp.ops``/``engine``; it only reads the layer tree).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gpytorch_cnngp.layers import Conv2d, ReLU, Sequential, Sum


def _conv(layer: Conv2d, m: Tensor) -> Tensor:
    """Apply ``layer`` to maps ``m`` of shape [B, H, W] as a one-channel convolution."""
    k = layer.kernel_size
    weight = torch.full((1, 1, k, k), 1.0 / (k * k), dtype=m.dtype, device=m.device)
    win = layer.window
    x = F.pad(m.unsqueeze(1), (win.pad_before, win.pad_after, win.pad_before, win.pad_after))
    out = F.conv2d(x, weight, stride=layer.stride, dilation=layer.dilation)
    return (float(layer.var_weight) * out + float(layer.var_bias)).squeeze(1)


def _relu(xz: Tensor, xx: Tensor, zz: Tensor) -> Tensor:
    prod = xx * zz
    cos = (xz / prod.sqrt()).clamp(-1, 1)
    theta = torch.acos(cos)
    return (torch.sqrt(prod - xz * xz).nan_to_num(0.0) + (math.pi - theta) * xz) / (2 * math.pi)


def _propagate(layer, xz: Tensor, xx: Tensor, zz: Tensor, n1: int, n2: int, same: bool):
    """State: xz [n1*n2, H, W], xx [n1, H, W], zz [n2, H, W]."""
    if isinstance(layer, Sequential):
        for child in layer.layers:
            xz, xx, zz = _propagate(child, xz, xx, zz, n1, n2, same)
        return xz, xx, zz
    if isinstance(layer, Sum):
        outs = [_propagate(b, xz, xx, zz, n1, n2, same) for b in layer.branches]
        return tuple(sum(parts[1:], parts[0]) for parts in zip(*outs, strict=True))
    if isinstance(layer, Conv2d):
        return _conv(layer, xz), _conv(layer, xx), _conv(layer, zz)
    if isinstance(layer, ReLU):
        h, w = xx.shape[-2:]
        xx_b = xx[:, None].expand(n1, n2, h, w).reshape(n1 * n2, h, w)
        zz_b = zz[None, :].expand(n1, n2, h, w).reshape(n1 * n2, h, w)
        out = _relu(xz, xx_b, zz_b)
        if same:
            out.view(n1, n2, h, w).diagonal(0, 0, 1).copy_((xx / 2).movedim(0, -1))
        return out, xx / 2, zz / 2
    raise TypeError(f"naive baseline does not know {type(layer).__name__}")


def _self(layer, v: Tensor) -> Tensor:
    """Variance maps [N, H, W] of single images."""
    if isinstance(layer, Sequential):
        for child in layer.layers:
            v = _self(child, v)
        return v
    if isinstance(layer, Sum):
        return sum((_self(b, v) for b in layer.branches[1:]), _self(layer.branches[0], v))
    if isinstance(layer, Conv2d):
        return _conv(layer, v)
    if isinstance(layer, ReLU):
        return v / 2
    raise TypeError(f"naive baseline does not know {type(layer).__name__}")


def naive_kernel(model, x: Tensor, z: Tensor | None = None, batch_pairs: int = 4096) -> Tensor:
    """K(x, z) (``z=None``: K(x, x) with the exact diagonal), processed in batches of pairs."""
    same = z is None
    z = x if same else z
    n1, n2 = x.shape[0], z.shape[0]
    out = torch.empty(n1, n2, dtype=x.dtype, device=x.device)
    rows = max(1, batch_pairs // n2)
    zz = (z * z).mean(1)
    for i0 in range(0, n1, rows):
        xi = x[i0 : i0 + rows]
        m = xi.shape[0]
        xz = (xi[:, None] * z[None, :]).mean(2).reshape(m * n2, *x.shape[2:])
        res, _, _ = _propagate(model, xz, (xi * xi).mean(1), zz, m, n2, same and m == n1)
        out[i0 : i0 + m] = res.reshape(m, n2)
    if same:
        out.diagonal().copy_(_self(model, (x * x).mean(1)).reshape(n1))
    return out
