"""Combinators: layers in series (:class:`Sequential`) and independent branches added (:class:`Sum`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from ..layout import SAME_LOCATION, layout_of
from ..state import CovState, enter
from .base import FiniteBuild, Layer
from .conv import Conv2d
from .relu import ReLU

__all__ = ["Sequential", "Sum", "resnet_block"]


def _as_layers(layers: Iterable, owner: str) -> list[Layer]:
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise ValueError(
                f"{owner} takes gpytorch_cnngp layers, but item {i} is a {type(layer).__name__}"
                + (" (use gpytorch_cnngp.Conv2d/ReLU, not torch.nn)" if isinstance(layer, nn.Module) else "")
            )
    return layers


def _own_rule(layer: Layer, out: frozenset, size: tuple[int, int]) -> frozenset:
    return layer.offsets_needed(out, size)


class Sequential(Layer):
    """Layers applied one after the other; ``Sequential()`` with no layers is the identity.

    Example:
        >>> from gpytorch_cnngp import Conv2d, ReLU, Sequential
        >>> model = Sequential(Conv2d(3), ReLU(), Conv2d(3, stride=2), ReLU(), Conv2d(14, padding=0))
        >>> X = torch.rand(5, 3, 28, 28)
        >>> model(X).shape, model(X, diag=True).shape
        (torch.Size([5, 5]), torch.Size([5]))
    """

    def __init__(self, *layers: Layer):
        super().__init__()
        self.layers = nn.ModuleList(_as_layers(layers, "Sequential"))

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def children_layers(self) -> Iterator[Layer]:
        return iter(self.layers)

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        for layer in self.layers:
            size = layer.out_size(size)
        return size

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        rule = rule or _own_rule
        if not self.layers:  # the identity
            return out
        sizes = [in_size]
        for layer in self.layers[:-1]:
            sizes.append(layer.out_size(sizes[-1]))
        for layer, size in zip(reversed(self.layers), reversed(sizes), strict=True):
            out = rule(layer, out, size)
        return out

    def propagate(self, state: CovState) -> CovState:
        if state.run.plan is not None:  # a pooled network on offset maps
            want, layers = state.want, list(self.layers)
            for layer, layer_want in zip(layers, state.run.plan.chain(layers, state.size, want), strict=True):
                state = enter(layer, state, layer_want)
            return state.at(layout_of(want))
        keep = state.keep_full
        needs = [state.run.requirements.needs(layer) for layer in self.layers]
        for i, layer in enumerate(self.layers):
            later = keep or any(needs[i + 1 :])
            if not (needs[i] or later):
                state = state.at(SAME_LOCATION)  # nothing from here on needs positions
            state = layer.propagate(state.replace(keep_full=later))
        state = state.replace(keep_full=keep)
        return state if keep else state.at(SAME_LOCATION)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        # The first layer with weights reads the input channels and the last one writes the output
        # channels; weightless layers (nonlinearities) before or after them just pass channels on.
        weighted = [i for i, layer in enumerate(self.layers) if layer.has_weights()]
        first, last = (weighted[0], weighted[-1]) if weighted else (len(self.layers), -1)
        modules = []
        for i, layer in enumerate(self.layers):
            size = build.size
            module, incoming = layer.build_nn(
                in_channels if i <= first else build.channels,
                out_channels if i >= last else build.channels,
                incoming,
                build,
            )
            build.size = None if size is None else layer.out_size(size)
            modules.append(module)
        return nn.Sequential(*modules), incoming


class _SumModule(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class Sum(Layer):
    """Adds the outputs of branches applied to the same input, as independent Gaussian processes.

    The kernel is the sum of the branches' kernels (no cross terms). This is the infinite-width
    limit when every branch ends in a linear layer with its own weights (e.g. a skip connection next
    to a conv, as in :func:`resnet_block`). A sum whose branches end in a nonlinearity, as in the
    paper's Residual CNN GP, still gives a valid kernel but not the limit of that finite network:
    the activations there have non-zero means and correlated branches.
    """

    def __init__(self, branches: Iterable[Layer]):
        super().__init__()
        branches = _as_layers(branches, "Sum")
        if not branches:
            raise ValueError("Sum needs at least one branch")
        self.branches = nn.ModuleList(branches)

    def children_layers(self) -> Iterator[Layer]:
        return iter(self.branches)

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        sizes = [branch.out_size(size) for branch in self.branches]
        if any(s != sizes[0] for s in sizes):
            shown = ", ".join(f"{h}x{w}" for h, w in sizes)
            raise ValueError(f"Sum branches give different spatial sizes ({shown}) for a {size[0]}x{size[1]} input")
        return sizes[0]

    def offsets_needed(self, out: frozenset, in_size: tuple[int, int], rule=None) -> frozenset:
        rule = rule or _own_rule
        return frozenset().union(*(rule(branch, out, in_size) for branch in self.branches))

    def propagate(self, state: CovState) -> CovState:
        if state.run.plan is not None:  # a pooled network on offset maps: every branch gives the same offsets
            outs = [enter(branch, state, state.want) for branch in self.branches]
            total = outs[0]
            for out in outs[1:]:
                ntk = None if out.ntk is None else total.ntk + out.ntk
                total = total.replace(nngp=total.nngp + out.nngp, ntk=ntk)
            return total
        total = None
        for branch in self.branches:
            out = branch.propagate(state)
            if not state.keep_full:
                out = out.at(SAME_LOCATION)
            if total is None:
                total = out
            else:  # independent branches: both kernels add
                ntk = None if out.ntk is None else total.ntk + out.ntk
                total = total.replace(nngp=total.nngp + out.nngp, ntk=ntk)
        return total.replace(keep_full=state.keep_full)

    def build_nn(self, in_channels: int, out_channels: int, incoming: int, build: FiniteBuild) -> tuple[nn.Module, int]:
        size, built = build.size, []
        for branch in self.branches:
            build.size = size
            built.append(branch.build_nn(in_channels, out_channels, incoming, build))
        build.size = None if size is None else self.out_size(size)
        counts = sorted({c for _, c in built})
        # A branch with one channel broadcasts (the paper's Residual CNN GP adds its 1-channel input).
        if len(counts) > 2 or (len(counts) == 2 and counts[0] != 1):
            raise ValueError(f"Sum branches give different channel counts {counts}; they cannot be added")
        return _SumModule([m for m, _ in built]), counts[-1]


def resnet_block(stride: int = 1, projection_shortcut: bool = False, multiplier: int = 1) -> Layer:
    """Pre-activation residual block (all ``var_weight = 1``, ``var_bias = 0``).

    * ``stride == 1`` and no projection:
      ``Sum([Sequential(), Sequential(ReLU(), Conv2d(3), ReLU(), Conv2d(3))])``;
    * otherwise:
      ``Sequential(ReLU(), Sum([Conv2d(1, stride), Sequential(Conv2d(3, stride), ReLU(), Conv2d(3))]))``,
      whose strided convolutions take ``multiplier // stride`` times the base channels.

    Every convolution outputs ``multiplier`` times the base number of channels.
    """
    for name, value in (("stride", stride), ("multiplier", multiplier)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"resnet_block {name} must be an integer >= 1, got {value!r}")
    m = multiplier
    if stride == 1 and not projection_shortcut:
        return Sum(
            [
                Sequential(),
                Sequential(
                    ReLU(),
                    Conv2d(3, stride, in_channel_multiplier=m, out_channel_multiplier=m),
                    ReLU(),
                    Conv2d(3, in_channel_multiplier=m, out_channel_multiplier=m),
                ),
            ]
        )
    if m % stride:
        raise ValueError(f"resnet_block multiplier ({m}) must be divisible by stride ({stride})")
    m_in = m // stride
    return Sequential(
        ReLU(),
        Sum(
            [
                Conv2d(1, stride, in_channel_multiplier=m_in, out_channel_multiplier=m),
                Sequential(
                    Conv2d(3, stride, in_channel_multiplier=m_in, out_channel_multiplier=m),
                    ReLU(),
                    Conv2d(3, in_channel_multiplier=m, out_channel_multiplier=m),
                ),
            ]
        ),
    )
