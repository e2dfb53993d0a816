"""The kernels the search tries: a network (a factory of ``gpytorch_cnngp.architectures.ARCHITECTURES`` or one
built here), the kernel of that network (NNGP or NTK) and the factory's parameters.

Candidates name their network, so a network that this version of the package does not have yet (e.g.
``myrtle``) can be listed: it is looked up only when the candidate is used, and a missing one is reported in one
line (:class:`CandidateUnavailable`). To try another kernel, add a :class:`Candidate` to :data:`CANDIDATES`; a
network that is not in ``ARCHITECTURES`` is a module-level function added to :data:`NETWORKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpytorch_cnngp import architectures
from gpytorch_cnngp.distributed import ArchitectureSpec
from gpytorch_cnngp.layers import AvgPool2d, Conv2d, Dense, Layer, ReLU, Sequential, resnet_block

__all__ = ["Candidate", "CandidateUnavailable", "CANDIDATES", "NETWORKS", "convnet_gp_pool", "resnet32_gp_pool"]


class CandidateUnavailable(ValueError):
    """A candidate's network is not in this version of the package, or does not take the candidate's parameters."""


# --------------------------------------------------------------------------------------------------------------
# networks the package does not have


def convnet_gp_pool(
    image_size: int = 28,
    var_weight: float = 2.79,
    var_bias: float = 7.86,
    depth: int = 7,
    kernel_size: int = 7,
    pool: int = 4,
) -> Layer:
    """The paper's ConvNet GP with its readout (a convolution over the whole final map) replaced by
    ``AvgPool2d(pool)`` and a :class:`~gpytorch_cnngp.Dense` readout; ``pool = image_size`` is a global average
    pool. Every layer then carries the ``(2 pool - 1)^2`` spatial offsets the pool's windows need."""
    if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= image_size:
        raise ValueError(f"pool must be an integer in 1..image_size ({image_size}), got {pool!r}")
    hidden: list[Layer] = []
    for _ in range(depth):
        hidden += [Conv2d(kernel_size, var_weight=var_weight * kernel_size**2, var_bias=var_bias), ReLU()]
    return Sequential(*hidden, AvgPool2d(pool), Dense(var_weight=var_weight, var_bias=var_bias))


def resnet32_gp_pool(image_size: int = 28, pool: int = 7) -> Layer:
    """The paper's ResNet-32 GP with the convolution over its whole final map (``image_size // 4`` square) replaced
    by ``AvgPool2d(pool)``, and its last 1x1 convolution by a :class:`~gpytorch_cnngp.Dense` readout;
    ``pool = image_size // 4`` is a global average pool."""
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4 for this architecture, got {image_size}")
    final = image_size // 4
    if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= final:
        raise ValueError(f"pool must be an integer in 1..image_size // 4 ({final}), got {pool!r}")
    layers: list[Layer] = [Conv2d(3)]
    for stride, mult in ((1, 1), (2, 2), (2, 4)):
        layers.append(resnet_block(stride=stride, projection_shortcut=True, multiplier=mult))
        layers += [resnet_block(stride=1, projection_shortcut=False, multiplier=mult) for _ in range(4)]
    return Sequential(*layers, AvgPool2d(pool), ReLU(), Dense())


NETWORKS: dict[str, Callable[..., Layer]] = {
    "convnet_gp_pool": convnet_gp_pool,
    "resnet32_gp_pool": resnet32_gp_pool,
}
"""Networks built here, by name (names of ``ARCHITECTURES`` are looked up there first)."""


# --------------------------------------------------------------------------------------------------------------
# candidates


@dataclass(frozen=True)
class Candidate:
    """One kernel to try.

    :ivar name: the candidate's name (``--candidates``, the rows, the store's file name).
    :ivar network: a key of ``ARCHITECTURES`` (looked up when used) or of :data:`NETWORKS`.
    :ivar kernel: ``"nngp"`` or ``"ntk"``.
    :ivar params: keyword arguments of the network's factory (its defaults for the rest).
    :ivar description: one line for ``--list``.
    """

    name: str
    network: str
    kernel: str = "nngp"
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def factory(self) -> Callable[..., Layer] | None:
        """``None`` for a network of ``ARCHITECTURES`` (found there by name), else its function here.

        :raises CandidateUnavailable: when neither has the network.
        """
        if self.network in architectures.ARCHITECTURES:
            return None
        if self.network in NETWORKS:
            return NETWORKS[self.network]
        raise CandidateUnavailable(
            f"candidate {self.name} needs the architecture {self.network!r}, which this version of "
            f"gpytorch_cnngp.architectures does not have (it has {', '.join(architectures.ARCHITECTURES)}); "
            f"update the package, or leave {self.name} out"
        )

    def spec(self) -> ArchitectureSpec:
        """The spec whose store holds this candidate's kernels.

        :raises CandidateUnavailable: for a missing network, or parameters its factory does not take.
        """
        factory = self.factory()
        try:
            return ArchitectureSpec.from_name(self.network, get=self.kernel, factory=factory, **dict(self.params))
        except ValueError as exc:
            raise CandidateUnavailable(f"candidate {self.name}: {exc}") from None

    def available(self) -> bool:
        """Whether :meth:`spec` works in this version of the package."""
        try:
            self.spec()
        except CandidateUnavailable:
            return False
        return True


def _registry(*candidates: Candidate) -> dict[str, Candidate]:
    return {c.name: c for c in candidates}


CANDIDATES: dict[str, Candidate] = _registry(
    Candidate(
        "convnet_gp", "convnet_gp", description="the paper's ConvNet GP (7 x [7x7 conv, ReLU], full-map readout)"
    ),
    Candidate("convnet_gp_ntk", "convnet_gp", "ntk", description="the NTK of the paper's ConvNet GP"),
    Candidate("residual_cnn_gp", "residual_cnn_gp", description="the paper's Residual CNN GP"),
    Candidate("resnet32_gp", "resnet32_gp", description="the paper's ResNet-32 GP (0.84% test error at 50k)"),
    Candidate("resnet32_gp_ntk", "resnet32_gp", "ntk", description="the NTK of the paper's ResNet-32 GP"),
    Candidate("pooled_cnn_gp", "pooled_cnn_gp", description="ours: 3x3 convs, 2x2 average pool, dense readout"),
    Candidate("pooled_cnn_gp_ntk", "pooled_cnn_gp", "ntk", description="the NTK of pooled_cnn_gp"),
    Candidate(
        "pooled_cnn_gp_ml2",
        "pooled_cnn_gp_ml2",
        description="pooled_cnn_gp, variances by ML-II on the first 1,000 training digits (no biases)",
    ),
    Candidate("myrtle5", "myrtle5_gp", description="Myrtle-5 (Shankar et al. 2020), NNGP"),
    Candidate("myrtle5_ntk", "myrtle5_gp", "ntk", description="Myrtle-5, NTK"),
    Candidate("myrtle7", "myrtle7_gp", description="Myrtle-7 (Shankar et al. 2020), NNGP"),
    Candidate("myrtle10", "myrtle10_gp", description="Myrtle-10 (Shankar et al. 2020), NNGP"),
    Candidate(
        "convnet_gp_pool2",
        "convnet_gp_pool",
        params={"pool": 2},
        description="ConvNet GP, AvgPool2d(2) and a dense readout instead of the full-map conv (9 offsets)",
    ),
    Candidate(
        "convnet_gp_pool4",
        "convnet_gp_pool",
        params={"pool": 4},
        description="ConvNet GP, AvgPool2d(4) and a dense readout instead of the full-map conv (49 offsets)",
    ),
    Candidate(
        "pooled_cnn_gp_gap",
        "pooled_cnn_gp",
        params={"global_pool": True},
        description="ours: pooled_cnn_gp with a global average pool before the readout",
    ),
    Candidate(
        "pooled_cnn_gp_gap_ntk",
        "pooled_cnn_gp",
        "ntk",
        params={"global_pool": True},
        description="the NTK of pooled_cnn_gp_gap",
    ),
    Candidate(
        "convnet_gp_gap",
        "convnet_gp_pool",
        params={"pool": 28},
        description="ConvNet GP with a global average pool and a dense readout (every offset: costly)",
    ),
    Candidate(
        "resnet32_gp_gap",
        "resnet32_gp_pool",
        description="ResNet-32 GP, global average pool over its 7x7 map, ReLU, dense readout (every offset)",
    ),
)
"""Every candidate by name, in the order the search's default runs those available: the networks without pooling
(the native kernel runs them: minutes for 10,000 training and 10,000 validation images), then the pooled ones
roughly by cost (every spatial offset of a global pool makes the pass before it many times dearer)."""
