"""Backends: the ways to run the pair pass of a tile, and the one policy that chooses between them.

==============  ===============================================================================
``"eager"``     plain torch (:mod:`.eager`): every network, device and dtype; gradients
``"inductor"``  ``torch.compile`` (:mod:`.inductor`): fused loops, compiled once per shape
``"native"``    the native CPU kernel (:mod:`.native`): networks of Conv2d, Dense, (Leaky)ReLU, Sum,
                Sequential, AvgPool2d and GlobalAvgPool2d in float32/float64 on a CPU
``"auto"``      :func:`choose` decides per call (see there)
==============  ===============================================================================

Every caller (:func:`gpytorch_cnngp.gram`, :class:`gpytorch_cnngp.CNNGPKernel`, the Dask blocks and the
``cnngp`` command) passes its ``backend`` argument to :func:`choose`; nothing else decides. :func:`self_values`
decides where the images' own values come from (the diagonal of ``K(X, X)`` and :func:`gpytorch_cnngp.gram_diag`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import settings
from ..layers.base import Layer
from ..state import Requirements
from .base import Backend, BlockFn, VjpFn
from .eager import Eager
from .inductor import Inductor
from .native import Native

__all__ = [
    "BACKENDS",
    "Backend",
    "BlockFn",
    "VjpFn",
    "Eager",
    "Inductor",
    "Native",
    "choose",
    "resolve",
    "native_ready",
    "self_values",
]

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (Eager, Inductor, Native)}
"""The backends by name."""

_NAMES = ("auto", *BACKENDS)


def resolve(backend: str | None) -> str:
    """The requested backend name, checked: ``"auto"`` (also for ``None``), ``"eager"``, ``"inductor"`` or
    ``"native"``."""
    name = "auto" if backend is None else backend
    if name not in _NAMES:
        raise ValueError(f"backend must be one of {', '.join(repr(n) for n in _NAMES)}, got {backend!r}")
    return name


def choose(
    requested: str,
    model: Layer,
    size: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    n_pairs: int,
    grad: bool = False,
    requirements: Requirements | None = None,
    ntk: bool = False,
    input_grad: bool = False,
) -> type[Backend]:
    """The backend that runs a call: the one policy of the package.

    * gradients with respect to the images run eagerly, whatever was requested;
    * gradients with respect to the hyperparameters (``grad``) run on the requested or chosen backend where
      it differentiates (eager, and the native kernel for the NNGP), else eagerly;
    * an explicit ``"eager"``, ``"inductor"`` or ``"native"`` is used, or raises a ValueError that says
      why it cannot run this network here (naming the layer);
    * ``"auto"`` follows :class:`gpytorch_cnngp.settings.compile_mode`: ``"off"`` eager; ``"on"`` native
      where it runs, else inductor where it runs, else eager; ``"auto"`` (default) native from
      ``settings.auto_native_pairs`` pairs on where it runs, else inductor from ``settings.auto_compile_pairs``
      pairs on for same-location networks it can compile (full spatial maps run about twice as fast
      eagerly), else eager.

    :param requested: a name from :func:`resolve`.
    :param n_pairs: kernel entries the call computes.
    :param grad: the call is differentiated with respect to the hyperparameters.
    :param ntk: the call computes the neural tangent kernel.
    :param input_grad: the call is differentiated with respect to the images.
    """
    if requested not in _NAMES:
        raise ValueError(f"backend must be one of {', '.join(repr(n) for n in _NAMES)}, got {requested!r}")
    if input_grad:
        return Eager
    device = torch.device(device)
    if requested in BACKENDS:
        cls = BACKENDS[requested]
        if grad:
            return cls if cls.unsupported(model, size, dtype, device, ntk, grad=True) is None else Eager
        reason = cls.unsupported(model, size, dtype, device, ntk)
        if reason is not None:
            raise ValueError(f"backend={requested!r} cannot run this network here: {reason}; use backend='auto'")
        return cls
    mode = settings.compile_mode.value()
    if mode == "off":
        return Eager
    native_wanted = mode == "on" or n_pairs >= settings.auto_native_pairs.value()
    if native_wanted and Native.unsupported(model, size, dtype, device, ntk, grad) is None:
        return Native
    compilable = Inductor.unsupported(model, size, dtype, device, ntk, grad) is None
    if mode == "on":
        return Inductor if compilable else Eager
    full = (requirements or Requirements(model)).full
    return Inductor if compilable and n_pairs >= settings.auto_compile_pairs.value() and not full else Eager


def self_values(
    model: Layer,
    size: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    hyper,
    requirements: Requirements,
    ntk: bool = False,
) -> Callable[[Tensor], Tensor] | None:
    """Where the images' own values ``k(x, x)`` come from, for the diagonal of a square ``K(X, X)`` and for
    :func:`gpytorch_cnngp.gram_diag` alike (so that the two agree to the bit, whichever backend runs the pairs):
    the native kernel's self pass (:meth:`Native.self_values`) where it runs the network and
    ``settings.compile_mode`` is not ``"off"``, else ``None``: the eager self pass. Their gradients always go
    through the eager self pass (differentiable), as do the values where the images are differentiated."""
    if settings.compile_mode.value() == "off":
        return None
    if Native.unsupported(model, size, dtype, device, ntk) is not None:
        return None
    return Native.self_values(model, size, hyper, requirements, ntk)


def native_ready(
    model: Layer, image_size: tuple[int, int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> bool:
    """Whether ``backend="native"`` can run ``model`` here: a CPU float32/float64 network that
    :mod:`gpytorch_cnngp.backends.native` supports, the kernel not switched off (``CNNGP_NATIVE=0``), built
    (or found in the cache) and past its self-test. This call does that build, so it can take a few
    seconds the first time on a machine."""
    return Native.unsupported(model, tuple(image_size), dtype, torch.device(device)) is None
