"""Replies being written while long-history prompts arrive; prints one JSON object.

    .venv/bin/python bench/prompt_encoding.py [--turns 50 --words 120 --context 8192]

Fitting a long history to the context renders the chat template several times (a binary search over how
many old turns to drop). The engine encodes prompts on a thread of its own; the baseline, in the same run,
encodes them on the engine thread between decode steps, as the engine did before. Four replies decode while
four long prompts arrive; the longest pause between two decode steps is what every reply being written
waits. `gap_ratio` = longest pause with the prompt thread / without (lower is better).

The model is a small random-weight Mistral, so that a prefill chunk costs less than encoding a prompt, as
a 7B model's does on a GPU (on this CPU a bigger model's prefill chunk would hide the difference).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.devtools import write_tiny_model
from bot.engine.base import GenerationRequest, GenerationStream
from bot.engine.transformers_engine import TransformersEngine, load_model
from bot.personas import Sampling
from bot.prompt import encode_messages, quiet_overlong_warning

WORDS = "the quick brown fox jumps over lazy dog alchemy brother philosopher stone automail state".split()


class EncodingOnTheEngineThread(TransformersEngine):
    """The baseline: prompts encoded by the engine thread as it takes new requests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unprepared: deque[GenerationStream] = deque()

    def submit(self, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(request, self._loop)
        self._unprepared.append(stream)
        self._wake.set()
        return stream

    def _take_new(self) -> None:
        while self._unprepared:
            self._prepare_for_engine(self._unprepared.popleft())
        super()._take_new()


def history(rng: random.Random, turns: int, words: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are Edward Elric."}]
    for i in range(turns):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return [*messages, {"role": "user", "content": "And then?"}]


async def longest_step_gap(engine: TransformersEngine, prompts: list[list[dict[str, str]]]) -> float:
    """Seconds of the longest pause between decode steps while `prompts` arrive beside four running replies."""
    steps: list[float] = []
    decode_step, decoding = engine._decode_step, threading.Event()

    def timed_step() -> None:
        steps.append(time.perf_counter())
        if len(steps) == 20:  # all four are decoding
            decoding.set()
        decode_step()

    engine._decode_step = timed_step  # type: ignore[method-assign]
    story = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=400)
    running = [engine.submit(GenerationRequest(f"r{i}", [{"role": "user", "content": f"story {i}"}], story))
               for i in range(4)]
    readers = [asyncio.create_task(_drain(stream)) for stream in running]
    await asyncio.to_thread(decoding.wait)
    start = time.perf_counter()
    short = Sampling(temperature=0.0, max_new_tokens=2)
    for i, messages in enumerate(prompts):
        await _drain(engine.submit(GenerationRequest(f"long{i}", messages, short)))
    end = time.perf_counter()
    await asyncio.gather(*readers)
    engine._decode_step = decode_step  # type: ignore[method-assign]
    window = [t for t in steps if start <= t <= end]
    return max(b - a for a, b in zip(window, window[1:], strict=False)) if len(window) > 1 else end - start


async def _drain(stream: GenerationStream) -> None:
    async for _ in stream:
        pass


async def measure(settings: Settings, model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]]) -> dict[str, float]:
    gaps: dict[str, list[float]] = {"thread": [], "inline": []}
    for _ in range(3):  # alternate, best of three each: the box's noise hits both alike
        for name, kind in (("inline", EncodingOnTheEngineThread), ("thread", TransformersEngine)):
            engine = kind(settings, model=model, tokenizer=tokenizer)
            await engine.start()
            gaps[name].append(await longest_step_gap(engine, prompts))
            await engine.close()
    thread, inline = min(gaps["thread"]), min(gaps["inline"])
    return {"longest_step_gap_ms_inline": round(inline * 1000, 1), "longest_step_gap_ms_prompt_thread": round(thread * 1000, 1),
            "gap_ratio": round(thread / inline, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--context", type=int, default=8192)
    args = parser.parse_args()
    quiet_overlong_warning()
    rng = random.Random(0)
    prompts = [history(rng, args.turns, args.words) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp), hidden_size=64, layers=2, heads=2, kv_heads=1, context=args.context)
        settings = Settings(model=str(path), device="cpu", max_batch_size=8, context_tokens=args.context)
        tokenizer, model, _ = load_model(settings)
        encode_s = statistics.median(
            _timed(lambda m=m: encode_messages(tokenizer, m, context_tokens=args.context, max_new_tokens=2))
            for m in prompts
        )
        result = {"encode_ms_per_long_prompt": round(encode_s * 1000, 1),
                  **asyncio.run(measure(settings, model, tokenizer, prompts))}
    result["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    result["config"] = f"{args.turns} turns of {args.words} words, context {args.context}"
    json.dump(result, sys.stdout)
    print()


def _timed(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
