"""One batched decode step's forward: eager, or replayed from a CUDA graph.

Why graphs: on a GPU a 7B decode forward is about a thousand small kernels. Launching them from Python
took 30-80 ms per step on an H200 while the GPU itself worked about 6 ms, so every decode step was bound
by the CPU, whatever the batch size (BENCHMARKS.md, GPU section). A captured graph launches them all in
one call.

A graph has fixed shapes and fixed memory, so a step is padded to a bucket: its rows to the next power
of two (at most the slot count), the attended length to the next multiple of KV_BLOCK. Padding rows run
PAD_ID at the last position of their slot, which no request ever writes (a request finishes before its
ids fill the context, see `TransformersEngine._accept`), and their logits are dropped; a padding row
may sit in a slot being prefilled, so that position must stay unused. A padding row also sees key 0, so a
sliding window never masks it whole: SDPA may answer NaN for such a row, and its NaN K/V at that last
position would poison the slot's next owner once a step's view reaches it (masked or not, NaN spreads).
Each bucket is captured the first time it is needed, into one memory pool shared by all of them (the
graphs only ever replay one at a time), on the model's own GPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from bot.engine.kv import Attention, DecodeCache, SlotKV

log = logging.getLogger(__name__)

KV_BLOCK = 256  # attended-length granularity of the graph buckets
PAD_ID = 0  # the token of a padding row (decode) or of left padding (prefill); its outputs are discarded
WARM_UP_RUNS = 2  # eager runs on a side stream before a capture, so lazy initialisation is not captured


def decode_logits(
    model: Any, kv: SlotKV, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int, attention: Attention,
    *, pad_position: int | None = None,
) -> torch.Tensor:
    """Next-token logits [rows, vocab] for `tokens` [rows, 1] of slots 0..rows-1 at `positions` [rows].
    Rows at `pad_position` are padding: they also see key 0 (module docstring)."""
    query_positions = positions.unsqueeze(-1)
    masks = attention.masks(query_positions, kv_len)
    if pad_position is not None:
        for mask in masks.values() if isinstance(masks, dict) else (masks,):
            mask[..., 0] |= (query_positions == pad_position).unsqueeze(-1)
    return model(
        input_ids=tokens,
        position_ids=query_positions,
        attention_mask=masks,
        cache=DecodeCache(kv, positions, kv_len),
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]


class DecodeGraphs:
    """Decode steps padded to buckets and, with `capture`, replayed from one CUDA graph per bucket.

    Without `capture` the same padded steps run eagerly: how the CPU tests check the padding. When a
    capture fails, `failed` is set and the engine goes back to exact eager steps.
    """

    def __init__(self, model: Any, kv: SlotKV, attention: Attention, *, capture: bool) -> None:
        self.model, self.kv, self.attention, self.capture = model, kv, attention, capture
        self.failed = False
        self.device = kv.keys[0].device
        # Row 0 the tokens, row 1 the positions: one host-to-device copy per step fills both.
        self.inputs = torch.tensor([[PAD_ID] * kv.slots, [self.pad_position] * kv.slots], device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def pad_position(self) -> int:
        return self.kv.max_len - 1

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def bucket(self, rows: int, kv_len: int) -> tuple[int, int]:
        """(padded rows, padded attended length) for a step of `rows` attending `kv_len` positions."""
        padded_rows = min(1 << (rows - 1).bit_length(), self.kv.slots)
        padded_len = min(-(-kv_len // KV_BLOCK) * KV_BLOCK, self.kv.max_len)
        return padded_rows, padded_len

    def warm_up(self) -> None:
        """Capture every row bucket of the shortest length up front, so the first replies don't wait."""
        start, rows = time.perf_counter(), 1
        while self.capture and not self.failed:
            self._replay(*self.bucket(rows, 1))
            if rows >= self.kv.slots:
                log.info("captured %d decode CUDA graphs in %.1f s", self.captured, time.perf_counter() - start)
                return
            rows *= 2

    def logits(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Next-token logits [len(tokens), vocab] for one decode step of slots 0..len(tokens)-1."""
        rows = len(tokens)
        padded_rows, padded_len = self.bucket(rows, max(positions) + 1)
        padding = padded_rows - rows
        step = torch.tensor([tokens + [PAD_ID] * padding, positions + [self.pad_position] * padding])
        self.inputs[:, :padded_rows].copy_(step)
        return self._replay(padded_rows, padded_len)[:rows]

    def _forward(self, rows: int, kv_len: int) -> torch.Tensor:
        return decode_logits(
            self.model, self.kv, self.inputs[0, :rows].unsqueeze(-1), self.inputs[1, :rows], kv_len, self.attention,
            pad_position=self.pad_position,
        )

    def _replay(self, rows: int, kv_len: int) -> torch.Tensor:
        if not self.capture or self.failed:
            return self._forward(rows, kv_len)
        with torch.cuda.device(self.device):  # streams and graphs of the model's GPU, not the current one
            entry = self._graphs.get((rows, kv_len))
            if entry is None:
                try:
                    entry = self._capture(rows, kv_len)
                except Exception as exc:  # e.g. a quantized model's kernels that a graph cannot hold
                    log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly",
                                type(exc).__name__, exc)
                    self.failed, self._graphs = True, {}
                    return self._forward(rows, kv_len)
            graph, logits = entry
            graph.replay()
        return logits

    def _capture(self, rows: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                self._forward(rows, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(rows, kv_len)
        self._graphs[(rows, kv_len)] = (graph, logits)
        return graph, logits
