"""The AVX2 kernel for decode-sized batches (bot/engine/batched_linear.py): same numbers as torch, used
only where it may be, and a clear fallback where it cannot be built."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from bot.engine import batched_linear
from bot.engine.batched_linear import MAX_ROWS, MIN_ROWS, install, kernel, unavailable_reason

needs_kernel = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"the kernel cannot run on this machine: {unavailable_reason()}"
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Decode steps run on one torch thread (transformers_engine.cpu_threads on the 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layer(in_features: int, out_features: int, *, bias: bool) -> torch.nn.Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    return torch.nn.Linear(in_features, out_features, bias=bias)


def test_the_kernel_builds_wherever_nothing_stands_in_its_way() -> None:
    assert unavailable_reason() is not None or kernel() is not None


@needs_kernel
@pytest.mark.parametrize("rows", [MIN_ROWS, 16, 17, 25, 26, 32, 41, MAX_ROWS])
@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(37, 13, True), (128, 96, False), (64, 6, True)])
def test_decode_sized_batches_give_torchs_numbers(
    one_thread: None, rows: int, in_features: int, out_features: int, bias: bool
) -> None:
    """Whole blocks of 16 rows, a padded last block, and a few spare rows left to torch; column counts
    that are and are not a multiple of the kernel's 6; bias or none; a decode step's [rows, 1, features]."""
    linear = layer(in_features, out_features, bias=bias)
    x = torch.randn(rows, 1, in_features)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
        assert install(linear) == 1
        got = linear(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MAX_ROWS + 1])
def test_other_batch_sizes_are_torchs_own_result(one_thread: None, rows: int) -> None:
    linear = layer(64, 48, bias=True)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
        install(linear)
        assert torch.equal(linear(x), expected)


@needs_kernel
def test_with_more_torch_threads_or_autograd_torch_computes(one_thread: None) -> None:
    """Several threads: MKL splits the matmul across cores, which a one-core kernel would lose to.
    Autograd: the kernel has no backward."""
    linear = layer(64, 48, bias=True)
    install(linear)
    x = torch.randn(16, 64)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
        torch.set_num_threads(2)
        assert torch.equal(linear(x), expected)
        torch.set_num_threads(1)
    out = linear(x)  # grad mode, weights that require grad
    out.sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.shape == linear.weight.shape


def test_only_plain_fp32_cpu_linears_are_taken() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.float64), torch.nn.ReLU(), torch.nn.Linear(8, 4)
    )
    expected = 2 if kernel() is not None else 0
    assert install(model) == expected


def test_without_a_compiler_torch_keeps_the_matmuls_and_the_log_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=batched_linear.__name__):
            assert kernel() is None
            linear = layer(8, 8, bias=False)
            assert install(linear) == 0
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
