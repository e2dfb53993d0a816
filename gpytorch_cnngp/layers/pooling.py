"""Average pooling: windows averaged independently on each image, so it needs the full spatial covariance."""

from __future__ import annotations

from torch import nn

from ..ops import Window
from ..state import CovState
from .base import FiniteBuild, Layer

__all__ = ["AvgPool2d", "GlobalAvgPool2d"]


class AvgPool2d(Layer):
    r"""Average pooling over ``k x k`` windows, as :class:`torch.nn.AvgPool2d` with ``count_include_pad=True``.

    The two images' windows are averaged independently, so the output covariance mixes different
    positions of the input:

    .. math::
        K'[p, q] = \frac{1}{k^4} \sum_{t \in \mathrm{window}(p)} \sum_{t' \in \mathrm{window}(q)} K[t, t'].

    Every layer before the last pooling layer therefore carries covariances between positions: one map per
    spatial offset that the readout needs (output offset ``D`` reads input offsets ``stride D + b - a`` for
    taps ``a, b``; a dense readout after one pool needs ``(2k - 1)^2`` of them), or the full maps
    ``[H, W, H, W]`` where that is smaller (see :class:`gpytorch_cnngp.settings.spatial_path`); layers after
    it keep the cheap same-location maps. Padding positions count as zeros in the ``k^2`` average.

    :param kernel_size: window width ``k``.
    :param stride: window step; defaults to ``kernel_size`` (non-overlapping windows, like torch and
        neural-tangents).
    :param padding: zeros added on every side, at most ``kernel_size // 2`` (as torch requires).

    Example:
        >>> from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, ReLU, Sequential
        >>> model = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), Dense())
        >>> model(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 3])
    """

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        super().__init__()
        if stride is None:
            stride = kernel_size
        for name, value in (("kernel_size", kernel_size), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AvgPool2d {name} must be an integer >= 1, got {value!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"AvgPool2d padding must be a non-negative integer, got {padding!r}")
        if padding > kernel_size // 2:
            raise ValueError(f"AvgPool2d padding must be at most kernel_size // 2 = {kernel_size // 2}, got {padding}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.window = Window(kernel_size, stride, 1, padding, padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def needs_full(self) -> bool:
        return True

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = (self.window.out_size(n) for n in size)
        if h < 1 or w < 1:
            raise ValueError(
                f"AvgPool2d(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}) "
                f"does not fit a {size[0]}x{size[1]} input"
            )
        return h, w

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        # output offset D reads input offsets s D + (b - a) for taps a, b of the window
        s, span = self.stride, range(-(self.kernel_size - 1), self.kernel_size)
        return frozenset((s * dy + ey, s * dx + ex) for dy, dx in out for ey in span for ex in span)

    def propagate(self, state: CovState) -> CovState:
        scale = 1.0 / self.kernel_size**4
        return state.each(lambda m: state.pool(m, self.window, scale))

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding, count_include_pad=True), incoming


class GlobalAvgPool2d(Layer):
    r"""Mean over all positions; the kernel averages the covariance over every pair of positions:

    .. math::
        K' = \frac{1}{(HW)^2} \sum_{p} \sum_{q} K[p, q].

    The output is a 1x1 map, so a :class:`Dense` or ``Conv2d(kernel_size=1)`` readout may follow.
    """

    def needs_full(self) -> bool:
        return True

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return 1, 1

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        h, w = in_size
        return frozenset((dy, dx) for dy in range(1 - h, h) for dx in range(1 - w, w))

    def propagate(self, state: CovState) -> CovState:
        return state.each(state.global_mean)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        return nn.AdaptiveAvgPool2d(1), incoming
