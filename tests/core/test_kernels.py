"""The fast-path mechanism (``optimlab._core.kernels``): which path a call takes, the switches, the fallback
when compiling fails, and that a compiled call behaves like in-place torch ops (aliasing, version counters).

The numerical agreement of every method's compiled kernel with its eager reference is a battery check
(``tests/conformance``: all implementation paths agree)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import optimlab
from optimlab._core import kernels
from optimlab._core.kernels import Kernel, get_kernel_mode, kernel, kernel_mode, set_kernel_mode


@kernel(read_only=("x",))
def axpy(y: torch.Tensor, x: torch.Tensor, scalars) -> None:
    """y <- a * y + b * x"""
    a, b = scalars
    kernels.add_(kernels.mul_(y, a), x, b)


@kernel(read_only=("x",))
def scaled_copy(x: torch.Tensor, out: torch.Tensor, scalars) -> None:
    (a,) = scalars
    out.copy_(x * a)


def test_the_default_is_compiled_for_large_tensors_and_eager_for_small_ones() -> None:
    assert get_kernel_mode() == ("compiled", kernels.DEFAULT_MIN_NUMEL)
    before = axpy.compiled_calls
    small = torch.ones(kernels.DEFAULT_MIN_NUMEL - 1), torch.ones(kernels.DEFAULT_MIN_NUMEL - 1)
    axpy(*small, scalars=(2.0, 3.0))
    assert axpy.compiled_calls == before
    large = torch.ones(kernels.DEFAULT_MIN_NUMEL), torch.ones(kernels.DEFAULT_MIN_NUMEL)
    axpy(*large, scalars=(2.0, 3.0))
    assert axpy.compiled_calls == before + 1
    assert torch.equal(large[0], torch.full_like(large[0], 5.0)) and torch.equal(small[0], large[0][:-1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 5).t(),  # transposed: dense, viewed flat in memory order
        lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
    ],
    ids=["transposed", "channels_last"],
)
def test_dense_layouts_are_viewed_flat_and_results_keep_the_layout(make) -> None:
    y, x = make(), make()
    expected_y = 0.5 * y + 2.0 * x
    with kernel_mode("compiled", min_numel=2):
        before = axpy.compiled_calls
        axpy(y, x, scalars=(0.5, 2.0))
        assert axpy.compiled_calls == before + 1
        out = torch.empty_like(x)  # same layout as x
        scaled_copy(x, out, scalars=(3.0,))
    torch.testing.assert_close(y, expected_y)
    assert out.shape == x.shape and out.stride() == x.stride()
    torch.testing.assert_close(out, 3.0 * x)


def test_layouts_a_flat_view_cannot_serve_take_the_eager_path() -> None:
    with kernel_mode("compiled", min_numel=2):
        before = axpy.compiled_calls
        y, x = torch.randn(8, 6)[:, ::2], torch.randn(8, 3)  # a strided slice, and mismatched strides
        expected = 2.0 * y + x
        axpy(y, x, scalars=(2.0, 1.0))
        y2, x2 = torch.randn(6, 5), torch.randn(5, 6).t()
        axpy(y2, x2, scalars=(1.0, 1.0))
        assert axpy.compiled_calls == before
    torch.testing.assert_close(y, expected)


def test_a_compiled_call_bumps_the_version_of_what_it_writes_only() -> None:
    y, x = torch.randn(64), torch.randn(64)
    vy, vx = y._version, x._version
    with kernel_mode("compiled", min_numel=2):
        axpy(y, x, scalars=(1.0, 1.0))
    assert y._version > vy and x._version == vx


def test_read_only_names_must_be_tensor_arguments() -> None:
    with pytest.raises(ValueError, match="read_only"):
        kernel(read_only=("grad",))(lambda p, g, scalars: None)


def test_eager_mode_and_the_context_manager_restore_the_previous_mode() -> None:
    y, x = torch.randn(1 << 16), torch.randn(1 << 16)
    before = axpy.compiled_calls
    with kernel_mode("eager"):
        assert get_kernel_mode()[0] == "eager"
        axpy(y, x, scalars=(1.0, 1.0))
    assert axpy.compiled_calls == before
    assert get_kernel_mode() == ("compiled", kernels.DEFAULT_MIN_NUMEL)


@pytest.mark.parametrize("bad", [{"mode": "fast"}, {"mode": "compiled", "min_numel": 1}])
def test_bad_modes_are_clear_errors(bad) -> None:
    with pytest.raises(ValueError, match="mode|min_numel"):
        set_kernel_mode(**bad)
    assert get_kernel_mode() == ("compiled", kernels.DEFAULT_MIN_NUMEL)


def test_the_environment_variable_switches_to_eager_and_is_validated() -> None:
    code = "from optimlab._core.kernels import get_kernel_mode; print(get_kernel_mode()[0])"
    run = lambda value: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={"OPTIMLAB_KERNELS": value, "PATH": ""}, capture_output=True, text=True
    )
    assert run("eager").stdout.strip() == "eager"
    bad = run("turbo")
    assert bad.returncode != 0 and "OPTIMLAB_KERNELS must be one of compiled, eager" in bad.stderr


def test_a_failed_compile_warns_once_and_falls_back_to_the_eager_path(monkeypatch) -> None:
    from torch._inductor.exc import InductorError

    def broken(*args, **kwargs):
        raise InductorError(RuntimeError("no C++ compiler"), "")

    doomed = Kernel(axpy.fn, read_only=("x",))
    monkeypatch.setattr(Kernel, "compiled", property(lambda self: broken))
    y, x = torch.ones(64), torch.ones(64)
    with kernel_mode("compiled", min_numel=2):
        with pytest.warns(RuntimeWarning, match="compiling the axpy kernel failed"):
            doomed(y, x, scalars=(2.0, 1.0))
        doomed(y, x, scalars=(2.0, 1.0))  # no second warning: the kernel stays eager
    assert doomed.failed and doomed.compiled_calls == 0
    assert torch.equal(y, torch.full_like(y, 7.0))


def test_an_optimizer_step_on_large_tensors_runs_the_compiled_kernels() -> None:
    from optimlab.optim.adan import adan_update

    params = [torch.nn.Parameter(torch.randn(256, 256)), torch.nn.Parameter(torch.randn(16))]
    for p in params:
        p.grad = torch.randn_like(p)
    before = adan_update.compiled_calls
    optimlab.Adan(params).step()
    assert adan_update.compiled_calls == before + 1  # the 65k-element matrix; the bias takes the eager path
