"""Device names: unknown or unavailable devices are one clear ValueError at every entry point."""

from __future__ import annotations

import pytest
import torch

from gpytorch_cnngp import architectures, cli, gram
from gpytorch_cnngp.classify import classify_store
from gpytorch_cnngp.devices import parse_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


def test_cpu_devices_parse():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_devices_are_named(name):
    with pytest.raises(ValueError, match="unknown device|not supported"):
        parse_device(name)


def test_unsupported_device_types_are_refused():
    with pytest.raises(ValueError, match="'meta' is not supported"):
        parse_device("meta")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it(name):
    with pytest.raises(ValueError, match="CUDA is not available here.*use 'cpu'"):
        parse_device(name)


@no_cuda
def test_gram_on_an_unavailable_device_is_a_clear_error():
    # was: AssertionError "Torch not compiled with CUDA enabled" from deep inside torch
    model = architectures.convnet_gp(depth=1, kernel_size=3, image_size=8)
    with pytest.raises(ValueError, match="CUDA is not available here"):
        gram(model, torch.rand(2, 1, 8, 8), device="cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        gram(model, torch.rand(2, 1, 8, 8), device="tpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_by_gram(dtype):
    # was: all NaN (float16) or a silent 2% error (bfloat16)
    model = architectures.convnet_gp(depth=1, kernel_size=3, image_size=8)
    with pytest.raises(ValueError, match="too narrow for CNN-GP kernels.*float32 or float64"):
        gram(model, torch.rand(2, 1, 8, 8, dtype=dtype))


def test_cli_device_tpu_is_a_one_line_error(tmp_path, capsys):
    # was: a raw RuntimeError traceback
    status = cli.main(["kernels", "--device", "tpu", "--out", str(tmp_path / "k.h5"), "--n-train", "4"])
    assert status == 1
    assert capsys.readouterr().err.strip() == "cnngp: error: unknown device 'tpu': use 'cpu', 'cuda' or 'cuda:N'"
    assert not (tmp_path / "k.h5").exists()


def test_classifier_device_is_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        classify_store(tmp_path / "missing.h5", "tpu")
