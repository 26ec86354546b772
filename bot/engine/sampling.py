"""Batched next-token choice with per-row sampling settings, in a handful of tensor ops.

Every row of a continuous batch belongs to a different conversation and persona, so temperature,
top-k, top-p and repetition penalty are tensors with one value per row; temperature 0 means greedy.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the row's prompt or reply (`seen` is a [B, V] bool mask)."""
    pen = penalty.unsqueeze(-1)
    penalized = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, penalized, logits)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` [B, V] (float32). top_k 0 and top_p 1.0 disable those filters."""
    greedy = logits.argmax(dim=-1)
    if bool((temperature <= 0).all()):
        return greedy
    vocab = logits.shape[-1]
    scaled = logits / temperature.clamp_min(1e-5).unsqueeze(-1)
    ordered, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).unsqueeze(-1)
    ordered = ordered.masked_fill(ranks >= k, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above; the top token always stays
    probs = probs.masked_fill(before > top_p.unsqueeze(-1), 0.0)
    # Exponential-race sampling: argmax(p / Exp(1)) is a draw from p, without a host sync.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(temperature <= 0, greedy, sampled)
