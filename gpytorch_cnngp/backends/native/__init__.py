"""The native CPU backend: a layer tree lowered to a few map instructions, run by a small C++ kernel.

``torch.compile`` fuses each layer into loops over the whole tile, so every layer streams the tile's
maps through memory and the threads meet at a barrier after each loop. The pair pass of a
same-location network has a simpler shape that those loops cannot exploit: every pair is
independent, and one pair's maps are a few kilobytes. This package lowers such a network
(:class:`~gpytorch_cnngp.Conv2d`, :class:`~gpytorch_cnngp.Dense`, :class:`~gpytorch_cnngp.ReLU`,
:class:`~gpytorch_cnngp.LeakyReLU`, :class:`~gpytorch_cnngp.Sum`, :class:`~gpytorch_cnngp.Sequential`, and the
pools :class:`~gpytorch_cnngp.AvgPool2d` and :class:`~gpytorch_cnngp.GlobalAvgPool2d` outside ``Sum`` branches)
to instructions on map registers, which ``native_kernel.cpp`` runs for a block of 16 (float32) or 8 (float64)
pairs at a time, one SIMD lane per pair. Its modules, one job each, import one way (each only those above it):

* :mod:`~gpytorch_cnngp.backends.native.lowering`: a layer tree to a :class:`NativeProgram`;
* :mod:`~gpytorch_cnngp.backends.native.run`: a program run in the loaded kernel (packing the images and traces,
  the pair pass, its reverse mode, the self pass);
* :mod:`~gpytorch_cnngp.backends.native.build`: compiling, caching and loading the kernel, with its self-test;
* this module: the :class:`Native` backend the engine calls, and the public names of the three above.

``CNNGP_NATIVE=0`` turns the path off; if the compiler is missing or fails, ``backend="auto"`` warns once and
uses another backend, and ``backend="native"`` is an error. Layer math knows nothing of this package.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..base import Backend, BlockFn, SelfFn, SelfTerms, VjpFn
from . import build
from .build import load_library, native_enabled
from .lowering import NativeProgram, _memoised, lower, unsupported
from .run import LANES, _NativeTerms, run_block, run_block_vjp, self_terms

__all__ = [
    "Native",
    "NativeProgram",
    "lower",
    "unsupported",
    "native_enabled",
    "load_library",
    "run_block",
    "run_block_vjp",
    "LANES",
]


class Native(Backend):
    """The native CPU kernel: networks of ``Conv2d``, ``Dense``, ``ReLU``, ``LeakyReLU``, ``Sum``, ``Sequential``,
    ``AvgPool2d`` and ``GlobalAvgPool2d`` (pools outside ``Sum`` branches) in float32/float64 on a CPU, the NNGP and
    the NTK, and the NNGP's gradients with respect to the hyperparameters (reverse mode per block of pairs); the
    fastest backend on a CPU."""

    name = "native"
    # about one map per pair: the repacked traces of a tile's rows and columns
    workspace_factor = 1
    # a pair's maps stay in per-thread registers, so a tile costs only its slices of the inputs and traces;
    # larger tiles amortise that repacking
    cpu_tile = 256

    @classmethod
    def pair_area(cls, info) -> int:
        # per pair only the repacked traces: the spatial offsets' maps live in each thread's registers
        return info.local_largest or info.largest

    @classmethod
    def unsupported(cls, model, size, dtype, device, ntk=False, grad=False) -> str | None:
        if grad and ntk:
            return "its gradients cover the NNGP, not the NTK"
        if torch.device(device).type != "cpu":
            return f"it runs on CPUs only, not {device}"
        if dtype not in LANES:
            return f"it computes in float32 or float64, not {dtype}"
        if not native_enabled():
            return "it is switched off (settings.native(False) or CNNGP_NATIVE=0)"
        reason = unsupported(model, size)
        if reason is not None:
            return f"the network has {reason}"
        if load_library() is None:  # it records why in its own module, read there (a copy here would stay None)
            return f"the kernel could not be built on this machine ({build._LIB_ERROR})"
        return None

    @classmethod
    def self_fn(cls, model, size, hyper, requirements, ntk=False) -> SelfFn | None:
        lib = load_library()
        program = _memoised(model, size, requirements, fuse=not ntk)
        threads = torch.get_num_threads()

        def own(x: Tensor, both: bool) -> SelfTerms:
            params = program.parameter_vector(hyper, x.dtype)

            def compute(images: Tensor, left: bool, right: bool):
                return self_terms(lib, program, params, images, threads, left, right, ntk)

            return _NativeTerms(compute, x, both)

        return own

    @classmethod
    def self_values(cls, model, size, hyper, requirements, ntk=False) -> Callable[[Tensor], Tensor]:
        """``own(x)``: ``k(x, x)`` ``[n]`` (``[2, n]`` with ``ntk``) of images ``x`` ``[H, W, C, n]`` by the kernel's
        self pass, each image alone (the same bits in any batch)."""
        lib = load_library()
        program = _memoised(model, size, requirements, fuse=not ntk)
        threads = torch.get_num_threads()

        def own(x: Tensor) -> Tensor:
            params = program.parameter_vector(hyper, x.dtype)
            return self_terms(lib, program, params, x, threads, False, False, ntk, final=True)[2]

        return own

    @classmethod
    def block_fn(cls, model, size, hyper, requirements, tile, ntk=False) -> BlockFn:
        lib = load_library()
        program = _memoised(model, size, requirements, fuse=not ntk)
        threads = torch.get_num_threads()

        def block(x, z, trace_x, trace_z, same):
            # like the compiled backend, the same-image rule is left to the engine's diagonal fix; a square tile of
            # the same images computes its upper triangle only; the parameter vector is made once per call (the
            # program keeps it for this Hyper)
            params = program.parameter_vector(hyper, x.dtype)
            return run_block(lib, program, params, x, z, trace_x, trace_z, threads, ntk, same)

        return block

    @classmethod
    def block_vjp(cls, model, size, hyper, requirements, ntk=False) -> VjpFn:
        if ntk:  # pragma: no cover - choose() never picks this backend for the NTK's gradients
            raise ValueError("the native kernel's gradients cover the NNGP only")
        lib = load_library()
        program = _memoised(model, size, requirements, reuse=False)
        detached = hyper.with_values(v.detach() for v in hyper.values)
        threads = torch.get_num_threads()

        def vjp(x, z, trace_x, trace_z, same, grad):
            # the engine zeroes the gradient of a square block's diagonal (it comes from the self values), so
            # the same-image rule needs no adjoint here
            params = program.parameter_vector(detached, x.dtype)
            tx = [t.detach() for t in trace_x]
            tz = [t.detach() for t in trace_z]
            g_params, g_tx, g_tz = run_block_vjp(
                lib, program, params, x.detach(), z.detach(), tx, tz, grad, threads, same
            )
            return program.hyper_gradients(detached, g_params), g_tx, g_tz

        return vjp
