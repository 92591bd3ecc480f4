"""Fast paths: one mechanism that runs a method's per-tensor update as a compiled kernel.

A method writes its per-tensor update once, as a function of tensors and a sequence of scalars, and decorates
it with :func:`kernel`. Calling the kernel then takes one of two paths:

* **compiled** (the default): ``torch.compile`` (Inductor: a C++/OpenMP loop on CPU, Triton on CUDA) of the same
  function, traced once with dynamic sizes over flat views of the tensors, so one compiled kernel serves every
  parameter shape. The update reads and writes each buffer once, where the eager path makes a pass per
  operation. Scalars travel as one small float64 tensor, so new learning rates or bias corrections never
  recompile. Inductor keeps compiled kernels in its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default under
  the temp directory): a new process re-traces in ~1-2 s instead of compiling for ~3-5 s.
* **eager**: the function itself, with the scalars as Python floats: the reference every compiled path is tested
  against, taken for small tensors (below ``min_numel``, where a compiled call's fixed cost outweighs the
  traffic it saves), for tensors a flat view cannot serve (overlapping or differently strided buffers, mixed
  devices), while a surrounding ``torch.compile`` traces the step (it then compiles the
  update into the caller's graph), and whenever the compiled path is switched off.

Switch it off with the environment variable ``OPTIMLAB_KERNELS=eager``, with :func:`set_kernel_mode`, or
temporarily with ``with kernel_mode("eager"):``. If compiling fails (no C++ compiler, an unsupported device), the
kernel warns once and runs eagerly from then on.

Kernels are written with the helpers below (``mul_``, ``div_``, ``add``, ``add_``, ``addcmul_``, ``addcdiv_``),
which take a scalar either as a Python number (eager: one fused torch op, rounding exactly like torch's own
optimizers, and no op at all for an exact no-op such as multiplying by 1.0) or as a 0-dim tensor (compiled).
Keyword arguments of a call other than ``scalars`` (a κ or friction name) are passed through as constants:
the compiled path specializes on them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.graph import increment_version
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = [
    "Kernel",
    "adam_moments_",
    "add",
    "add_",
    "addcdiv_",
    "addcmul_",
    "div_",
    "mul_",
    "kernel",
    "kernel_mode",
    "get_kernel_mode",
    "set_kernel_mode",
]

Mode = Literal["compiled", "eager"]
_MODES = ("compiled", "eager")


def _mode_from_environment() -> Mode:
    mode = os.environ.get("OPTIMLAB_KERNELS", "compiled").strip().lower() or "compiled"
    if mode not in _MODES:
        raise ValueError(f"OPTIMLAB_KERNELS must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode  # type: ignore[return-value]


_mode: Mode = _mode_from_environment()
# Below this many elements a tensor takes the eager path: a compiled call costs ~60-70 us whatever the size
# (guards, aliases, the OpenMP launch), the eager ops ~25-50 us on a small tensor. Measured crossover on this
# project's 2-core CPU (per tensor, 2 threads): Lion ~50k elements, Adan ~20k, EXAdam ~10k.
DEFAULT_MIN_NUMEL = 1 << 15
_min_numel = DEFAULT_MIN_NUMEL


def get_kernel_mode() -> tuple[Mode, int]:
    """The kernel mode and the smallest tensor the compiled path takes."""
    return _mode, _min_numel


def set_kernel_mode(mode: Mode, *, min_numel: int = DEFAULT_MIN_NUMEL) -> None:
    """``"compiled"`` (the default) or ``"eager"`` for every optimlab kernel from now on; in compiled mode,
    tensors with fewer than ``min_numel`` elements still take the eager path."""
    global _mode, _min_numel
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(_MODES)}; got {mode!r}")
    if not isinstance(min_numel, int) or min_numel < 2:
        raise ValueError(f"min_numel must be an integer >= 2; got {min_numel!r}")
    _mode, _min_numel = mode, min_numel


@contextlib.contextmanager
def kernel_mode(mode: Mode, *, min_numel: int = DEFAULT_MIN_NUMEL) -> Iterator[None]:
    """Run the block with every optimlab kernel in ``mode`` (see :func:`set_kernel_mode`)."""
    previous, previous_min = get_kernel_mode()
    set_kernel_mode(mode, min_numel=min_numel)
    try:
        yield
    finally:
        set_kernel_mode(previous, min_numel=previous_min)


# -- scalar helpers: one fused op for a Python number, a multiply for a (compiled) 0-dim tensor ------------------
def mul_(x: Tensor, a: float | Tensor) -> Tensor:
    """``x *= a`` (skipped for the number 1.0, which is exact)"""
    return x if not isinstance(a, Tensor) and a == 1.0 else x.mul_(a)


def div_(x: Tensor, a: float | Tensor) -> Tensor:
    """``x /= a`` (skipped for the number 1.0, which is exact)"""
    return x if not isinstance(a, Tensor) and a == 1.0 else x.div_(a)


def add(x: Tensor, y: Tensor, alpha: float | Tensor) -> Tensor:
    """``x + alpha * y``, a new tensor (``x`` itself for the number 0.0)"""
    if isinstance(alpha, Tensor):
        return x + y * alpha
    return x if alpha == 0.0 else x.add(y, alpha=alpha)


def add_(x: Tensor, y: Tensor, alpha: float | Tensor) -> Tensor:
    """``x += alpha * y``"""
    return x.add_(y * alpha) if isinstance(alpha, Tensor) else x.add_(y, alpha=alpha)


def addcmul_(x: Tensor, y: Tensor, z: Tensor, value: float | Tensor) -> Tensor:
    """``x += value * y * z``"""
    return x.add_(y * z * value) if isinstance(value, Tensor) else x.addcmul_(y, z, value=value)


def addcdiv_(x: Tensor, y: Tensor, z: Tensor, value: float | Tensor) -> Tensor:
    """``x += value * y / z``"""
    return x.add_(y / z * value) if isinstance(value, Tensor) else x.addcdiv_(y, z, value=value)


def adam_moments_(
    first: Tensor,
    second: Tensor,
    m: Tensor,
    v: Tensor,
    beta1: float | Tensor,
    c1: float | Tensor,
    beta2: float | Tensor,
    c2: float | Tensor,
    sqrt_bc2: float | Tensor,
    eps: float | Tensor,
) -> Tensor:
    """Advance Adam's moments in place, ``m ← β1 m + c1·first`` and ``v ← β2 v + c2·second²`` (``first`` and
    ``second`` are the same gradient for Adam; coordinate clipping feeds ``m`` the clipped one), and return the
    denominator ``sqrt(v)/sqrt(1-β2^t) + ε`` as a new tensor. Called inside kernels."""
    add_(mul_(m, beta1), first, c1)
    addcmul_(mul_(v, beta2), second, second, c2)
    return div_(v.sqrt(), sqrt_bc2).add_(eps)


# -- the mechanism -------------------------------------------------------------------------------------------------
def _alias(t: Tensor) -> Tensor:
    """A 1-D alias of every element of a dense, non-overlapping tensor, in memory order. It is a new tensor on
    ``t``'s storage rather than a view: Dynamo guards on a view's base, whose rank would then cost one compiled
    graph per parameter rank."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


# aliases of the long-lived tensors a kernel writes (parameters, state), made once: making one costs ~5 us,
# a lookup ~1 us. Weak keys: an entry goes with its tensor.
_aliases = WeakTensorKeyDictionary()


def _flat(t: Tensor, keep: bool) -> Tensor:
    alias = _aliases.get(t) if keep else None
    if alias is None or alias.data_ptr() != t.data_ptr() or alias.numel() != t.numel() or alias.dtype != t.dtype:
        alias = _alias(t)  # new, or ``t.data`` was replaced since
        if keep:
            _aliases[t] = alias
    return alias


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill a contiguous block of memory exactly once (in some order of its dims)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _compile_errors() -> tuple[type[Exception], ...]:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError, InductorError

    return BackendCompilerFailed, InductorError, CppCompileError


class Kernel:
    """A per-tensor update ``fn(*tensors, scalars)`` with a compiled and an eager path (see the module docstring).

    ``fn`` writes its results into its tensor arguments, in place (an output buffer is one more argument), and
    returns nothing. ``scalars`` is any sequence of floats, indexed or unpacked by ``fn``.
    """

    def __init__(self, fn: Callable[..., Any], read_only: tuple[str, ...] = ()) -> None:
        self.fn = fn
        arguments = list(inspect.signature(fn).parameters)
        names = arguments[: arguments.index("scalars")]  # the tensor arguments come first
        unknown = set(read_only) - set(names)
        if unknown:
            raise ValueError(f"read_only names {sorted(unknown)} are not tensor arguments of {fn.__qualname__}")
        # the arguments the kernel writes: their version counters are bumped, as an in-place op's would be
        self.written = tuple(i for i, name in enumerate(names) if name not in read_only)
        self.failed: str | None = None  # why compiling failed, once it has
        self.compiled_calls = 0
        self._last_pack: tuple[tuple[float, ...], torch.device, Tensor] | None = None
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def compiled(self) -> Callable[..., Any]:
        # dynamic_threads: the OpenMP thread count is read at run time; otherwise Inductor fixes it when it
        # compiles and, sizing the loop by the first call's tensor, may make it serial for every later call
        return torch.compile(self.fn, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})

    def eligible(self, tensors: Sequence[Tensor]) -> bool:
        """Whether the compiled path can serve ``tensors`` (every buffer viewed flat, element for element)."""
        first = tensors[0]
        if first.numel() < _min_numel or not _dense(first):
            return False
        return all(
            t.device == first.device and t.shape == first.shape and t.stride() == first.stride() for t in tensors[1:]
        )

    def _pack(self, scalars: tuple[float, ...], device: torch.device) -> Tensor:
        """The scalars as one tensor on ``device``; the tensors of a param group usually share them, so the last
        pack is reused (the kernel only reads it)."""
        if self._last_pack is not None and self._last_pack[0] == scalars and self._last_pack[1] == device:
            return self._last_pack[2]
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        pack = torch.tensor(scalars, dtype=dtype, device=device)
        self._last_pack = (scalars, device, pack)
        return pack

    def __call__(self, *tensors: Tensor, scalars: Sequence[float] = (), **constants: Any) -> None:
        if _mode == "eager" or self.failed or torch.compiler.is_compiling() or not self.eligible(tensors):
            self.fn(*tensors, scalars, **constants)
            return
        first = tensors[0]
        pack = self._pack(tuple(scalars), first.device)
        try:
            flat = [_flat(t, i in self.written) for i, t in enumerate(tensors)]
            self.compiled(*flat, pack, **constants)
        except _compile_errors() as err:  # a missing compiler or an unsupported device: fails before any write
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(
                f"optimlab: compiling the {self.fn.__qualname__} kernel failed ({self.failed}); using the eager "
                "path (set OPTIMLAB_KERNELS=eager to skip compiling)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.fn(*tensors, scalars, **constants)
            return
        self.compiled_calls += 1
        for i in self.written:
            increment_version(tensors[i])


def kernel(*, read_only: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Kernel]:
    """Decorator: make ``fn(*tensors, scalars)`` a :class:`Kernel`; it writes every tensor argument in place except
    those named in ``read_only``."""
    return lambda fn: Kernel(fn, read_only)
