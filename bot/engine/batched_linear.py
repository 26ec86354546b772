"""A decode step's linear layers on the CPU's cores, through a small AVX2 kernel (batched_linear.c).

Why: at 16 rows torch's matmul (MKL) gets about half of what an AVX2 core can do (30-60 GFLOP/s on the
project's box), so a 16-conversation decode step cost 3-4 times one conversation's instead of barely
more. The kernel gets 75-95 GFLOP/s a core there, reading the model's own weights, and shares each call's
columns out to helper threads on the other cores, so that the step reads the weights from memory about as
fast as a one-row step does (BENCHMARKS.md).

It is used only where it wins, and torch runs everything else exactly as before: fp32 CPU tensors,
MIN_ROWS to MAX_ROWS rows (one-row generation and prefills are untouched), no autograd. It is compiled
when first needed with the system C compiler ($CC, else cc) into a temporary folder, about 0.3 s per
process, nothing left on disk; without AVX2, FMA or a compiler the engine says why once and keeps
torch's matmul.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("batched_linear.c")
BLOCK_ROWS = 16  # rows per pass of the kernel over a weight; a shorter last block is padded
MIN_ROWS = 10  # below this a padded block costs more than torch's matmul of the rows themselves
MAX_ROWS = 64  # above this (a prefill) torch's cache-blocked matmul wins: the kernel reads w once per block

Kernel = Callable[[int, int, int, int, int, int, int], int]


def unavailable_reason() -> str | None:
    """Why the kernel cannot run on this machine, or None when it can (AVX2, FMA and a C compiler)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    if shutil.which(compiler()) is None:
        return f"no C compiler: {compiler()} is not on PATH (set CC, or install gcc)"
    return None


def compiler() -> str:
    return os.environ.get("CC") or "cc"


@functools.cache
def kernel() -> Kernel | None:
    """The compiled kernel, or None (and one log line saying why) where it cannot run."""
    reason = unavailable_reason()
    if reason is None:
        with tempfile.TemporaryDirectory(prefix="hermes-kernel-") as folder:
            library = Path(folder) / "batched_linear.so"
            command = [compiler(), "-O3", "-mavx2", "-mfma", "-pthread", "-shared", "-fPIC", str(SOURCE), "-o", str(library)]
            try:
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
                function = ctypes.CDLL(str(library)).batched_linear  # stays mapped once the file is gone
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", None) or exc
                reason = f"{command[0]} failed to build {SOURCE.name}: {str(detail).strip()[:300]}"
            else:
                function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 4
                function.restype = ctypes.c_int
                return function
    log.info("CPU decode batches use torch's matmul: %s", reason)
    return None


def install(model: torch.nn.Module, threads: int) -> int:
    """Send the fp32 `nn.Linear` layers of `model` through `forward` on `threads` cores; returns how many
    (0 without the kernel). Only plain `nn.Linear` layers qualify: quantized layers have weights of their
    own kind."""
    run = kernel()
    if run is None:
        return 0
    layers = [
        m for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    ]
    for layer in layers:
        layer.forward = functools.partial(forward, run, threads, layer)
    return len(layers)


def forward(run: Kernel, threads: int, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`: the kernel for the first rows of a decode-sized batch, torch for anything else."""
    weight = layer.weight
    in_features, out_features = weight.shape[1], weight.shape[0]
    rows = x.numel() // in_features if in_features else 0
    usable = (
        MIN_ROWS <= rows <= MAX_ROWS
        and x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )
    if not usable:
        return torch.nn.functional.linear(x, weight, layer.bias)
    flat = x.reshape(rows, in_features).contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype)
    spare = rows % BLOCK_ROWS
    by_kernel = rows - spare if 0 < spare < MIN_ROWS else rows  # a few spare rows: torch takes them
    if run(flat.data_ptr(), weight.data_ptr(), out.data_ptr(), by_kernel, in_features, out_features, threads) != 0:
        raise MemoryError(f"batched_linear: no memory for a {in_features} x {BLOCK_ROWS} scratch block")
    if by_kernel < rows:
        torch.mm(flat[by_kernel:], weight.t(), out=out[by_kernel:])
    if layer.bias is not None:
        out += layer.bias
    return out.view(*x.shape[:-1], out_features)
