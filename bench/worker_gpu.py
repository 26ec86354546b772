"""The worker benchmark on a GPU with a 7B Mistral-shaped random-weight model; prints one JSON object.

    python bench/worker_gpu.py          # on a CUDA machine: 7B shape, bf16 (needs ~47 GiB: weights + KV slots)
    python bench/worker_gpu.py --tiny   # the same code path on CPU with a small model (what CI can run)

No download: the model is built from a MistralConfig (OpenHermes-2.5's shape: hidden 4096, 32 layers,
32 heads, 8 KV heads, MLP 14336) directly on the GPU in bf16 with random weights. The vocabulary is the
tiny ChatML tokenizer's (~1k tokens instead of 32k, ~2% of the weights), so text stays decodable.
Measurements and JSON keys are those of bench/worker_throughput.py (`speedup_<n>`,
`ttft_ratio_prefix_reuse`), each against one-at-a-time `model.generate()` in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_throughput import measure  # noqa: E402

from bot.config import Settings  # noqa: E402
from bot.devtools import build_tokenizer  # noqa: E402
from bot.engine.decode import DecodeGraphs, decode_logits  # noqa: E402
from bot.engine.kv import Attention, SlotKV  # noqa: E402


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, vocab: int, tokenizer: object):  # type: ignore[no-untyped-def]
    from transformers import MistralConfig, MistralForCausalLM

    shape = (
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
        if tiny
        else dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8)
    )
    config = MistralConfig(
        vocab_size=vocab, max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", **shape,  # type: ignore[attr-defined]
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # weights are created (and randomly initialised) where they will run
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def graph_check(model: torch.nn.Module, rows: int = 11, slots: int = 16) -> dict[str, object]:
    """Decode steps replayed from a CUDA graph (padded to a bucket) against eager steps on the same K/V:
    the first call captures, the second replays the same graph with other tokens and positions. Reports
    whether both used one graph, and the largest logit difference relative to the largest logit."""
    config = model.config
    kv = SlotKV(
        layers=config.num_hidden_layers, slots=slots, kv_heads=config.num_key_value_heads, max_len=512,
        head_dim=config.hidden_size // config.num_attention_heads, dtype=torch.bfloat16, device=torch.device("cuda"),
    )
    for buf in (*kv.keys, *kv.values):
        buf.normal_()
    graphs = DecodeGraphs(model, kv, Attention(), capture=True)
    diffs = []
    for first_token, first_position in ((5, 30), (300, 41)):  # both steps fall in the (16 rows, 256) bucket
        tokens = list(range(first_token, first_token + rows))
        positions = [first_position + 17 * i for i in range(rows)]
        with torch.inference_mode():
            replayed = graphs.logits(tokens, positions).float()
            eager = decode_logits(model, kv, torch.tensor(tokens, device="cuda").unsqueeze(-1),
                                  torch.tensor(positions, device="cuda"), max(positions) + 1, Attention()).float()
        diffs.append(round(float((replayed - eager).abs().max() / eager.abs().max()), 4))
    return {"graph_captured": not graphs.failed and graphs.captured == 1, "graph_vs_eager_rel_diff": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model on CPU: checks the script runs")
    parser.add_argument("--graph-check-only", action="store_true", help="only compare replayed and eager decode steps")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokenizer = build_tokenizer()
    start = time.perf_counter()
    model = build_model(args.tiny, device, dtype, len(tokenizer), tokenizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    built_s = time.perf_counter() - start
    levels = [1, 4] if args.tiny else [1, 4, 16, 64]
    settings = Settings(
        model="random-mistral-7b", device=str(device), max_batch_size=max(levels), context_tokens=4096,
        prefix_cache_mb=8192,
    )
    checked = graph_check(model) if device.type == "cuda" else {}
    print(json.dumps(checked), file=sys.stderr, flush=True)
    if args.graph_check_only:
        return
    result = asyncio.run(measure(
        model, tokenizer, settings, levels=levels, new_tokens=16 if args.tiny else 128, prompt_words=12,
        baseline_runs=1 if args.tiny else 2, history_tokens=500 if args.tiny else 3000, ttft_repeats=3,
    ))
    result.update(
        checked, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
        params=sum(p.numel() for p in model.parameters()), build_s=round(built_s, 1),
        total_s=round(time.perf_counter() - start, 1),
    )
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
