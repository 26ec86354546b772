"""The AVX2 kernel for decode-sized batches (bot/engine/batched_linear.py): same numbers as torch, used
only where it may be, and a clear fallback where it cannot be built."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch

from bot.engine import batched_linear
from bot.engine.batched_linear import MAX_ROWS, MIN_ROWS, install, kernel, unavailable_reason

needs_kernel = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"the kernel cannot run on this machine: {unavailable_reason()}"
)


def layer(in_features: int, out_features: int, *, bias: bool) -> torch.nn.Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    return torch.nn.Linear(in_features, out_features, bias=bias)


def test_the_kernel_builds_wherever_nothing_stands_in_its_way() -> None:
    assert unavailable_reason() is not None or kernel() is not None


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [MIN_ROWS, 16, 17, 25, 26, 32, 41, MAX_ROWS])
@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(37, 13, True), (128, 96, False), (64, 6, True)])
def test_decode_sized_batches_give_torchs_numbers(
    threads: int, rows: int, in_features: int, out_features: int, bias: bool
) -> None:
    """Whole blocks of 16 rows, a padded last block, and a few spare rows left to torch; column counts
    that are and are not a multiple of the kernel's 6; bias or none; a decode step's [rows, 1, features];
    the caller alone, or sharing the columns with helper threads (more of them than this box has cores)."""
    linear = layer(in_features, out_features, bias=bias)
    x = torch.randn(rows, 1, in_features)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
        assert install(linear, threads) == 1
        got = linear(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MAX_ROWS + 1])
def test_other_batch_sizes_are_torchs_own_result(rows: int) -> None:
    linear = layer(64, 48, bias=True)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
        install(linear, 2)
        assert torch.equal(linear(x), expected)


@needs_kernel
def test_with_autograd_torch_computes() -> None:
    """The kernel has no backward: a forward that autograd records stays torch's."""
    linear = layer(64, 48, bias=True)
    install(linear, 2)
    out = linear(torch.randn(16, 64))  # grad mode, weights that require grad
    out.sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.shape == linear.weight.shape


@needs_kernel
def test_calls_from_two_threads_at_once_each_get_their_own_result() -> None:
    """Two engines in one process call the kernel from their own threads; its helpers serve one call at a time."""
    linears = [layer(256, 1000 + i, bias=False) for i in range(2)]
    inputs = [torch.randn(16, 256) for _ in range(2)]
    for linear in linears:
        install(linear, 2)
    with torch.inference_mode():
        expected = [torch.nn.functional.linear(x, m.weight) for m, x in zip(linears, inputs, strict=True)]
    wrong: list[int] = []

    def hammer(i: int) -> None:
        with torch.inference_mode():
            for _ in range(200):
                if not torch.allclose(linears[i](inputs[i]), expected[i], rtol=1e-5, atol=1e-5):
                    wrong.append(i)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_computes_without_its_parents_helpers() -> None:
    """A child forked after the helpers started has none of them: its calls must neither hang nor go wrong."""
    linear = layer(128, 300, bias=True)
    install(linear, 2)
    x = torch.randn(16, 128)
    with torch.inference_mode():
        linear(x)  # the helper threads are running now
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's exit status is the result
        with torch.inference_mode():
            ok = torch.allclose(linear(x), expected, rtol=1e-5, atol=1e-5)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert done[0] == child, "the forked child hung"
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_only_plain_fp32_cpu_linears_are_taken() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.float64), torch.nn.ReLU(), torch.nn.Linear(8, 4)
    )
    expected = 2 if kernel() is not None else 0
    assert install(model, 1) == expected


def test_without_a_compiler_torch_keeps_the_matmuls_and_the_log_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=batched_linear.__name__):
            assert kernel() is None
            linear = layer(8, 8, bias=False)
            assert install(linear, 1) == 0
        assert "forward" not in vars(linear)
        reason = unavailable_reason()
    finally:
        kernel.cache_clear()  # the next test builds it again with the real compiler
    assert reason is not None and f"CPU decode batches use torch's matmul: {reason}" in caplog.text


@needs_kernel
def test_a_compiler_that_fails_is_reported_with_its_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "false")  # on PATH, exits 1
    kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=batched_linear.__name__):
            assert kernel() is None
    finally:
        kernel.cache_clear()
    assert "false failed to build batched_linear.c" in caplog.text
