"""The ``torch.compile`` backend: the pair pass fused by TorchInductor (C++/OpenMP loops on CPU, Triton on GPU)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers import Elementwise
from ..passes import pair_block
from .base import Backend, BlockFn

__all__ = ["Inductor"]

_compiled = None


def _compiled_pair_block():
    global _compiled
    if _compiled is None:
        import torch._dynamo

        # One graph per architecture, dtype, device and tile shape: static shapes generate much faster
        # loops than dynamic ones, so edge tiles are padded to the full tile size (see _pad_last).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # Let the C++ compiler fuse multiply-adds (the ReLU's polynomial is mostly those): about 5%
        # faster on CPU and, if anything, more accurate. Only this graph is affected.
        _compiled = torch.compile(
            pair_block, dynamic=False, options={"cpp.enable_floating_point_contract_flag": "fast"}
        )
    return _compiled


def _pad_last(t: Tensor, size: int) -> Tensor:
    """Zero-pad the last dimension to ``size`` (padding images are black: zero variance, zero output)."""
    missing = size - t.shape[-1]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, missing))


class Inductor(Backend):
    """``torch.compile`` of the pair pass: faster than eager after a compilation (seconds to minutes) once
    per architecture, dtype and tile size; forward only."""

    name = "inductor"
    workspace_factor = 6
    cpu_tile = 32

    @classmethod
    def unsupported(cls, model, size, dtype, device, ntk=False, grad=False) -> str | None:
        if grad:
            return "it computes kernels, not their gradients"
        for layer in model.kernel_layers():
            # Elementwise's series is a Python loop over its terms in place, with autograd for the NTK's derivatives
            # inside it: not a graph the compiler takes as it is
            if isinstance(layer, Elementwise):
                return f"Elementwise (its series of {layer.degree} terms runs eagerly, with autograd inside)"
        return None

    @classmethod
    def block_fn(cls, model, size, hyper, requirements, tile, ntk=False) -> BlockFn:
        fn = _compiled_pair_block()

        def block(x, z, trace_x, trace_z, same):
            # one static shape for every tile; the same-image rule inside the network only affects diagonal
            # entries, which the engine replaces by the self values, so it is skipped here
            n1, n2 = x.shape[-1], z.shape[-1]
            out = fn(
                model,
                _pad_last(x, tile),
                _pad_last(z, tile),
                [_pad_last(t, tile) for t in trace_x],
                [_pad_last(t, tile) for t in trace_z],
                hyper,
                False,
                True,
                "slices",
                requirements,
                ntk,
            )
            return out[..., :n1, :n2]

        return block
