"""The eager backend: the pair pass as plain torch operations, differentiable, on any device."""

from __future__ import annotations

from ..passes import pair_block
from .base import Backend, BlockFn

__all__ = ["Eager"]


class Eager(Backend):
    """Plain torch: every network, every device, gradients (the reference the other backends match)."""

    name = "eager"
    workspace_factor = 8
    # small tiles keep a pair block's maps in cache on a CPU
    cpu_tile = 32

    @classmethod
    def block_fn(cls, model, size, hyper, requirements, tile, ntk=False) -> BlockFn:
        def block(x, z, trace_x, trace_z, same):
            return pair_block(model, x, z, trace_x, trace_z, hyper, same, False, "matmul", requirements, ntk)

        return block
