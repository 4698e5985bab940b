"""A block's fast-path options, and scopes that override them on one thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from ._build import _native


class Options(NamedTuple):
    """A block's fast-path options.

    Attributes:
        fast: run fast paths at all (False: the reference's module path always).
        low_memory: depthwise blocks off the CPU kernel (CUDA, or ``cpu_kernel=False``) train
            without storing branch outputs, trading time for memory (measured 1.7-3x slower);
            False (the default): the reference's branches, which store them. The CPU kernel
            (``cpu_kernel``) stores none and is faster, whatever this says.
        cpu_kernel: depthwise blocks use the CPU kernels (training in float32/64, inference in
            float32) on CPU tensors (False: libtorch's ops).
    """

    fast: bool = True
    low_memory: bool = False
    cpu_kernel: bool = True


def require_bool(value: Any, name: str) -> bool:
    """``value`` when it is a bool, else ``ArgumentTypeError`` naming ``name`` (no truthy values:
    a yaml typo such as ``Flase`` or a ``0`` is refused, not read as True or False)."""
    if type(value) is not bool:
        raise _native.ArgumentTypeError(
            f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}"
        )
    return value


def _require_option(value: Any, name: str) -> bool | None:
    return None if value is None else require_bool(value, f"fast_paths({name}=...)")


class _Override(NamedTuple):
    fast: bool | None = None
    low_memory: bool | None = None
    cpu_kernel: bool | None = None


_scope = threading.local()


def effective(options: Options) -> Options:
    """A block's options with this thread's :func:`fast_paths` scope applied."""
    override: _Override | None = getattr(_scope, "override", None)
    if override is None:
        return options
    return Options(*(mine if theirs is None else theirs for mine, theirs in zip(options, override)))


@contextlib.contextmanager
def fast_paths(
    enabled: bool | None = None, low_memory: bool | None = None, cpu_kernel: bool | None = None
) -> Iterator[None]:
    """Overrides every block's options on this thread for the scope; ``None`` keeps a block's own.

    Example: ``with fast_paths(cpu_kernel=False): model(x)`` runs libtorch's ops where the CPU
    kernels would run. Each argument is a bool or None (``ArgumentTypeError`` otherwise).
    """
    enabled = _require_option(enabled, "enabled")
    low_memory = _require_option(low_memory, "low_memory")
    cpu_kernel = _require_option(cpu_kernel, "cpu_kernel")
    previous: _Override = getattr(_scope, "override", _Override())
    _scope.override = _Override(
        previous.fast if enabled is None else enabled,
        previous.low_memory if low_memory is None else low_memory,
        previous.cpu_kernel if cpu_kernel is None else cpu_kernel,
    )
    try:
        yield
    finally:
        _scope.override = previous


def module_path() -> contextlib.AbstractContextManager[None]:
    """Inside this context, blocks on this thread run the reference's module-by-module path.

    That path calls every branch's conv and BN as the reference does; it is the independent
    reference that :func:`mobileone_rs.verify_reparameterization` compares fused blocks against.
    """
    return fast_paths(enabled=False)
