"""Device names as users type them (``"cpu"``, ``"cuda"``, ``"cuda:1"``), checked once for every entry point.

The engine (``gram(..., device=)``), the pipeline (``cnngp kernels --device``) and the classifier
(``--solve-device``) all parse devices here, so that an unknown or unavailable device is one clear
``ValueError`` that says what is available, never a raw PyTorch assertion.
"""

from __future__ import annotations

import torch

__all__ = ["parse_device"]

_SUPPORTED = ("cpu", "cuda")


def parse_device(device: str | torch.device, *, what: str = "device") -> torch.device:
    """The :class:`torch.device` named by ``device``, after checking that this machine has it.

    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device` (``"auto"`` is resolved by
        the callers that accept it).
    :param what: how the error messages name the argument (e.g. ``"--device"``).
    :raises ValueError: for a name PyTorch does not know, a device type this package does not run on, a CUDA
        device on a machine (or PyTorch build) without CUDA, or a GPU index that does not exist.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown {what} {str(device)!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in _SUPPORTED:
        raise ValueError(f"{what} {str(device)!r} is not supported: this package runs on 'cpu' and 'cuda' devices")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(
                f"{what} {str(device)!r} was requested, but CUDA is not available here (PyTorch {torch.__version__}, "
                f"{build}); use 'cpu'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{what} {str(device)!r} does not exist: this machine has {count} GPU(s)")
    return dev
