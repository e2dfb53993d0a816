"""gpytorch_cnngp.settings: defaults, environment variables parsed in one place, context managers that nest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpytorch_cnngp import datasets, memory, settings, tiling
from gpytorch_cnngp.architectures import convnet_gp, pooled_cnn_gp
from gpytorch_cnngp.backends import Eager, Inductor, Native, choose, native


def _choose(requested: str, pairs: int, pooled: bool = False):
    """The backend the one policy picks for a CPU float32 call of ``pairs`` entries on 8x8 images."""
    model = pooled_cnn_gp(image_size=8) if pooled else convnet_gp(image_size=8, depth=2, kernel_size=3)
    return choose(requested, model, (8, 8), torch.float32, torch.device("cpu"), pairs)


def _auto(pairs: int, pooled: bool = False):
    return _choose("auto", pairs, pooled)


FLAGS = [(settings.native, "CNNGP_NATIVE", True), (settings.tune_allocator, "CNNGP_MALLOPT", True)]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("CNNGP_NATIVE", "CNNGP_MALLOPT", "CNNGP_COMPILE", "CNNGP_MEMORY_BUDGET", "CNNGP_CACHE_DIR",
                 "CNNGP_DATA", "CNNGP_STORE_DIR", "CNNGP_TRACEBACK", "XDG_CACHE_HOME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("setting, env, default", FLAGS)
def test_flags_read_yes_no_words_and_refuse_others(monkeypatch, setting, env, default):
    assert setting.value() is default
    for word, value in (("0", False), ("off", False), ("No", False), ("1", True), ("TRUE", True), ("on", True)):
        monkeypatch.setenv(env, word)
        assert setting.value() is value, word
    monkeypatch.setenv(env, "maybe")
    with pytest.raises(ValueError, match=f"{env}='maybe' is not a yes/no value"):
        setting.value()
    with pytest.raises(ValueError, match="takes True or False"):
        setting(1)


def test_context_managers_override_the_environment_and_nest(monkeypatch):
    monkeypatch.setenv("CNNGP_NATIVE", "0")
    assert settings.native.value() is False
    with settings.native(True):
        assert settings.native.value() is True
        with settings.native(False):
            assert settings.native.value() is False
        assert settings.native.value() is True
    assert settings.native.value() is False
    with pytest.raises(RuntimeError), settings.native(True):  # restored on errors too
        raise RuntimeError
    assert settings.native.value() is False


def test_compile_mode(monkeypatch):
    assert settings.compile_mode.value() == "auto"
    for word, mode in (("auto", "auto"), ("AUTO", "auto"), ("1", "on"), ("yes", "on"), ("0", "off"), ("off", "off")):
        monkeypatch.setenv("CNNGP_COMPILE", word)
        assert settings.compile_mode.value() == mode
    monkeypatch.setenv("CNNGP_COMPILE", "fast")
    with pytest.raises(ValueError, match="CNNGP_COMPILE"):
        settings.compile_mode.value()
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        settings.compile_mode(True)
    monkeypatch.setenv("CNNGP_COMPILE", "0")
    assert _auto(10**9, pooled=True) is Eager and _auto(10**9) is Eager
    with settings.compile_mode("on"):
        assert _auto(1, pooled=True) in (Native, Inductor)  # native where the kernel builds
        assert _auto(1) in (Native, Inductor)
        assert _choose("eager", 1) is Eager  # an explicit argument beats the setting


def test_thresholds(monkeypatch):
    assert settings.auto_native_pairs.value() == 16 and settings.auto_compile_pairs.value() == 4_000_000
    with settings.auto_compile_pairs(10), settings.native(False):
        assert _auto(10) is Inductor and _auto(9) is Eager
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="non-negative integer"):
            settings.auto_native_pairs(bad)


def test_memory_budget_takes_units_everywhere(monkeypatch):
    cpu = torch.device("cpu")
    machine = tiling.default_budget(cpu)
    assert settings.memory_budget.value() is None and 0 < machine <= 4 << 30
    monkeypatch.setenv("CNNGP_MEMORY_BUDGET", "512MiB")
    assert settings.memory_budget.value() == 512 * 2**20 == tiling.default_budget(cpu)
    monkeypatch.setenv("CNNGP_MEMORY_BUDGET", "1e9")  # a plain number of bytes, as before
    assert tiling.default_budget(cpu) == 10**9
    with settings.memory_budget("2GB"):
        assert tiling.default_budget(cpu) == 2 * 10**9
        with settings.memory_budget(None):  # back to the machine's default
            assert tiling.default_budget(cpu) == machine
    monkeypatch.setenv("CNNGP_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="CNNGP_MEMORY_BUDGET: not a memory size"):
        settings.memory_budget.value()
    with pytest.raises(ValueError, match="at least 1 byte"):
        settings.memory_budget(0)


def test_folders(monkeypatch, tmp_path):
    home_cache = Path.home() / ".cache" / "gpytorch_cnngp"
    assert settings.cache_dir.value() == home_cache == settings.data_dir.value()
    assert native.build._cache_dir() == home_cache / "native"
    assert settings.store_dir.value() == home_cache / "paper_table"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.cache_dir.value() == tmp_path / "xdg" / "gpytorch_cnngp" == datasets.default_cache_dir()
    monkeypatch.setenv("CNNGP_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("CNNGP_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("CNNGP_STORE_DIR", str(tmp_path / "s"))
    assert native.build._cache_dir() == tmp_path / "c" / "native"
    assert datasets.resolve_data_dir() == tmp_path / "d"
    assert datasets.resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert settings.store_dir.value() == tmp_path / "s"
    monkeypatch.setenv("CNNGP_DATA", "   ")  # blank: as unset
    assert datasets.resolve_data_dir() == datasets.default_cache_dir()
    with settings.data_dir("~/elsewhere"):
        assert datasets.resolve_data_dir() == Path.home() / "elsewhere"


def test_the_allocator_policy_is_one_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda mmap, trim: calls.append((mmap, trim)) or True)
    monkeypatch.setattr(memory, "_kept", False)
    with settings.tune_allocator(False):
        memory.keep_freed_memory()
        with memory.freed_memory_returned():
            pass
    assert calls == []
    monkeypatch.setattr(memory, "_kept", False)
    memory.keep_freed_memory()
    memory.keep_freed_memory()  # once per process
    assert calls == [(64 << 20, 256 << 20)]
    with memory.freed_memory_returned():
        assert calls[-1] == (1 << 20, 1 << 20)
    assert calls[-1] == (64 << 20, 256 << 20)  # the engine's policy restored
