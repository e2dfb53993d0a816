"""Every switch and default of the library, in one place, in the manner of ``gpytorch.settings``.

Each setting is read with ``.value()`` and set for a block of code with a context manager::

    from gpytorch_cnngp import settings

    with settings.native(False), settings.memory_budget("2GB"):
        K = model(X, Z)  # torch.compile or eager, within 2 GB

    settings.native.value()  # True again here (unless CNNGP_NATIVE says otherwise)

A value comes from the innermost active context manager, else from the setting's environment variable (parsed
here, and only here; a value that cannot be parsed is an error naming the variable), else from its default.
Context managers apply to the whole process (as GPyTorch's do), not to one thread.

============================  =======================  =========================================================
setting                       environment variable     meaning
============================  =======================  =========================================================
:class:`compile_mode`         ``CNNGP_COMPILE``        ``"auto"`` (default), ``"on"`` or ``"off"``: the backend
                                                       of calls that do not choose one (``backend="auto"``)
:class:`native`               ``CNNGP_NATIVE``         the native CPU kernel may be used (default true)
:class:`auto_native_pairs`    --                       smallest number of pairs that ``"auto"`` runs natively
:class:`auto_compile_pairs`   --                       smallest number of pairs that ``"auto"`` compiles with
                                                       ``torch.compile`` (where the native kernel does not apply)
:class:`memory_budget`        ``CNNGP_MEMORY_BUDGET``  the engine's bytes per call (``None``: a quarter of the
                                                       machine's memory up to 4 GiB, 60% of a GPU's free memory)
:class:`tune_allocator`       ``CNNGP_MALLOPT``        let the library set glibc's malloc thresholds (default
                                                       true; see :mod:`gpytorch_cnngp.memory`)
:class:`cache_dir`            ``CNNGP_CACHE_DIR``      the native kernel's build cache (default
                                                       ``$XDG_CACHE_HOME/gpytorch_cnngp`` or ``~/.cache/...``)
:class:`data_dir`             ``CNNGP_DATA``           the data sets' folder (default: the cache folder)
:class:`store_dir`            ``CNNGP_STORE_DIR``      where ``cnngp table --paper-scale`` keeps its stores
:class:`traceback`            ``CNNGP_TRACEBACK``      ``cnngp`` shows tracebacks instead of one-line errors
:class:`spatial_path`         ``CNNGP_SPATIAL``        pooled networks' maps between positions: ``"auto"``
                                                       (default), ``"offsets"`` or ``"full"``
============================  =======================  =========================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from .units import parse_bytes

__all__ = [
    "compile_mode",
    "native",
    "auto_native_pairs",
    "auto_compile_pairs",
    "memory_budget",
    "tune_allocator",
    "cache_dir",
    "data_dir",
    "store_dir",
    "traceback",
    "spatial_path",
    "parse_flag",
]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_flag(text: str, name: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); anything else is a ValueError naming ``name``."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{name}={text!r} is not a yes/no value; use one of {', '.join(_TRUE + _FALSE)}")


class _Setting:
    """A value with a default, an optional environment variable, and a context manager that overrides both."""

    env: ClassVar[str | None] = None
    default: ClassVar[Any] = None
    _stack: ClassVar[list[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._stack = []

    @classmethod
    def parse(cls, text: str) -> Any:
        """The value of the environment variable's text (subclasses check and convert it)."""
        return text

    @classmethod
    def check(cls, value: Any) -> Any:
        """The value given to the context manager, checked (subclasses convert it)."""
        return value

    @classmethod
    def value(cls) -> Any:
        """The current value: the innermost context manager's, else the environment's, else the default."""
        if cls._stack:
            return cls._stack[-1]
        if cls.env is not None:
            text = os.environ.get(cls.env, "")
            if text.strip():
                return cls.parse(text)
        return cls.default() if callable(cls.default) else cls.default

    def __init__(self, value: Any) -> None:
        self._value = type(self).check(value)

    def __enter__(self) -> _Setting:
        type(self)._stack.append(self._value)
        return self

    def __exit__(self, *exc: object) -> None:
        type(self)._stack.pop()


class _Flag(_Setting):
    default = True

    @classmethod
    def parse(cls, text: str) -> bool:
        return parse_flag(text, cls.env or cls.__name__)

    @classmethod
    def check(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"settings.{cls.__name__} takes True or False, got {value!r}")
        return value


class _Count(_Setting):
    @classmethod
    def check(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"settings.{cls.__name__} takes a non-negative integer, got {value!r}")
        return value


class _Folder(_Setting):
    @classmethod
    def parse(cls, text: str) -> Path:
        return Path(text).expanduser()

    @classmethod
    def check(cls, value: Any) -> Path:
        return Path(value).expanduser()


def _user_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg).expanduser() if xdg.strip() else Path.home() / ".cache") / "gpytorch_cnngp"


class compile_mode(_Setting):
    """The backend of calls that leave it open (``backend="auto"``): ``"auto"``, ``"on"`` or ``"off"``.

    ``"auto"``: the native CPU kernel from :class:`auto_native_pairs` pairs on where the network allows it,
    ``torch.compile`` from :class:`auto_compile_pairs` pairs on (except for networks with pooling), else
    eager. ``"on"``: compiled (native where it applies). ``"off"``: eager. ``CNNGP_COMPILE`` also takes
    yes/no words.
    """

    env = "CNNGP_COMPILE"
    default = "auto"

    @classmethod
    def parse(cls, text: str) -> str:
        word = text.strip().lower()
        if word == "auto":
            return "auto"
        return "on" if parse_flag(word, "CNNGP_COMPILE") else "off"

    @classmethod
    def check(cls, value: Any) -> str:
        if value not in ("auto", "on", "off"):
            raise ValueError(f"settings.compile_mode takes 'auto', 'on' or 'off', got {value!r}")
        return value


class native(_Flag):
    """Whether the native CPU kernel may be used (where it applies; else ``torch.compile``)."""

    env = "CNNGP_NATIVE"


class auto_native_pairs(_Count):
    """From this many pairs on, ``compile_mode("auto")`` runs the native kernel (benchmarks/bench_crossover.py:
    from 16 pairs on it is as fast as eager or faster; below, both are dominated by the self pass they share)."""

    default = 16


class auto_compile_pairs(_Count):
    """From this many pairs on, ``compile_mode("auto")`` uses ``torch.compile`` where the native kernel does not
    apply (compiling a network takes seconds to minutes, once per architecture, dtype and tile size)."""

    default = 4_000_000


class memory_budget(_Setting):
    """Bytes the engine may use per call when the call does not say (``None``: chosen from the device).

    Takes a number of bytes or text such as ``"2GB"`` (see :func:`gpytorch_cnngp.units.parse_bytes`).
    """

    env = "CNNGP_MEMORY_BUDGET"
    default = None

    @classmethod
    def parse(cls, text: str) -> int:

        try:
            return parse_bytes(text)
        except ValueError as exc:
            raise ValueError(f"CNNGP_MEMORY_BUDGET: {exc}") from None

    @classmethod
    def check(cls, value: Any) -> int | None:

        return None if value is None else parse_bytes(value)


class tune_allocator(_Flag):
    """Whether the library may set glibc's malloc thresholds (see :mod:`gpytorch_cnngp.memory`)."""

    env = "CNNGP_MALLOPT"


class cache_dir(_Folder):
    """The folder of the native kernel's builds (``<cache_dir>/native``)."""

    env = "CNNGP_CACHE_DIR"
    default = staticmethod(_user_cache)


class data_dir(_Folder):
    """The folder holding one subfolder per data set (an explicit ``data_dir`` argument comes first)."""

    env = "CNNGP_DATA"
    default = staticmethod(_user_cache)


class store_dir(_Folder):
    """Where ``cnngp table --paper-scale`` keeps its kernel stores (``--store-dir`` comes first)."""

    env = "CNNGP_STORE_DIR"
    default = staticmethod(lambda: Path.home() / ".cache" / "gpytorch_cnngp" / "paper_table")


class traceback(_Flag):
    """Whether ``cnngp`` re-raises errors with their traceback instead of printing one line."""

    env = "CNNGP_TRACEBACK"
    default = False


class spatial_path(_Setting):
    """How the eager passes of a pooled network carry covariances between positions.

    ``"offsets"``: one map per spatial offset ``d = q - p`` that the readout needs (``[H, W, n_offsets, ...]``,
    see :class:`gpytorch_cnngp.ops.Offsets`); ``"full"``: every pair of positions, ``[H, W, H, W, ...]``;
    ``"auto"`` (default): offsets unless some layer would carry more offsets than its map has positions (a
    global pool needs every offset, and an offset map stores each at every position, so the full map is then
    the smaller one). Both give the same kernel; ``torch.compile`` always runs the full form.
    """

    env = "CNNGP_SPATIAL"
    default = "auto"

    @classmethod
    def parse(cls, text: str) -> str:
        word = text.strip().lower()
        if word not in ("auto", "offsets", "full"):
            raise ValueError(f"CNNGP_SPATIAL={text!r} is not a spatial path; use auto, offsets or full")
        return word

    @classmethod
    def check(cls, value: Any) -> str:
        if value not in ("auto", "offsets", "full"):
            raise ValueError(f"settings.spatial_path takes 'auto', 'offsets' or 'full', got {value!r}")
        return value
