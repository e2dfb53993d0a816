"""The eager backend: the pair pass as plain torch operations, differentiable, on any device."""

from __future__ import annotations

import torch

from ..passes import pair_block
from .base import Backend, BlockFn, VjpFn

__all__ = ["Eager"]


class Eager(Backend):
    """Plain torch: every network, every device, gradients (the reference the other backends match)."""

    name = "eager"
    workspace_factor = 8
    # small tiles keep a pair block's maps in cache on a CPU
    cpu_tile = 32
    # autograd keeps each layer's maps of the tile for the backward pass
    grad_workspace_per_layer = 3

    @classmethod
    def unsupported(cls, model, size, dtype, device, ntk=False, grad=False) -> str | None:
        return None

    @classmethod
    def block_fn(cls, model, size, hyper, requirements, tile, ntk=False) -> BlockFn:
        def block(x, z, trace_x, trace_z, same):
            return pair_block(model, x, z, trace_x, trace_z, hyper, same, False, "matmul", requirements, ntk)

        return block

    @classmethod
    def block_vjp(cls, model, size, hyper, requirements, ntk=False) -> VjpFn:
        leaves = list(hyper.values)

        def vjp(x, z, trace_x, trace_z, same, grad):
            tx = [t.detach().requires_grad_(True) for t in trace_x]
            tz = tx if same else [t.detach().requires_grad_(True) for t in trace_z]
            with torch.enable_grad():
                block = pair_block(model, x, z, tx, tz, hyper, same, requirements=requirements, ntk=ntk)
                inputs = leaves + tx + ([] if same else tz)
                grads = torch.autograd.grad(block, inputs, grad, allow_unused=True)
            n, m = len(leaves), len(tx)
            return list(grads[:n]), list(grads[n : n + m]), [None] * m if same else list(grads[n + m :])

        return vjp
