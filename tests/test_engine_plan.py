"""The engine's memory plan: map sizes, self-term bytes and tile sizes, on CPU and (as a plan) on CUDA.

Planning needs no GPU: with an explicit budget, ``estimate_tile_size`` on ``device="cuda"`` only
does arithmetic, so the CUDA branch (tiles that fill the budget instead of the CPU's cache-sized cap)
is checked on any machine. Expected values are counted by hand from the architectures.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpytorch_cnngp import AvgPool2d, Conv2d, Dense, ReLU, Sequential, architectures, tiling
from gpytorch_cnngp.backends import Eager, Inductor


def _map_sizes(model, size):
    info = tiling.network_info(model, size)
    return info.largest, info.trace_area


def test_map_sizes_of_the_convnet_gp_by_hand():
    # seven ReLUs, each on a 28x28 map; no pooling, so the largest map is one 28x28 image
    largest, trace_area = _map_sizes(architectures.convnet_gp(), (28, 28))
    assert largest == 28 * 28
    assert trace_area == 7 * 28 * 28


def test_map_sizes_of_a_pooled_network_are_full_covariances():
    # Conv(3, stride 2) -> 14x14, ReLU, Conv(3), ReLU, AvgPool(2) -> 7x7, Conv(3), ReLU, Dense:
    # every map before the pool is a full covariance, the largest being the 28x28 input's [28, 28, 28, 28]
    largest, trace_area = _map_sizes(architectures.pooled_cnn_gp(), (28, 28))
    assert largest == (28 * 28) ** 2
    assert trace_area == 14 * 14 + 14 * 14 + 7 * 7


def test_map_sizes_follow_a_changed_layer_tree():
    model = Sequential(Conv2d(3), ReLU(), Conv2d(8, padding=0))
    assert _map_sizes(model, (8, 8)) == (64, 64)
    model.layers.insert(2, ReLU())  # a second nonlinearity on the 8x8 map
    model.layers.insert(2, Conv2d(3))
    assert _map_sizes(model, (8, 8)) == (64, 128)
    model.layers[0] = Conv2d(3, stride=2)  # now 4x4 maps after the first conv
    model.layers[-1] = Conv2d(4, padding=0)
    assert _map_sizes(model, (8, 8)) == (64, 32)
    model.layers[0].var_weight = 3.0  # hyperparameters do not change shapes
    assert _map_sizes(model, (8, 8)) == (64, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tile_plan_on_cpu_and_cuda(dtype):
    model = architectures.convnet_gp()
    item = torch.empty((), dtype=dtype).element_size()
    n, budget = 1000, 256 << 20
    cpu = tiling.estimate_tile_size(model, (28, 28), n, dtype, "cpu", memory_budget=budget)
    gpu = tiling.estimate_tile_size(model, (28, 28), n, dtype, "cuda", memory_budget=budget)
    assert cpu.trace_bytes == gpu.trace_bytes == n * 7 * 784 * item
    assert cpu.pair_bytes == gpu.pair_bytes == 784 * item * Eager.workspace_factor
    fit = math.isqrt((budget - cpu.trace_bytes) // cpu.pair_bytes)
    assert gpu.tile_size == fit  # a GPU takes the largest tile the budget allows
    assert cpu.tile_size == min(fit, Eager.cpu_tile)  # a CPU keeps tiles cache-sized
    assert fit > Eager.cpu_tile
    # one tile's workspace plus the self terms fit the budget
    assert gpu.trace_bytes + gpu.tile_size**2 * gpu.pair_bytes <= budget


def test_compiled_plans_use_their_own_workspace_factor():
    model = Sequential(Conv2d(3), ReLU(), AvgPool2d(2), Conv2d(3), ReLU(), Dense())
    plan = tiling.estimate_tile_size(model, (8, 8), 10, torch.float32, "cpu", memory_budget=1 << 30, backend="inductor")
    assert plan.pair_bytes == (64 * 64) * 4 * Inductor.workspace_factor


def test_self_pass_chunks():
    """The eager self pass's chunk: a few hundred images on a CPU, a few thousand elsewhere, never above what
    memory allows nor below one image (gram's diagonal and gram_diag share it)."""
    from gpytorch_cnngp.tiling import CPU_SELF_CHUNK, SELF_CHUNK, self_chunk

    assert self_chunk("cpu") == CPU_SELF_CHUNK < SELF_CHUNK == self_chunk("cuda")
    assert self_chunk(torch.device("cpu"), 10**6) == CPU_SELF_CHUNK and self_chunk("cuda:1", 10**6) == SELF_CHUNK
    assert self_chunk("cpu", 100) == 100 and self_chunk("cuda", 100) == 100
    assert self_chunk("cpu", 0) == 1


def test_the_engine_exports_only_its_own_names():
    """The engine's public names are its own; the passes, the plans, the hyperparameters and the backends' checks
    are imported from their home modules (passes, tiling, state, backends), not through the engine."""
    from gpytorch_cnngp import engine

    assert sorted(engine.__all__) == ["check_architecture", "gram", "gram_diag"]
    assert all(getattr(engine, name).__module__ == engine.__name__ for name in engine.__all__)
    for gone in ("native_ready", "hyperparameters"):  # imported only to be re-exported
        assert not hasattr(engine, gone), gone
