"""KV memory for continuous batching: one fixed slot per running request, plus an LRU of prefixes.

`SlotKV` holds per-layer K/V buffers shaped [slots, kv_heads, max_len, head_dim]. Running requests
occupy slots 0..n-1 (kept compact), so a decode step attends over a plain view `buf[:n, :, :kv_len]`
with no gather; a finished request's slot is refilled by moving the last one into it. The model sees
the buffers through `DecodeCache`/`PrefillCache`, small objects with the `update()` method that
transformers' attention layers call, so any Llama/Mistral-style model in transformers runs unchanged.

`PrefixCache` keeps the KV of finished requests keyed by their token ids. A new request copies the
longest common prefix (the persona's system prompt, a conversation's earlier turns) into its slot and
only prefills the rest.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

KV_SHARE = 0.8  # of the memory free once the model is loaded; the rest for activations, logits and the like


class SlotKV:
    """Preallocated K/V buffers with one slot per concurrently running request."""

    def __init__(
        self, *, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]

    def load(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Fill slot positions [0, length) from per-layer [kv_heads, >=length, head_dim] tensors."""
        for buf, src in zip((*self.keys, *self.values), (*keys, *values), strict=True):
            buf[slot, :, :length] = src[:, :length]

    def read(self, slot: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of a slot's first `length` positions, per layer."""
        return (
            [k[slot, :, :length].clone() for k in self.keys],
            [v[slot, :, :length].clone() for v in self.values],
        )


def slot_bytes(*, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
    """The K/V memory of one slot: what each conversation served at once costs, whether used or not."""
    return 2 * layers * kv_heads * max_len * head_dim * dtype.itemsize


def free_memory(device: torch.device) -> int | None:
    """Bytes a new tensor can take on `device`: the GPU's free memory, Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def slots_that_fit(wanted: int, per_slot: int, free: int | None, reserved: int = 0) -> int:
    """How many of `wanted` slots fit in KV_SHARE of `free` memory less `reserved` (all where unknown).

    Why: the slots are allocated up front, and the defaults (32 conversations of 8k tokens) need 32 GiB
    for a 7B model in bfloat16, 64 GiB in float32: more than many machines have beside the model."""
    if free is None:
        return wanted
    return max(0, min(wanted, int((free - reserved) * KV_SHARE) // per_slot))


class DecodeCache:
    """One new token for each of slots 0..rows-1, written at that row's own position."""

    def __init__(self, kv: SlotKV, positions: torch.Tensor, kv_len: int) -> None:
        self.kv, self.positions, self.kv_len = kv, positions, kv_len
        self.rows = positions.shape[0]
        self._row_index = torch.arange(self.rows, device=positions.device)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        keys[self._row_index, :, self.positions] = key[:, :, 0]
        values[self._row_index, :, self.positions] = value[:, :, 0]
        return keys[: self.rows, :, : self.kv_len], values[: self.rows, :, : self.kv_len]


class PrefillCache:
    """Prompt runs for slots first..first+n-1 in one forward, left-padded to a common length.

    Row i carries `lengths[i]` real tokens at the end of its row, written at positions
    [starts[i], starts[i] + lengths[i]) of its slot; the padding's K/V is never stored.
    """

    def __init__(self, kv: SlotKV, first_slot: int, starts: list[int], lengths: list[int]) -> None:
        self.kv = kv
        self.rows = slice(first_slot, first_slot + len(starts))
        self.kv_len = max(s + n for s, n in zip(starts, lengths, strict=True))
        # Where every real token goes, computed once for all layers: one indexed copy per layer.
        q, device = max(lengths), kv.keys[0].device
        pairs = [(row, start + i, q - length + i)
                 for row, (start, length) in enumerate(zip(starts, lengths, strict=True)) for i in range(length)]
        row, position, column = (torch.tensor(axis, device=device) for axis in zip(*pairs, strict=True))
        self._src = (row, slice(None), column)
        self._dst = (row + first_slot, slice(None), position)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        keys[self._dst] = key[self._src]
        values[self._dst] = value[self._src]
        return keys[self.rows, :, : self.kv_len], values[self.rows, :, : self.kv_len]


def prefill_positions(starts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """[n, q] position ids for left-padded prompt runs (padding sits at the row's first position)."""
    q = max(lengths)
    offsets = torch.arange(q, device=device).unsqueeze(0) - q
    first = torch.tensor([s + n for s, n in zip(starts, lengths, strict=True)], device=device).unsqueeze(-1)
    return torch.maximum(first + offsets, torch.tensor(starts, device=device).unsqueeze(-1))


Masks = torch.Tensor | dict[str, torch.Tensor]  # one for every layer, or one per layer type


@dataclass(frozen=True)
class Attention:
    """Which keys a model's layers see: causal, and within `window` on sliding layers. A model that mixes
    full-attention layers with sliding ones (Gemma 3, Cohere 2, Qwen with max_window_layers) takes one
    mask per layer type: one windowed mask would blind its full-attention layers past the window."""

    window: int | None = None
    mixed: bool = False

    @classmethod
    def of(cls, text_config: Any) -> Attention:
        window = getattr(text_config, "sliding_window", None)
        kinds = set(getattr(text_config, "layer_types", None) or ())
        unknown = kinds - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"attention layer types {sorted(unknown)} are not supported")
        if window is None or (kinds and "sliding_attention" not in kinds):
            return cls()
        return cls(window, mixed="full_attention" in kinds)

    def masks(self, positions: torch.Tensor, kv_len: int) -> Masks:
        sliding = causal_mask(positions, kv_len, self.window)
        if not self.mixed:
            return sliding
        return {"sliding_attention": sliding, "full_attention": causal_mask(positions, kv_len, None)}


def causal_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """[n, 1, q, kv_len] bool mask from [n, q] positions: each query sees its slot's keys up to its
    own position (within the sliding window). Used for decode steps (q = 1) and prefills alike; a
    prefill's padding query sits at its row's first position, so no row is all masked.
    """
    keys = torch.arange(kv_len, device=positions.device)
    queries = positions.unsqueeze(-1)
    allowed = keys <= queries
    if window is not None:
        allowed &= keys > queries - window
    return allowed[:, None]


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


@dataclass
class PrefixEntry:
    ids: torch.Tensor  # int64 on CPU
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    """LRU of finished requests' KV keyed by token ids, capped in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._next_key = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: torch.Tensor) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `ids`, and that length (marks it recently used)."""
        best: tuple[int, int] | None = None
        for key, entry in self._entries.items():
            n = common_prefix(entry.ids, ids)
            if n and (best is None or n > best[1]):
                best = (key, n)
        if best is None:
            return None, 0
        self._entries.move_to_end(best[0])
        return self._entries[best[0]], best[1]

    def store(self, entry: PrefixEntry) -> None:
        """Add `entry`, dropping entries it extends (an earlier turn of the same conversation) and old ones."""
        if self.max_bytes <= 0 or entry.nbytes > self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if common_prefix(e.ids, entry.ids) == e.ids.shape[0]]:
            self._drop(key)
        while self._entries and self.bytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_key] = entry
        self._next_key += 1
        self.bytes += entry.nbytes

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes
